"""Load benchmark of the API's read path: concurrent clients reading stored circuits.

Starts `uvicorn backend.api.app:create_app --factory` on 127.0.0.1 (an ephemeral port) over a
temporary store seeded with synthetic circuits — a SQLite file, or with --backend postgres a
database in a throw-away PostgreSQL cluster (`tests/postgres.py`: Debian's binaries, a temp dir,
a Unix socket) — runs N concurrent clients for a fixed time (and at most --max-requests
requests), then prints throughput and latency percentiles and checks that no request failed.
The first --warmup seconds (every stored circuit read at least once: the server's cache of
serialised circuits fills) are measured and printed as their own row; the target, p95 < 50 ms,
is on the steady run after them.

    python bench/api_load.py                      # 50 clients, 30 s, SQLite
    python bench/api_load.py --backend postgres
    python bench/api_load.py --clients 10 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.circuits.results import (AggregatedFeature, Circuit, FeatureOccurrence, PromptCircuit,  # noqa: E402
                                      Stat)
from backend.store import queries  # noqa: E402
from backend.store.db import make_engine, session_factory, transaction, upgrade_to_head  # noqa: E402

HOST = "127.0.0.1"
TARGET_P95_MS = 50.0
START_TIMEOUT = 180.0  # seconds; imports alone take a minute on a busy two-core machine
METHODS = ("fap", "fap-synergy", "random", "activation-magnitude")


def synthetic_circuit(rng: random.Random, method: str, k: int, n_prompts: int) -> Circuit:
    """A circuit shaped like a real one: n_prompts prompts of ~20 tokens, K kept occurrences each."""
    prompts = []
    for i in range(n_prompts):
        kept = [FeatureOccurrence(layer=rng.randrange(18), feature=rng.randrange(4096), position=rng.randrange(20),
                                  score=rng.gauss(0, 1), activation=abs(rng.gauss(0, 2)), delta=rng.gauss(0, 1))
                for _ in range(k)]
        prompts.append(PromptCircuit(index=i, clean=f"prompt {i} " * 8, corrupted=f"other {i} " * 8,
                                     tokens=[f"t{j}" for j in range(20)], n_active=500, kept=kept,
                                     kl_last=rng.random(), kl_all=rng.random(), pred_changed=rng.random() < 0.2,
                                     faithfulness=rng.random(), completeness=rng.random()))
    features = [AggregatedFeature(layer=rng.randrange(18), feature=rng.randrange(4096), n_prompts=rng.randrange(1, 9),
                                  mean_abs_score=rng.random()) for _ in range(k * 2)]
    return Circuit(model="gemma-3-270m", transcoder="gemma-3-270m/clt", task="ioi", method=method, k=k,
                   budget="global", corruption="corrupted_prompt", options={}, prompts=prompts, features=features,
                   kl=Stat(0.3, 0.1, (0.25, 0.35)), pred_change_rate=0.1, faithfulness_mean=0.8,
                   completeness_mean=0.7, seconds=12.0, cost={"patched_forwards": 100.0})


def seed(url: str, n_circuits: int, k: int, n_prompts: int) -> list[int]:
    """Create the schema and `n_circuits` stored circuits; returns their ids."""
    upgrade_to_head(url)
    engine = make_engine(url)
    rng = random.Random(0)
    ids = []
    with transaction(session_factory(engine)) as s:
        model = queries.get_or_create_model(s, "gemma-3-270m", "gemma3")
        tc = queries.get_or_create_transcoder(s, "gemma-3-270m/clt", model)
        for i in range(n_circuits):
            circuit = synthetic_circuit(rng, METHODS[i % len(METHODS)], k, n_prompts)
            ids.append(queries.save_circuit(s, circuit, f"{i:064d}", model, tc, None).id)
    engine.dispose()
    return ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(url: str, port: int, data_dir: str) -> subprocess.Popen:
    env = {**os.environ, "PIESCOPE_DB_URL": url, "PIESCOPE_DATA_DIR": data_dir, "PYTHONPATH": str(ROOT)}
    env.pop("PIESCOPE_API_TOKEN", None)
    cmd = [sys.executable, "-m", "uvicorn", "backend.api.app:create_app", "--factory", "--host", HOST,
           "--port", str(port), "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the server did not start within {START_TIMEOUT:.0f} s")


async def client_loop(http: httpx.AsyncClient, ids: list[int], stop_at: float, budget: list[int],
                      latencies: list[float], failures: list[str], rng: random.Random) -> None:
    """Read circuits (detail 3 of 4 times, a filtered listing otherwise) until time or budget runs out."""
    while time.monotonic() < stop_at and budget[0] > 0:
        budget[0] -= 1
        if rng.random() < 0.75:
            path, params = f"/api/circuits/{rng.choice(ids)}", None
        else:
            path, params = "/api/circuits", {"method": rng.choice(METHODS), "limit": 20}
        t0 = time.perf_counter()
        try:
            response = await http.get(path, params=params)
            ok = response.status_code == 200
            if not ok:
                failures.append(f"{path}: HTTP {response.status_code}")
        except httpx.HTTPError as err:
            failures.append(f"{path}: {type(err).__name__}: {err}")
            continue
        latencies.append(time.perf_counter() - t0)


async def run_load(port: int, ids: list[int], clients: int, seconds: float, max_requests: int):
    latencies: list[float] = []
    failures: list[str] = []
    budget = [max_requests]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits, timeout=30) as http:
        start = time.monotonic()
        stop_at = start + seconds
        await asyncio.gather(*(client_loop(http, ids, stop_at, budget, latencies, failures, random.Random(i))
                               for i in range(clients)))
        elapsed = time.monotonic() - start
    return latencies, failures, elapsed


def measure(use_wrk: bool, port: int, ids: list[int], args: argparse.Namespace, seconds: float, tmp: str):
    """One phase of load: (requests, p50, p95, p99 ms, failed, elapsed s, failure lines)."""
    if use_wrk:
        n, p50, p95, p99, failed, elapsed = run_wrk(port, ids, args.clients, seconds, tmp)
        return n, p50, p95, p99, failed, elapsed, [f"{failed} requests failed (non-2xx or socket errors)"] if failed else []
    latencies, failures, elapsed = asyncio.run(run_load(port, ids, args.clients, seconds, args.max_requests))
    ms = sorted(x * 1000 for x in latencies)
    p50, p95, p99 = (percentile(ms, q) for q in (0.50, 0.95, 0.99))
    return len(ms), p50, p95, p99, len(failures), elapsed, failures


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of load before the measured run (reported as the cold-start row)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    parser.add_argument("--circuits", type=int, default=200, help="stored circuits to seed")
    parser.add_argument("--k", type=int, default=20, help="kept occurrences per prompt in each circuit")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per circuit")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite",
                        help="the store: a SQLite file, or a throw-away PostgreSQL cluster")
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto",
                        help="load generator: wrk (C, Debian package; light on the shared CPU) or httpx "
                             "(pure Python); auto picks wrk when it is installed")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 500 and 0 < args.seconds <= 600 and 0 <= args.warmup <= 600):
        parser.error("--clients must be in 1..500, --seconds in (0, 600] and --warmup in [0, 600]")

    if args.backend == "postgres":
        from tests.postgres import PgCluster
        cluster = PgCluster()
    with tempfile.TemporaryDirectory(prefix="piescope-bench-") as tmp, \
            (cluster if args.backend == "postgres" else nullcontext()):
        url = cluster.database("bench") if args.backend == "postgres" else f"sqlite:///{Path(tmp) / 'bench.db'}"
        ids = seed(url, args.circuits, args.k, args.prompts)
        port = free_port()
        server = start_server(url, port, tmp)
        use_wrk = bool(args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")))
        phases = ([("cold start", args.warmup)] if args.warmup else []) + [("steady", args.seconds)]
        try:
            rows = [(name, *measure(use_wrk, port, ids, args, seconds, tmp)) for name, seconds in phases]
        finally:
            server.terminate()
            server.wait(30)

    print(f"load generator: {'wrk' if use_wrk else 'httpx (Python; shares the CPU with the server)'}\n")
    print("| store | phase | clients | seconds | requests | req/s | p50 ms | p95 ms | p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = []
    for name, n, p50, p95, p99, failed, elapsed, why in rows:
        print(f"| {args.backend} | {name} | {args.clients} | {elapsed:.1f} | {n} | {n / elapsed:.1f} | {p50:.1f} "
              f"| {p95:.1f} | {p99:.1f} | {failed} |")
        failures += why
    for failure in failures[:10]:
        print("failed:", failure)
    n, p95 = rows[-1][1], rows[-1][3]
    verdict = "meets" if p95 < TARGET_P95_MS else "misses"
    print(f"p95 {p95:.1f} ms {verdict} the target of {TARGET_P95_MS:.0f} ms")
    return 1 if failures or not n else 0


WRK_SCRIPT = """
ids = {%s}
i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/api/circuits/" .. ids[(i %% #ids) + 1])
end
done = function(summary, latency, requests)
  local failed = summary.errors.status + summary.errors.connect + summary.errors.read
                 + summary.errors.write + summary.errors.timeout
  io.write(string.format("PIESCOPE %%d %%f %%f %%f %%d %%f\\n", summary.requests,
           latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
           failed, summary.duration / 1e6))
end
"""


def run_wrk(port: int, ids: list[int], clients: int, seconds: float, tmp: str):
    """wrk with one thread and `clients` connections; a Lua hook reports p50/p95/p99 and failures."""
    script = Path(tmp) / "circuits.lua"
    script.write_text(WRK_SCRIPT % ", ".join(map(str, ids)))
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "10s", "-s",
                          str(script), f"http://{HOST}:{port}"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("PIESCOPE "))
    n, p50, p95, p99, failed, elapsed = line.split()[1:]
    return int(n), float(p50), float(p95), float(p99), int(failed), float(elapsed)


if __name__ == "__main__":
    sys.exit(main())
