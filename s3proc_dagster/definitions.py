"""The code location: everything under `defs/`, found and merged by Dagster's loader.

Importing it makes no directory and contacts no server, and reads one setting only:
POLL_INTERVAL_MS, leniently, because a sensor's interval is part of its definition
(`settings.poll_interval_s`). Resources load and check every other setting when a run or
a sensor tick starts (`defs/resources.py`).
"""

import functools
import warnings
from pathlib import Path

import dagster as dg

# Dagster 1.13 copies every sensor through an internal constructor that passes `owners`
# (None here) and so warns, on every load, that owners are beta; the product sets none.
warnings.filterwarnings("ignore", message="Parameter `owners` of initializer", category=dg.BetaWarning)


@functools.cache
def _load() -> dg.Definitions:
    """Built once per process: a run forked from the warm zygote (`runs/zygote.py`) finds
    them built instead of walking `defs/` again (about 2.4 CPU-s a run). They hold no
    setting, so nothing goes stale; a code change restarts the processes that hold them."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


@dg.definitions
def defs() -> dg.Definitions:
    return _load()
