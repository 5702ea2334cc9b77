"""The code location: everything under `defs/`, found and merged by Dagster's loader.

Importing it makes no directory and contacts no server, and reads two settings only:
POLL_INTERVAL_MS, leniently, because a sensor's interval is part of its definition
(`settings.poll_interval_s`), and S3PROC_ZONES_DIR, where a deployment may declare landing
zones outside `defs/` (`components.landing_zone.zones_in`). Resources load and check every other setting when a run or
a sensor tick starts (`defs/resources.py`).
"""

import functools
import os
import warnings
from pathlib import Path

import dagster as dg

# Dagster 1.13 copies every sensor through an internal constructor that passes `owners`
# (None here) and so warns, on every load, that owners are beta; the product sets none.
ZONES_DIR = "S3PROC_ZONES_DIR"  # a folder of <zone>/defs.yaml, read when the definitions load
warnings.filterwarnings("ignore", message="Parameter `owners` of initializer", category=dg.BetaWarning)


@functools.cache
def _load() -> dg.Definitions:
    """Built once per process: a run forked from the warm zygote (`runs/zygote.py`) finds
    them built instead of walking `defs/` again (about 2.4 CPU-s a run). They hold no
    setting, so nothing goes stale; a code change restarts the processes that hold them."""
    from s3proc_dagster.components.landing_zone import zones_in
    from s3proc_dagster.defs.files.sensors import zone_sensors

    here = Path(__file__).parent
    loaded = [dg.load_from_defs_folder(path_within_project=here)]
    if os.environ.get(ZONES_DIR):  # zones declared beside the deployment rather than in defs/
        loaded.append(zones_in(Path(os.environ[ZONES_DIR]), here.parent))
    # landing zones' sensors: made once their components declared them, with the jobs they start
    return dg.Definitions.merge(*loaded, dg.Definitions(sensors=zone_sensors()))


@dg.definitions
def defs() -> dg.Definitions:
    return _load()
