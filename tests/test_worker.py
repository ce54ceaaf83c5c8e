"""The worker process: one worker per store, `piescope serve`'s refusals, and the built wheel
installed outside the checkout (on both store backends where a store is involved)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from backend.cli import main
from backend.errors import StoreBusyError
from backend.settings import Settings
from backend.store.db import make_engine, session_factory, transaction, upgrade_to_head
from backend.store.lock import StoreLock
from backend.store import queries
from tests.api_fixtures import pg_cluster, store_settings, store_url, tiny_cache  # noqa: F401 (fixtures)
from tests.test_api import Counter, counting_app, wait_for

ROOT = Path(__file__).resolve().parents[1]


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `piescope` process on the same store as `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIESCOPE_")}
    env.update(PIESCOPE_DATA_DIR=str(settings.data_dir), PIESCOPE_MODELS_CACHE=str(settings.models_cache),
               PYTHONPATH=str(ROOT), **extra)
    if settings.db_url:
        env["PIESCOPE_DB_URL"] = settings.db_url
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_rows(settings: Settings) -> list[tuple]:
    """Every job's (id, status, progress, message, error, started_at, finished_at), read directly."""
    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as s:
            rows, _ = queries.list_jobs(s, limit=500)
            return [(j.id, j.status, j.progress, j.message, j.error, j.started_at, j.finished_at) for j in rows]
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------ one worker per store

def test_the_store_lock_admits_one_holder(store_settings):
    url = store_settings.database_url
    with StoreLock(url) as first:
        assert first.held
        with pytest.raises(StoreBusyError, match="another PIEscope worker"):
            StoreLock(url).acquire()
    with StoreLock(url) as again:  # released: the next worker may take it
        assert again.held


def test_a_second_worker_on_the_same_store_refuses_and_touches_nothing(store_settings):
    counter = Counter(timeout=600)  # the first worker's job waits for the second worker's attempt
    counter.gate.clear()
    with TestClient(counting_app(store_settings, counter)) as first:
        executor = first.app.state.executor
        running, _ = executor.submit("count", {"steps": 2, "tag": "running"})
        queued, _ = executor.submit("count", {"steps": 2, "tag": "queued"})
        wait_for(first, running.id, {"running"})
        before = job_rows(store_settings)
        assert [r[1] for r in before] == ["queued", "running"]

        second = subprocess.run([sys.executable, "-m", "backend.cli", "serve", "--port", str(free_port())],
                                env=worker_env(store_settings), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("piescope: error: another PIEscope worker"), lines
        assert job_rows(store_settings) == before  # nothing marked failed, nothing moved

        counter.gate.set()  # the first worker goes on with its jobs
        assert wait_for(first, running.id, {"done", "failed"})["status"] == "done"
        assert wait_for(first, queued.id, {"done", "failed"})["status"] == "done"


def test_a_taken_port_is_refused_before_the_store_is_touched(store_settings):
    url = store_settings.database_url
    upgrade_to_head(url)
    engine = make_engine(url)
    with transaction(session_factory(engine)) as s:
        job = queries.create_job(s, "prune", {"x": 1}, "a" * 64, "cpu")
        job.status = "running"  # as a dead worker left it: only a worker that starts may recover it
    engine.dispose()
    before = job_rows(store_settings)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)],
                                env=worker_env(store_settings), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines
    assert job_rows(store_settings) == before


# ------------------------------------------------------------------------------ who may listen where

@pytest.mark.parametrize("argv, env, message", [
    (["serve", "--host", "0.0.0.0"], {}, "needs PIESCOPE_API_TOKEN"),
    (["serve"], {"PIESCOPE_API_HOST": "0.0.0.0"}, "needs PIESCOPE_API_TOKEN"),
    (["serve"], {"PIESCOPE_API_TOKEN": ""}, "PIESCOPE_API_TOKEN is set but empty"),
    (["serve", "--host", "0.0.0.0"], {"PIESCOPE_API_TOKEN": "  "}, "PIESCOPE_API_TOKEN is set but empty"),
])
def test_serve_refuses_with_one_line(argv, env, message, tmp_path, monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("PIESCOPE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIESCOPE_DATA_DIR", str(tmp_path / "data"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no .env file from the checkout
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "data").exists()  # refused before the store was opened


# ------------------------------------------------------------------------------ the wheel, outside the checkout

def build_and_install(tmp: Path) -> Path:
    """Build the wheel from a copy of the package sources, install it into a fresh venv; returns its bin/.

    The venv gets no dependencies of its own: a .pth file points at this interpreter's
    site-packages (torch & co.), so the install takes seconds. Only the wheel provides `backend`.
    """
    src = tmp / "src"
    # Outside the checkout: its editable install's piescope.egg-info must not be on any path pip sees.
    run = {"cwd": tmp, "env": {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
           "check": True, "capture_output": True, "text": True}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in ("backend", "frontend_dash"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "wheel"), str(src)], **run)
    wheel = next((tmp / "wheel").glob("piescope-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **run)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               **run).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], **run)
    assert (site / "backend" / "store" / "migrations" / "env.py").is_file(), "the wheel was not installed"
    # After the install: with the .pth first, pip would see this checkout's editable piescope and skip.
    (site / "piescope-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin"


def test_the_wheel_serves_outside_the_checkout(tmp_path):
    bin_dir = build_and_install(tmp_path / "build")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIESCOPE_", "PYTHON"))}
    env.update(PIESCOPE_DATA_DIR=str(tmp_path / "data"), PIESCOPE_MODELS_CACHE=str(tmp_path / "models_cache"))
    where = subprocess.run([str(bin_dir / "python"), "-c", "import backend, backend.store.db as db; "
                            "print(backend.__file__); print(db.MIGRATIONS_DIR)"], cwd=tmp_path, env=env,
                           check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(tmp_path / "build" / "venv") for p in where), where
    assert (Path(where[1]) / "versions").is_dir()

    port = free_port()
    server = subprocess.Popen([str(bin_dir / "piescope"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the installed worker did not answer"
                time.sleep(0.5)
        assert health.json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/api/jobs").json()["total"] == 0  # migrated
        assert (tmp_path / "data" / "piescope.db").is_file()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
