select
    file_id,
    file_path,
    file_name,
    status,
    file_type,
    file_size,
    total_chunks,
    completed_chunks,
    failed_chunks,
    successful_records,
    failed_records,
    success_rate,
    output_key,
    error_details,
    created_at,
    completed_at
from {{ source('progress', 'file_status') }}
