"""`make demo`: the main job on the embedded Gemma-3-270M model, from nothing to a dashboard.

1. the demo model (converted once from the GGUF in its PyPI package into models_cache);
2. its CLT (trained once, ~20 minutes on 2 cores, then reused);
3. the worker API, with an IOI sweep, a FAP circuit and its attribution graph stored through it,
   and for Compare and the supernodes a FAP-Synergy circuit, an EAP and a HAP edge circuit and a
   HAGD hierarchy on IOI (`demo_jobs`);
4. PIE's Interpret and Evaluate on that circuit: the features of the graph's nodes are harvested,
   explained and FADE-scored (`interp_jobs`: offline explainer and proxy rater by default, the
   LLM endpoint when PIESCOPE_LLM_BASE_URL and PIESCOPE_LLM_MODEL are set), so every feature node
   of the graph opens a feature page with examples, an explanation and scores labelled by rater;
5. the dashboard, whose URL is printed. Ctrl-C stops both servers.
Every step is a job with a progress bar; identical requests are served from the store, so a
second `make demo` reuses everything and starts in seconds. Ports and the data directory come
from the settings (PIESCOPE_API_PORT, PIESCOPE_DASH_PORT, PIESCOPE_DATA_DIR...), passed on to
the servers it starts.
"""

from __future__ import annotations

import os
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
GRAPH_PROMPT = 0
# The demo steers 4 prompts x 8 tokens per factor (the score job's default is 8 x 16, ~4x the
# cost): steering is most of the demo's interpretation time on two CPU cores.
DEMO_STEERING = {"n_steer_prompts": 4, "n_new_tokens": 8}
# Compare's second family: edge circuits on 8 prompts at ~300 of the graph's edges (EAP's
# ~94% sparsity in bench/hap_vs_ep.py); HAP's mask training cut to 20 steps (far from converged,
# the reference is 3,000: the demo shows the method, bench/hap_vs_ep.py measures it).
EDGE_N, EDGE_COUNT = 8, 300
HAP_DEMO = {"max_steps": 20, "warmup": 10, "window": 5}
# A small HAGD run (top 30 occurrences per prompt, 2 verification sets of 8 prompts) for supernodes.
HAGD_DEMO = {"pool": 30, "steps": 30, "verify_seeds": 2, "verify_n": 8}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def demo_jobs(model: str, transcoder: str) -> list[tuple[str, dict[str, Any]]]:
    """The jobs the demo stores: an IOI sweep; so that Compare has something to compare, a
    FAP-Synergy circuit at K = 50 on the FAP circuit's prompts, an EAP and a HAP edge circuit
    (HAP with a few mask-training steps only) and a small HAGD hierarchy, whose clusters the
    circuit page can group the graph by; last the FAP circuit at K = 50 (its graph follows)."""
    dataset = {"model": model, "transcoder": transcoder, "task": "ioi"}
    edges = {"model": model, "task": "ioi", "n": EDGE_N, "edges": EDGE_COUNT}
    return [
        ("sweep", {**dataset, "n": SWEEP_N, "methods": ["fap", "activation-magnitude", "random"],
                   "ks": [50, 100, 200, 400, 800]}),
        ("prune", {**dataset, "n": PRUNE_N, "method": "fap-synergy", "k": 50}),
        ("edges", {**edges, "method": "eap"}),
        ("edges", {**edges, "method": "hap", "options": HAP_DEMO}),
        ("hagd", {**dataset, "n": PRUNE_N, "options": HAGD_DEMO}),
        ("prune", {**dataset, "n": PRUNE_N, "method": "fap", "k": 50}),
    ]


def interp_jobs(settings: Settings, circuit_id: int, prompt: int = GRAPH_PROMPT) -> list[tuple[str, dict[str, Any]]]:
    """Explain and score the features of the stored graph's prompt: offline, or with the LLM
    endpoint when one is configured (its rater is then the LLM, not the offline proxy)."""
    agent = "llm" if settings.llm_base_url and settings.llm_model else "offline"
    target = {"circuit_id": circuit_id, "prompt": prompt}
    return [("explain", {**target, "explainer": agent}),
            ("score", {**target, "explainer": agent, "rater": agent, **DEMO_STEERING})]


