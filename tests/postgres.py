"""A throw-away PostgreSQL cluster for the tests and benchmarks (`PgCluster`).

The binaries come from Debian's `postgresql` package (/usr/lib/postgresql/<version>/bin); when
none are found and we are root, the package is installed with apt-get. The cluster lives in a
temporary directory, listens on a Unix socket in that directory only (no TCP port, so parallel
runs cannot collide), trusts local connections and skips fsync. initdb refuses to run as root,
so as root the server runs as the `postgres` user (Debian's package creates it) or `nobody`.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PG_GLOB = "/usr/lib/postgresql/*/bin/initdb"
SUPERUSER = "piescope"


class PgUnavailable(RuntimeError):
    """No PostgreSQL binaries and no way to install them."""


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in path.parent.parent.name.split("."))
    except ValueError:
        return (0,)


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted((Path(p) for p in Path("/").glob(PG_GLOB.lstrip("/"))), key=_version_key)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def ensure_bin_dir() -> Path:
    """find_bin_dir(), installing Debian's `postgresql` package first when missing (root only)."""
    found = find_bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PgUnavailable("no PostgreSQL binaries (initdb) found; install Debian's 'postgresql' package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    found = find_bin_dir()
    if found is None:
        raise PgUnavailable("apt-get installed 'postgresql' but no initdb was found")
    return found


def _server_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PgUnavailable("running as root, and neither a 'postgres' nor a 'nobody' user exists to run the server")


class PgCluster:
    """initdb + pg_ctl start in a temp dir; `database()` makes a fresh, empty database and its URL."""

    def __init__(self) -> None:
        self.bin = ensure_bin_dir()
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="piescope-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self._names = itertools.count()
        self._started = False

    # -- lifecycle

    def _run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)

    def start(self) -> PgCluster:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
            options = (f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                      "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as err:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            self.stop()
            raise PgUnavailable(f"PostgreSQL did not start: {err.stderr or err.stdout}\n{log[-2000:]}") from None
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                pass
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- databases

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.socket_dir}"

    def _admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(host=str(self.socket_dir), user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def database(self, prefix: str = "t") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop(self, url: str) -> None:
        name = url.split("@/", 1)[1].split("?", 1)[0]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
