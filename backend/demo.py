"""`make demo`: the main job on the embedded Gemma-3-270M model, from nothing to a dashboard.

1. the demo model (converted once from the GGUF in its PyPI package into models_cache);
2. its CLT (trained once, ~20 minutes on 2 cores, then reused);
3. the worker API, with an IOI sweep, a FAP circuit and its attribution graph stored through it
   (identical requests are served from the store, so a second `make demo` starts in seconds);
4. the dashboard, whose URL is printed. Ctrl-C stops both servers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from backend.errors import UserError
from backend.settings import Settings

DEMO_TRANSCODER_DIR = "clt"
SWEEP_N = 50
PRUNE_N = 20


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def demo_jobs(model: str, transcoder: str) -> list[tuple[str, dict[str, Any]]]:
    """The jobs the demo stores: an IOI sweep and a FAP circuit (its graph follows)."""
    dataset = {"model": model, "transcoder": transcoder, "task": "ioi"}
    return [
        ("sweep", {**dataset, "n": SWEEP_N, "methods": ["fap", "activation-magnitude", "random"],
                   "ks": [50, 100, 200, 400, 800]}),
        ("prune", {**dataset, "n": PRUNE_N, "method": "fap", "k": 50}),
    ]


def run_demo(settings: Settings, n: int = 20, serve: bool = True) -> None:
    from backend.circuits.behaviour import behaviour
    from backend.demo_clt import ensure_demo_clt
    from backend.models.loading import load_model
    from backend.models.registry import DEMO_MODEL
    from backend.tasks import get_task

    adapter = load_model(DEMO_MODEL, settings, report=_say)
    batch = get_task("ioi").build(adapter.tokenizer, n, seed=0)
    result = behaviour(adapter, batch)
    _say(f"{DEMO_MODEL}: {adapter.n_layers} layers, d_model {adapter.d_model}; IOI on {len(batch)} prompts, "
         f"M = logit(IO) - logit(S): clean {result.clean.mean():.2f}, ABC-corrupted {result.corrupted.mean():.2f}")
    ensure_demo_clt(settings, adapter, report=_say)
    del adapter  # the worker loads its own copy
    if not serve:
        return
    transcoder = f"{DEMO_MODEL}/{DEMO_TRANSCODER_DIR}"
    with ExitStack() as stack:
        logs = Path(settings.data_dir)
        logs.mkdir(parents=True, exist_ok=True)
        api = stack.enter_context(_server([sys.executable, "-m", "backend.cli", "serve"], logs / "worker.log"))
        client = stack.enter_context(httpx.Client(base_url=settings.api_url, timeout=30,
                                                  headers=_auth(settings)))
        _wait_healthy(client, api)
        circuit_id = None
        for kind, params in demo_jobs(DEMO_MODEL, transcoder):
            job = _run_job(client, kind, params)
            circuit_id = job.get("circuit_id") or circuit_id
        if circuit_id is not None:
            _run_job(client, "graph", {"circuit_id": circuit_id, "prompt": 0})
        dash = stack.enter_context(_server([sys.executable, "-m", "backend.cli", "dash"], logs / "dashboard.log"))
        url = f"http://{settings.dash_host}:{settings.dash_port}/"
        print(f"\nPIEscope is running:\n  dashboard  {url}\n  worker API {settings.api_url}/docs\n"
              f"  logs       {logs / 'worker.log'}, {logs / 'dashboard.log'}\nPress Ctrl-C to stop.", flush=True)
        try:
            while api.poll() is None and dash.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping", file=sys.stderr)


def _auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}


class _server:
    """A child process, its output appended to a log file, terminated when the block ends."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log

    def __enter__(self) -> subprocess.Popen:
        self.out = open(self.log, "a")
        self.proc = subprocess.Popen(self.argv, stdout=self.out, stderr=subprocess.STDOUT)
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.out.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _wait_healthy(client: httpx.Client, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError("the worker API exited at start-up (is port 8000 in use? set PIESCOPE_API_PORT "
                            "and PIESCOPE_API_URL); see data/worker.log")
        try:
            if client.get("/api/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise UserError(f"the worker API did not answer within {timeout:.0f} s")


def _run_job(client: httpx.Client, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Submit a job and follow its progress with a bar; returns the finished job."""
    from tqdm import tqdm
    answer = client.post("/api/jobs", json={"kind": kind, "params": params})
    if answer.status_code >= 400:
        raise UserError(f"the worker refused the {kind} job: {answer.json().get('detail', answer.text)}")
    job = answer.json()
    with tqdm(total=100, desc=f"{kind} job {job['id']}", unit="%") as bar:
        while job["status"] in ("queued", "running"):
            time.sleep(1)
            job = client.get(f"/api/jobs/{job['id']}").json()
            bar.n = int(100 * (job.get("progress") or 0))
            bar.set_postfix_str((job.get("message") or "")[:50])
            bar.refresh()
        bar.n = 100
        bar.refresh()
    if job["status"] != "done":
        raise UserError(f"the {kind} job ended {job['status']}: {job.get('error') or job.get('message')}")
    return job
