"""Browser-test plumbing: the real API and the Dash app on loopback ports, and headless Chromium.

- `start_api(settings)`: uvicorn serving `create_app(settings)` in a
  thread on 127.0.0.1 and an ephemeral port.
- `start_dash(settings)`: the Dash app on werkzeug's threaded server, same.
- `ensure_chromium()`: Debian's `chromium` and `chromium-driver`, installed with apt-get when
  missing (fails with a clear message when that is impossible; never skips).
- `new_driver(profile_dir)`: headless Chromium through selenium with browser console logging.
Fixtures: `dash_stack` (session: tiny model cache, temp SQLite, an API token, one circuit with its
graph and one sweep computed through the API) and `driver` (session: one browser).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.settings import Settings
from tests.api_fixtures import TINY_CLT, TINY_MODEL, tiny_cache  # noqa: F401  (fixture re-export)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
TOKEN = "dashboard-test-token"
DATASET = {"model": TINY_MODEL, "transcoder": TINY_CLT, "task": "ioi", "n": 3, "seed": 0}


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_api(settings: Settings, timeout: float = 60.0) -> tuple[str, Callable[[], None]]:
    """Serve the API in a thread; returns (base URL, stop)."""
    import uvicorn

    from backend.api.app import create_app

    app = create_app(settings)
    sock = _loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="piescope-api")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    return url, stop


def start_dash(settings: Settings) -> tuple[str, Callable[[], None]]:
    """Serve the Dash app (talking to settings.api_url) in a thread; returns (base URL, stop)."""
    from werkzeug.serving import make_server

    from frontend_dash.app import create_dash_app

    server = make_server("127.0.0.1", 0, create_dash_app(settings).server, threaded=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="piescope-dash")
    thread.start()

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=15)
    return f"http://127.0.0.1:{server.server_port}", stop


def ensure_chromium() -> None:
    """Install Debian's chromium + chromium-driver when either binary is missing."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing and there is no apt-get to install them: "
                    "install Chromium and its driver (Debian: chromium, chromium-driver)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            pytest.fail(f"could not install Chromium for the browser tests: `{' '.join(cmd)}` exited "
                        f"{done.returncode}: {done.stderr.strip()[-800:]}")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} or {CHROMEDRIVER} is still missing")


def new_driver(profile_dir: Path):
    """Headless Chromium (fresh profile) with the browser console log enabled."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def severe_console_entries(driver) -> list[dict[str, Any]]:
    """SEVERE browser console entries since the last call (the log is drained by reading it)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def run_job(client: httpx.Client, kind: str, params: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Submit a job through the API and wait until it ends; returns the final job."""
    response = client.post("/api/jobs", json={"kind": kind, "params": params})
    assert response.status_code in (200, 202), response.text
    job = response.json()
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job['id']} did not finish: {job}")
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done", job
    return job


@dataclass
class DashStack:
    """The running servers and what was seeded into the store."""

    api_url: str
    dash_url: str
    api: httpx.Client          # authorised client of the API, for seeding and checking
    circuit_id: int
    sweep_id: int
    settings: Settings         # the API's settings (its database), for seeding what has no endpoint


@pytest.fixture(scope="session")
def dash_stack(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashStack]:  # noqa: F811
    """API + Dash on the tiny model, an API token for writes, one circuit (with graph) and a sweep."""
    data = tmp_path_factory.mktemp("dash_data")
    settings = Settings(models_cache=tiny_cache, data_dir=data, db_url=None, api_token=TOKEN, device="cpu",
                        dtype="float32", _env_file=None)
    api_url, stop_api = start_api(settings)
    try:
        settings = settings.model_copy(update={"api_url": api_url})
        api = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        prune = run_job(api, "prune", {**DATASET, "method": "fap", "k": 4, "batch_size": 2})
        run_job(api, "graph", {"circuit_id": prune["circuit_id"]})
        sweep = run_job(api, "sweep", {**DATASET, "methods": ["fap", "random"], "ks": [2, 4], "random_seeds": 1,
                                       "batch_size": 2})
        dash_url, stop_dash = start_dash(settings)
        try:
            yield DashStack(api_url, dash_url, api, prune["circuit_id"], sweep["sweep_id"], settings)
        finally:
            stop_dash()
            api.close()
    finally:
        stop_api()


@pytest.fixture(scope="session")
def driver(tmp_path_factory: pytest.TempPathFactory):
    """One headless Chromium for the session."""
    ensure_chromium()
    browser = new_driver(tmp_path_factory.mktemp("chromium_profile"))
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()
