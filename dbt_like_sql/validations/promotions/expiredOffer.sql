-- offerExpiry not a date, or before the run's as-of date
TRY_CAST("offerExpiry" AS DATE) IS NULL OR TRY_CAST("offerExpiry" AS DATE) < DATE '{{ as_of }}'
