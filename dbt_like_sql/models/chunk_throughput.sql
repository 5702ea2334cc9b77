select
    c.file_id,
    f.file_name,
    count(*) as chunks,
    sum(c.record_count) as records,
    sum(c.size_bytes) as bytes,
    round(sum(c.duration), 3) as seconds,
    round(sum(c.record_count) / nullif(sum(c.duration), 0), 1) as rows_per_s,
    round(sum(c.size_bytes) / 1e6 / nullif(sum(c.duration), 0), 2) as mb_per_s
from {{ source('progress', 'chunk_status') }} as c
left join {{ ref('file_status') }} as f using (file_id)
where c.status = 'completed'
group by c.file_id, f.file_name
