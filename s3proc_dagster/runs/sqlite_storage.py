"""Dagster's SQLite storage, with the event log keeping one SQLAlchemy engine per database.

Dagster's `SqliteEventLogStorage` builds a new engine for every event it writes, twice for
an asset event (the run's database, then the index shard), and disposes of it after: each
write pays the engine's creation and compiles its statements again, since SQLAlchemy caches
compiled SQL per engine. That is most of the 10-18 ms an event costs on SQLite, and a chunk
of a big file or a step of a small one is one or more events. Here each database keeps its
engine for the life of the process. The pool stays `NullPool`, as Dagster has it: every
write still opens its own SQLite connection (cheap, and safe across threads and across the
warm launcher's fork), only the engine and its statement cache are kept.

PostgreSQL deployments keep Dagster's own storage: its engine is made once already.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

#: Engines kept per process: a run writes to two (its own database and the index shard).
KEPT_ENGINES = 32


class KeptEngineEventLogStorage(SqliteEventLogStorage):
    """The event log whose databases (one per run, and the index shard) keep their engines,
    the most recently used `KEPT_ENGINES` of them: a webserver reading thousands of runs
    must not keep an engine and its statement cache for each."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        # set before Dagster's constructor, which may connect already (to reindex)
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        super().__init__(base_dir, inst_data=inst_data)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        # as Dagster's, but the engine is kept; `_db_lock` serializes this process's use of
        # the engines (as SQLite would its writers anyway), so one is never evicted in use
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def _engine(self, shard: str) -> Engine:
        engine = self._engines.get(shard)
        if engine is None:
            engine = create_engine(
                self.conn_string_for_shard(shard),
                poolclass=NullPool,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
            )
            self._engines[shard] = engine
            if len(self._engines) > KEPT_ENGINES:
                self._engines.popitem(last=False)[1].dispose()
        self._engines.move_to_end(shard)
        return engine


class SqliteStorage(DagsterSqliteStorage):
    """`storage: sqlite` as Dagster lays it out (runs, event logs and schedules under one
    `base_dir`), with `KeptEngineEventLogStorage` as its event log."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(base_dir, inst_data=inst_data)
        self._event_log_storage = KeptEngineEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> SqliteStorage:
        return cls(inst_data=inst_data, **dict(config_value))
