"""s3proc_dagster: files from where they land to S3, converted, chunked, verified and tracked."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`s3proc_dagster.LandingZone`, the component's type name in defs.yaml, imported only
    when asked for: the `s3proc` command and the domain modules never load Dagster for it."""
    if name == "LandingZone":
        from s3proc_dagster.components import LandingZone

        return LandingZone
    raise AttributeError(f"module 's3proc_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "LandingZone"]