def server_env(settings: Settings) -> dict[str, str]:
    """The environment of the servers the demo starts: its own settings win over the shell's."""
    return {**os.environ, "PIESCOPE_DATA_DIR": str(settings.data_dir), "PIESCOPE_MODELS_CACHE":
            str(settings.models_cache), "PIESCOPE_API_HOST": settings.api_host,
            "PIESCOPE_API_PORT": str(settings.api_port), "PIESCOPE_API_URL": settings.api_url,
            "PIESCOPE_DASH_HOST": settings.dash_host, "PIESCOPE_DASH_PORT": str(settings.dash_port)}


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
        env = server_env(settings)
        api = stack.enter_context(_server([sys.executable, "-m", "backend.cli", "serve"], logs / "worker.log", env))
        client = stack.enter_context(httpx.Client(base_url=settings.api_url, timeout=30,
                                                  headers=_auth(settings)))
        _wait_healthy(client, api, settings)
        started = time.monotonic()
        run_pipeline(client, settings, demo_jobs(DEMO_MODEL, transcoder))
        _say(f"jobs took {time.monotonic() - started:.0f} s (seconds when every result came from the store)")
        dash = stack.enter_context(_server([sys.executable, "-m", "backend.cli", "dash"], logs / "dashboard.log",
                                           env))
        url = f"http://{settings.dash_host}:{settings.dash_port}/"
        print(f"\nPIEscope is running:\n  dashboard  {url}\n  worker API {settings.api_url}/docs\n"
              f"  logs       {logs / 'worker.log'}, {logs / 'dashboard.log'}\nPress Ctrl-C to stop.", flush=True)
        try:
            while api.poll() is None and dash.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping", file=sys.stderr)


def run_pipeline(client: httpx.Client, settings: Settings, jobs: list[tuple[str, dict[str, Any]]]) -> int | None:
    """All of PIE through the API: `jobs` (a sweep and a prune), the circuit's graph on
    GRAPH_PROMPT, then explain and score its features. Returns the circuit id."""
    circuit_id = None
    for kind, params in jobs:
        job = _run_job(client, kind, params)
        circuit_id = job.get("circuit_id") or circuit_id
    if circuit_id is not None:
        _run_job(client, "graph", {"circuit_id": circuit_id, "prompt": GRAPH_PROMPT})
        for kind, params in interp_jobs(settings, circuit_id):
            _run_job(client, kind, params)
        _say(_interp_summary(client, circuit_id))
    return circuit_id


def _auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}


class _server:
    """A child process, its output appended to a log file, terminated when the block ends."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, env

    def __enter__(self) -> subprocess.Popen:
        self.out = open(self.log, "a")
        self.proc = subprocess.Popen(self.argv, stdout=self.out, stderr=subprocess.STDOUT, env=self.env)
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.out.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _interp_summary(client: httpx.Client, circuit_id: int) -> str:
    """One line: how many of the graph's features have examples, an explanation and scores."""
    view = client.get(f"/api/circuits/{circuit_id}/interpretation").json()
    feats = view["features"]
    explained = [f for f in feats if f["explanations"]]
    scored = [f for f in explained if f["explanations"][-1]["scores"]]
    raters = sorted({s["rater"] + (" (proxy)" if s["proxy"] else "") for f in scored
                     for s in f["explanations"][-1]["scores"]})
    cost = view["cost"]
    return (f"interpretation of circuit {circuit_id}: {sum(bool(f['examples']) for f in feats)} features with "
            f"examples, {len(explained)} explained, {len(scored)} scored by {', '.join(raters) or 'no rater'}; "
            f"{cost.get('explain_calls', 0)} explainer and {cost.get('score_calls', 0)} rater calls")


def _wait_healthy(client: httpx.Client, proc: subprocess.Popen, settings: Settings, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the worker API exited at start-up (is port {settings.api_port} in use? set "
                            f"PIESCOPE_API_PORT); see {Path(settings.data_dir) / 'worker.log'}")
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
