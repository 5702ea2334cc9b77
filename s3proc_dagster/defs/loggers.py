"""What Dagster itself prints to a run's terminal: nothing below an error unless LOG_LEVEL=debug.

Dagster's default console logger writes every event of every step (DEBUG and up) to the
run worker's stderr, which is the terminal of `s3proc process` and of `scripts/dev`: a
user would read Dagster's bookkeeping instead of the product's progress. This logger
replaces it with the same console logger at a level read when the run starts (never at
import): DEBUG with LOG_LEVEL=debug, else CRITICAL, because the product's own lines
(`logs.py`) already say what happens, once; under LOG_PRETTY=false its lines are JSON,
like the product's. The run's event log, what the UI shows, is not a logger and is
untouched.

Dagster instantiates a job's loggers only when the run config names them, and otherwise
its own console logger at the instance's `python_log_level` (which also gates what the
run's log captures), so every run the product makes names this one
(`runs.requests.CONSOLE_LOGGER`): the sensors', the command line's, and their
re-executions, which keep their run config. A run started from the Launchpad without it
gets Dagster's own console logger.
"""

import logging

import dagster as dg
from dagster._loggers import create_console_logger

from s3proc_dagster.logs import json_logger
from s3proc_dagster.settings import LoggingConfig


@dg.logger(description="Dagster's console logger, quiet unless LOG_LEVEL=debug, JSON under LOG_PRETTY=false.")
def console(_init_context: dg.InitLoggerContext) -> logging.Logger:
    try:
        config = LoggingConfig()
        debug, pretty = config.level == "debug", config.pretty
    except ValueError:  # a bad LOG_LEVEL is reported by the settings, with every other bad variable
        debug, pretty = False, True
    level = logging.DEBUG if debug else logging.CRITICAL
    return create_console_logger("dagster", level) if pretty else json_logger("dagster", level)
