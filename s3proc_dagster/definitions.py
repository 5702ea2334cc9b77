"""The code location: everything under `defs/`, found and merged by Dagster's loader.

Importing it reads no setting, makes no directory and contacts no server: resources load
the settings when a run or a sensor tick starts (see `defs/resources.py`).
"""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
