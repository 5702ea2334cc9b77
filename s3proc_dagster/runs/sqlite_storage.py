"""Dagster's SQLite storage, with an event log that costs a third of Dagster's per event.

Dagster's `SqliteEventLogStorage` builds a new engine for every event it writes, twice for
an asset event (the run's database, then the index shard), and disposes of it after. So
each write pays the engine's creation, compiles its statements again (SQLAlchemy caches
compiled SQL per engine), and closes the database's last connection, which makes SQLite
checkpoint its WAL into the file, with two fsyncs; every commit fsyncs too. A chunk of a
big file is one such event, a step of a small file several, written one at a time under
Dagster's lock while the landing threads wait, and the fsyncs queue behind the chunk files
the conversion and SeaweedFS write to the same disk. Here:

- each database keeps its engine and one open connection (the most recently used
  `KEPT_ENGINES` of them): no checkpoint at every write, SQLite checkpoints every 1,000
  pages on its own, and when the process ends;
- `synchronous=NORMAL`, SQLite's recommended setting for WAL: a commit is not fsynced, a
  checkpoint is. A database is never corrupted by a crash; an OS crash or a power cut may
  lose the last events written before it, a process crash (`kill -9`) loses none;
- the UI follows a running run by watching its database file change (`watch`); a commit
  now changes the file's WAL, so a watch looks at both.

Measured (`benchmarks/event_cost.py`): about 4 ms a materialization, where Dagster's
storage takes 8.5-10. PostgreSQL deployments keep Dagster's own storage (its engine is made
once already).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster._core.storage.event_log.base import EventHandlerFn
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool, QueuePool
from watchdog.events import FileSystemEvent
from watchdog.observers import Observer

#: Engines (each with one open connection) kept per process: a run writes to two, its own
#: database and the index shard; a webserver reading thousands of runs keeps the latest.
KEPT_ENGINES = 32

_LIVE: weakref.WeakSet[KeptEngineEventLogStorage] = weakref.WeakSet()


class KeptEngineEventLogStorage(SqliteEventLogStorage):
    """The event log whose databases keep their engines and an open connection each."""

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
            if shard not in self._initialized_dbs:
                # a throwaway engine, as Dagster's: creating the tables takes two connections
                self._initdb(self._new_engine(shard, poolclass=NullPool))
                self._initialized_dbs.add(shard)
            engine = self._engine(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def _engine(self, shard: str) -> Engine:
        engine = self._engines.get(shard)
        if engine is None:
            # one connection, used under `_db_lock` only, so by one thread at a time
            engine = self._new_engine(shard, poolclass=QueuePool, pool_size=1, max_overflow=0)
            self._engines[shard] = engine
            if len(self._engines) > KEPT_ENGINES:
                self._engines.popitem(last=False)[1].dispose()
        self._engines.move_to_end(shard)
        return engine

    def _new_engine(self, shard: str, **pool: Any) -> Engine:
        engine = create_engine(
            self.conn_string_for_shard(shard),
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            **pool,
        )
        event.listen(engine, "connect", _synchronous_normal)
        return engine

    def watch(self, run_id: str, cursor: str | None, callback: EventHandlerFn) -> None:
        # as Dagster's, with a watchdog that also wakes on the run's WAL
        if not self._obs:
            self._obs = Observer()
            self._obs.start()
        watchdog = _RunLogWatchdog(self, run_id, callback, cursor)
        self._watchers[run_id][callback] = (watchdog, self._obs.schedule(watchdog, self._base_dir, recursive=True))

    def wipe(self) -> None:
        self._close_all()  # the run databases' files go: no connection may stay open on them
        super().wipe()

    def dispose(self) -> None:
        super().dispose()
        self._close_all()

    def _close_all(self) -> None:
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    def _after_fork(self) -> None:
        """In a forked child (the warm launcher's runs): leave the parent's open connection
        to it, as SQLAlchemy advises; the child opens its own when it first writes."""
        for engine in self._engines.values():
            engine.dispose(close=False)


class _RunLogWatchdog(SqliteEventLogStorageWatchdog):
    """Dagster's watch of a run's database, woken by its WAL too: with the writer's
    connection kept open, a commit changes only the WAL until the next checkpoint."""

    def __init__(self, storage: KeptEngineEventLogStorage, run_id: str, callback: EventHandlerFn, cursor: str | None):
        super().__init__(storage, run_id, callback, cursor)
        self._patterns = [self._log_path, f"{self._log_path}-wal"]  # watchdog keeps no setter for them

    def on_modified(self, event: FileSystemEvent) -> None:
        self._process_log()


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
