"""The product's Dagster components. `dg list components` lists them as `s3proc_dagster.<Name>`:
the `dagster_dg_cli.registry_modules` entry point (pyproject.toml) names the package, which
hands them out lazily (`s3proc_dagster.__getattr__`)."""

from s3proc_dagster.components.landing_zone import LandingZone

__all__ = ["LandingZone"]
