-- errorDetails reads "<step>: <file>: <message>"; the class is the message's first words
select
    split_part(error_details, ':', 1) as step,
    regexp_replace(trim(split_part(error_details, ':', 3)), '[0-9]+', 'N', 'g') as reason,
    count(*) as files
from {{ ref('file_status') }}
where status = 'failed'
group by 1, 2
order by files desc
