select dataset_key, objects, rows, bytes, compression
from {{ source('progress', 'datasets') }}
order by dataset_key
