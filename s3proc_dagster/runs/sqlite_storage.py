"""Dagster's SQLite storage, with an event log that costs a third of Dagster's per event.

Dagster's `SqliteEventLogStorage` builds a new engine for every event it writes, twice for
an asset event (the run's database, then the index shard), and disposes of it after. So
each write pays the engine's creation, compiles its statements again (SQLAlchemy caches
compiled SQL per engine), and closes the database's last connection, which makes SQLite
checkpoint its WAL into the file with two fsyncs; every commit fsyncs too. A chunk of a big
file is one such event, a step of a small file several: measured, 8.5-10 ms a
materialization (`benchmarks/event_cost.py`), written one at a time under Dagster's lock
while the landing threads wait. Here:

- each database keeps its engine (the most recently used `KEPT_ENGINES` of them);
- the index shard, which every asset event is mirrored to, keeps one open connection: no
  checkpoint at every write, SQLite checkpoints every 1,000 pages on its own;
- a run's own database still closes its connection after each write, as Dagster's does:
  the UI follows a running run by watching that file change (`watch`), and only the
  checkpoint at close changes it;
- `synchronous=NORMAL`, SQLite's recommended setting for WAL: a commit is not fsynced, the
  checkpoint is. A database is never corrupted by a crash; an OS crash or a power cut may
  lose the last events written before it, a process crash (`kill -9`) loses none.

Measured: 3.6-4.9 ms a materialization, 2.4-2.8 ms a step event. PostgreSQL deployments
keep Dagster's own storage (its engine is made once already).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool, QueuePool

#: Engines kept per process: a run writes to two (its own database and the index shard);
#: a webserver reading thousands of runs must not keep an engine and its cache for each.
KEPT_ENGINES = 32

_LIVE: weakref.WeakSet[KeptEngineEventLogStorage] = weakref.WeakSet()


class KeptEngineEventLogStorage(SqliteEventLogStorage):
    """The event log whose databases keep their engines, the index shard its connection."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        # set before Dagster's constructor, which may connect already (to reindex)
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        super().__init__(base_dir, inst_data=inst_data)
        _LIVE.add(self)

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
            # one connection kept for the index (used under `_db_lock` only, so by one
            # thread at a time); none for a run's database, so its file changes at each write
            pool: dict[str, Any] = (
                {"poolclass": QueuePool, "pool_size": 1, "max_overflow": 0}
                if shard == INDEX_SHARD_NAME
                else {"poolclass": NullPool}
            )
            engine = create_engine(
                self.conn_string_for_shard(shard),
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
                **pool,
            )
            event.listen(engine, "connect", _synchronous_normal)
            self._engines[shard] = engine
            if len(self._engines) > KEPT_ENGINES:
                self._engines.popitem(last=False)[1].dispose()
        self._engines.move_to_end(shard)
        return engine

    def dispose(self) -> None:
        super().dispose()
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    def _after_fork(self) -> None:
        """In a forked child (the warm launcher's runs): leave the parent's open connection
        to it, as SQLAlchemy advises; the child opens its own when it first writes."""
        for engine in self._engines.values():
            engine.dispose(close=False)


def _synchronous_normal(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _after_fork_in_child() -> None:
    for storage in list(_LIVE):
        storage._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SqliteStorage(DagsterSqliteStorage):
    """`storage: sqlite` as Dagster lays it out (runs, event logs and schedules under one
    `base_dir`), with `KeptEngineEventLogStorage` as its event log."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(base_dir, inst_data=inst_data)
        self._event_log_storage = KeptEngineEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> SqliteStorage:
        return cls(inst_data=inst_data, **dict(config_value))
