"""How the product's Dagster runs are created, tagged and watched (Dagster-facing, no definitions)."""
