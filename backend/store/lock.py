"""One worker per store: an exclusive lock taken before migrations, recovery and serving.

A worker marks the jobs a dead process left queued or running as failed (they cannot be
running anywhere else, DESIGN 2). That is only true while one process owns the store, so a
worker takes this lock first and a second worker on the same store refuses, touching nothing.

- SQLite: `flock` on `<database file>.lock` beside the database (the holder's pid is written
  into it for the refusal message). The kernel drops the lock when the process dies.
- PostgreSQL: a session-level advisory lock, held by one dedicated connection for the life of
  the worker (the server drops it when that connection closes).
- In-memory SQLite: nothing to share, no lock. Other backends: no guard (a warning).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.engine import Connection, make_url

from backend.errors import StoreBusyError

log = logging.getLogger(__name__)

# pg_try_advisory_lock's key: the bytes "PIEscope" as a signed 64-bit integer.
PG_LOCK_KEY = int.from_bytes(b"PIEscope", "big", signed=True)


class StoreLock:
    """`acquire()` or StoreBusyError; `release()` (idempotent). Also a context manager."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._file = None
        self._connection: Connection | None = None
        self._engine = None

    # -- taking and dropping the lock

    def acquire(self) -> StoreLock:
        parsed = make_url(self.url)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            if parsed.database not in (None, "", ":memory:"):
                self._flock(Path(parsed.database).expanduser())
        elif backend == "postgresql":
            self._advisory_lock()
        else:
            log.warning("no single-worker guard for %s stores: run one worker per store", backend)
        return self

    def release(self) -> None:
        if self._file is not None:
            import fcntl
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._connection is not None:
            self._connection.close()  # the advisory lock goes with its session
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @property
    def held(self) -> bool:
        return self._file is not None or self._connection is not None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- backends

    def _flock(self, database: Path) -> None:
        import fcntl
        database.parent.mkdir(parents=True, exist_ok=True)
        path = database.with_name(database.name + ".lock")
        handle = open(path, "a+")  # never truncate: the holder's pid is in there
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreBusyError(f"another PIEscope worker (pid {holder}) owns the store {database}; "
                                 "stop it first, or give this one its own PIESCOPE_DATA_DIR") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def _advisory_lock(self) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool
        self._engine = create_engine(self.url, poolclass=NullPool)
        connection = self._engine.connect()
        got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": PG_LOCK_KEY}).scalar()
        connection.commit()  # the lock is session-level: it outlives this transaction
        if not got:
            connection.close()
            self._engine.dispose()
            self._engine = None
            where = make_url(self.url).render_as_string(hide_password=True)
            raise StoreBusyError(f"another PIEscope worker owns the store {where}; stop it first, "
                                 "or give this one its own PIESCOPE_DB_URL")
        self._connection = connection
