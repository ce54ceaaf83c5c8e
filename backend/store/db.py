"""Engine and sessions of the store, and schema upgrades through Alembic.

SQLite (the default, a file under data_dir) is opened in WAL mode with a busy timeout so the
API's request threads and the job threads can read while a job writes. Any other URL
(e.g. ``postgresql+psycopg://...``) is used as given.

Writes: `transaction()` and `write_session()` mark their connection as a writer. On SQLite a
writer's transaction starts with BEGIN IMMEDIATE (the write lock first, then the reads), so a
read-modify-write such as an explanation's revision counter never interleaves with another
writer's; readers start a plain BEGIN and keep one snapshot. On PostgreSQL the queries lock
the rows they modify (SELECT ... FOR UPDATE).

The Alembic revisions live inside the package (`backend/store/migrations`), so an installed
wheel migrates its database exactly as a checkout does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from backend.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_MS = 30_000
# Connections: every request thread (anyio's threadpool: 40) may hold one while the event loop's
# cached circuit read takes another, plus the job threads. A smaller pool can run dry, and the
# event loop then blocks on checkout while the connections it waits for are only returned
# through it: 50 leaves room for all of them.
POOL_SIZE, POOL_OVERFLOW = 10, 40
WRITER = "piescope_writer"  # execution option: this connection's transaction will write


def prepare_sqlite_dir(url: str) -> None:
    """Create the directory of a file-based SQLite database (nothing for other backends)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def load_json(text: str | bytes) -> object:
    """A stored JSON document: orjson (a circuit's prompts decode ~3.5x faster than with json),
    json for the NaN tokens that stores written before FiniteJSON may still hold."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def make_engine(url: str) -> Engine:
    """An Engine for `url`; SQLite gets WAL, foreign keys on, a busy timeout, and thread sharing."""
    prepare_sqlite_dir(url)
    pool = {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, json_deserializer=load_json, **pool)
    if make_url(url).database in (None, "", ":memory:"):
        pool = {}  # one shared in-memory connection (SingletonThreadPool)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_MS / 1000},
                           json_deserializer=load_json, **pool)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record) -> None:
        # pysqlite would BEGIN (deferred) only before the first write, leaving earlier reads
        # outside the transaction; SQLAlchemy emits BEGIN itself instead (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        if make_url(url).database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(WRITER)
                                   else "BEGIN")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (they are turned into schemas later)."""
    return sessionmaker(engine, expire_on_commit=False)


def mark_writer(session: Session) -> Session:
    """Make `session`'s coming transaction a writer's (call before its first statement)."""
    session.connection(execution_options={WRITER: True})
    return session


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A writer's session that commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield mark_writer(session)


@contextmanager
def write_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A writer's session whose caller commits explicitly (uncommitted work is rolled back)."""
    with factory() as session:
        yield mark_writer(session)


def alembic_config(url: str):
    """An Alembic Config for `url` that does not touch the application's logging."""
    from alembic.config import Config
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logging"] = False
    return config


def upgrade_to_head(url: str) -> None:
    """Apply every pending migration to the database at `url` (creating it if needed)."""
    from alembic import command
    log.info("upgrading the store at %s to the newest schema", make_url(url).render_as_string(hide_password=True))
    command.upgrade(alembic_config(url), "head")


def downgrade_to(url: str, revision: str = "base") -> None:
    """Undo migrations down to `revision` ("base" drops every table)."""
    from alembic import command
    command.downgrade(alembic_config(url), revision)


def open_store(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """Upgrade the database of `settings` to head and return its engine and session factory."""
    url = settings.database_url
    upgrade_to_head(url)
    engine = make_engine(url)
    return engine, session_factory(engine)
