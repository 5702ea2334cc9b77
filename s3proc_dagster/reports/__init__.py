"""The SQL reports project (`dbt_like_sql/`): parse, resolve, run and test models in DuckDB."""
