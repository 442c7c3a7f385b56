"""Cross-process locks for the two study operations that must not interleave between workers,
and the storage URL as it may be shown.

* **Schema creation.** Optuna creates its tables when an ``RDBStorage`` is first built on an empty
  database. Workers started together on a brand-new PostgreSQL database race there (measured:
  ``UniqueViolation ... pg_type_typname_nsp_index`` in 1-2 of 3 workers, 3 rounds of 3).
* **Claiming a trial slot.** "Count the trials, then create one" is two steps; six workers on a
  total of 24 finished 25. Counting and creating under one lock makes the budget exact.

The lock is the database's own where it has one (a PostgreSQL advisory lock, MySQL ``GET_LOCK``),
so workers on different machines exclude each other; for SQLite (one machine by nature) it is a
file lock beside the database file; for in-memory storages a process-local lock.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

from models.baseline import file_lock

_LOCAL = threading.Lock()
CONNECT_TIMEOUT_SECONDS = 10  # an unreachable or hung database answers in one line, not minutes


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (unchanged when it has none or does not
    parse): the only form of a storage URL that may be printed, logged or stored."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def lock_key(name: str) -> int:
    """A stable 31-bit key for ``name`` (PostgreSQL advisory locks take a bigint)."""
    return zlib.crc32(f"pareto-compress:{name}".encode()) & 0x7FFFFFFF


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for ``url``: a bounded connect time for server databases (libpq
    and PyMySQL take ``connect_timeout``), a busy timeout for SQLite files shared by local
    workers."""
    backend = url.split(":", 1)[0].split("+", 1)[0]
    if backend == "sqlite":
        return {"connect_args": {"timeout": 60}}
    if backend in ("postgresql", "mysql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS}}
    return {}




@contextmanager
def engine_lock(engine: Engine, name: str, sqlite_file: Path | None = None) -> Iterator[None]:
    """Hold the lock ``name`` on the database behind ``engine`` (see the module docstring)."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        key = lock_key(name)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()  # the lock is the session's, not the transaction's
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    elif dialect == "mysql":
        key_name = f"pareto-compress:{name}"[:64]
        with engine.connect() as conn:
            conn.execute(text("SELECT GET_LOCK(:n, -1)"), {"n": key_name})
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": key_name})
    elif sqlite_file is not None:
        with file_lock(sqlite_file.with_name(sqlite_file.name + f".{lock_key(name)}.lock")):
            yield
    else:
        with _LOCAL:
            yield


@contextmanager
def url_lock(url: str, name: str, sqlite_file: Path | None = None) -> Iterator[None]:
    """:func:`engine_lock` on a short-lived engine of its own, for use before an ``RDBStorage``
    exists (schema creation)."""
    if sqlite_file is not None:  # no engine needed: the lock is a file
        with file_lock(sqlite_file.with_name(sqlite_file.name + f".{lock_key(name)}.lock")):
            yield
        return
    engine = create_engine(url, **engine_kwargs(url))
    try:
        with engine_lock(engine, name):
            yield
    finally:
        engine.dispose()


def study_lock(storage: object, study_name: str) -> Callable[[], AbstractContextManager[None]]:
    """A factory of the lock that claims trial slots of ``study_name`` in ``storage`` (an
    ``RDBStorage``: the database's lock; anything else, e.g. in-memory: a process-local lock)."""
    engine = getattr(storage, "engine", None)
    if not isinstance(engine, Engine):
        return lambda: _local()
    url = str(getattr(storage, "url", ""))
    sqlite_file = None
    if engine.dialect.name == "sqlite" and url.startswith("sqlite:///") and ":memory:" not in url:
        sqlite_file = Path(url[len("sqlite:///"):])
    return lambda: engine_lock(engine, f"claim:{study_name}", sqlite_file)


@contextmanager
def _local() -> Iterator[None]:
    with _LOCAL:
        yield
