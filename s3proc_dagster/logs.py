"""The product's own log lines: LOG_LEVEL and LOG_PRETTY (the specification's LoggingConfig).

Pretty is one readable line per event for a terminal; otherwise each line is a JSON
object (time, level, logger, message, and the file's `fileId` when the line is about a
file), for log shippers. Every process that runs product code configures the `s3proc`
logger once, from the settings: the `s3proc` command at start, a run or a sensor tick
when it first loads the settings (`defs/resources.py:Settings`). The logger is also one
of the instance's managed Python loggers (`runs/instance.py:instance_config`), so the same
lines, at the same level, reach each run's log in the UI. Dagster's own per-step event
lines stay out of the terminal unless LOG_LEVEL=debug (`defs/loggers.py`). Messages never
carry secrets: settings are `SecretStr` and errors name variables, not values.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from s3proc_dagster.settings import LoggingConfig

LOGGER = "s3proc"
# A file's progress through the steps, for the terminal (`s3proc process`, scripts/dev) and
# the run's stderr: named below `s3proc` for log shippers, but it does not propagate, so the
# handler Dagster adds to the managed `s3proc` logger never sees it and these lines cost no
# row in a run's event log, where each step's own events already say the same.
PROGRESS = f"{LOGGER}.progress"
logging.getLogger(PROGRESS).propagate = False  # from the first import: never a row, configured or not
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
PRETTY_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            payload["error"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the line, not at the time the
    handler was made: Dagster swaps it to capture a step's output."""

    _s3proc = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(config: LoggingConfig) -> logging.Logger:
    """Set the `s3proc` logger's level and format; idempotent, so a process that loads the
    settings again (a run after a sensor tick in one code server) changes nothing twice.

    The logger does not propagate: its lines are written once, by its own handler, and
    reach a run's event log through the handler Dagster adds to managed loggers."""
    for name in (LOGGER, PROGRESS):
        logger = logging.getLogger(name)
        logger.setLevel(LEVELS[config.level])
        logger.propagate = False
        handler = next((h for h in logger.handlers if getattr(h, "_s3proc", False)), None)
        if handler is None:
            handler = _StderrHandler()
            logger.addHandler(handler)
        handler.setFormatter(logging.Formatter(PRETTY_FORMAT) if config.pretty else JsonFormatter())
    return logging.getLogger(LOGGER)


def json_logger(name: str, level: int) -> logging.Logger:
    """A logger of its own (not in logging's registry) writing JSON lines to stderr: what
    Dagster's console lines become under LOG_PRETTY=false (`defs/loggers.py`), so a log
    shipper reads one format."""
    logger = logging.Logger(name, level)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    return logger


def get_logger(name: str) -> logging.Logger:
    """A product logger whose lines also reach the run's logs in the UI: outcomes, warnings."""
    return logging.getLogger(f"{LOGGER}.{name}")


def progress_logger(name: str) -> logging.Logger:
    """A logger for what a step is doing, shown where the product runs, not kept per run."""
    return logging.getLogger(f"{PROGRESS}.{name}")


def about(file_id: str, **fields: object) -> dict[str, dict[str, object]]:
    """`extra=` for a line about one file: its fileId (and more) as JSON fields."""
    return {"fields": {"fileId": file_id, **fields}}
