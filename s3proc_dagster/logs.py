"""The product's own log lines: LOG_LEVEL and LOG_PRETTY (seed LoggingConfig).

Pretty is one readable line per event for a terminal; otherwise each line is a JSON
object, for log shippers. The `s3proc` logger is also a Dagster managed logger (see the
instance's `python_logs`), so the same lines reach each run's log in the UI. Messages
never carry secrets: settings are `SecretStr` and errors name variables, not values.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from s3proc_dagster.settings import LoggingConfig

LOGGER = "s3proc"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            payload["error"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(config: LoggingConfig) -> logging.Logger:
    """Idempotent: the code location may be loaded several times in one process."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(_LEVELS[config.level])
    handler = next((h for h in logger.handlers if getattr(h, "_s3proc", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._s3proc = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s") if config.pretty else JsonFormatter()
    )
    return logger


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER}.{name}")
