select rule, sum(count)::bigint as records
from {{ source('progress', 'validation_errors') }}
where kind = 'validation'
group by rule
order by records desc
