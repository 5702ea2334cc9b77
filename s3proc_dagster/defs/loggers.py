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

A sensor's `context.log` has the same habit outside runs: Dagster gives every tick a
console logger of its own at INFO, in its own format, so the code server printed the
watch sensor's "2 file(s) still being written" under LOG_LEVEL=error and as a colored
line under LOG_PRETTY=false. `tick_log` keeps the tick's captured log (what the UI shows
under the sensor's ticks) and sends the terminal's copy through the product's logger.
"""

import logging

import dagster as dg
from dagster._core.definitions.instigation_logger import DispatchingLogHandler
from dagster._loggers import create_console_logger

from s3proc_dagster.logs import LEVELS, get_logger, json_logger
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


class _ThroughTheProduct(logging.Handler):
    """A tick's line on the terminal as the product writes its own: `s3proc.sensors`, at
    LOG_LEVEL, pretty or JSON, `<sensor>: <message>` (the sensor's name as Dagster noted it
    on the record, in a tick the daemon asked for)."""

    def emit(self, record: logging.LogRecord) -> None:
        noted = getattr(record, "dagster_meta", None) or {}
        message = noted.get("orig_message") or record.getMessage()
        get_logger("sensors").log(record.levelno, f"{noted['name']}: {message}" if noted.get("name") else message)


def tick_log(context: dg.SensorEvaluationContext, config: LoggingConfig) -> logging.Logger:
    """The tick's `context.log` at LOG_LEVEL, its terminal copy through the product's
    logger instead of Dagster's console logger (which wrote every line at INFO, colored)."""
    log = context.log
    if not any(isinstance(h, _ThroughTheProduct) for h in log.handlers):
        for handler in [h for h in log.handlers if isinstance(h, DispatchingLogHandler)]:
            log.removeHandler(handler)
        log.addHandler(_ThroughTheProduct())
    log.setLevel(LEVELS[config.level])
    return log
