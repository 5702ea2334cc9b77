"""The code location: one `dg.Definitions` with every job, sensor and resource."""

from __future__ import annotations

import dagster as dg

from s3proc_dagster.defs.resources import build_resources
from s3proc_dagster.settings import load_configuration

config = load_configuration()

defs = dg.Definitions(
    resources=build_resources(config),
)
