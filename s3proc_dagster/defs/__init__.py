"""The Dagster layer: thin wiring of the domain modules into resources, ops, jobs and sensors."""
