"""What FADE scoring costs per feature on the demo model, by faithfulness setting.

    .venv/bin/python bench/fade_cost.py [--features 8] [-n 20]

The features of the demo circuit's graph (FAP, K=50, N IOI prompts; the features kept on prompt
0, as `make demo` scores them) are harvested and explained offline once, then scored with the
offline proxy rater: without faithfulness, with the old faithfulness defaults (2 prompts x 8
tokens) and with the current ones (8 x 16). Wall-clock seconds per feature; the machine's load
is printed with them (times on a busy 2-core box are upper bounds). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._util import table  # noqa: E402

from backend import jobs as job_functions  # noqa: E402
from backend.circuits.pipeline import PruneConfig, run_prune  # noqa: E402
from backend.interp.explainers import OfflineExplainer  # noqa: E402
from backend.interp.harvest import HarvestConfig  # noqa: E402
from backend.interp.pipeline import (N_NEW_TOKENS, N_STEER_PROMPTS, ScoreConfig, explain_circuit,  # noqa: E402
                                     score_circuit)
from backend.interp.raters import OfflineRater  # noqa: E402
from backend.models.loading import load_model  # noqa: E402
from backend.models.registry import DEMO_MODEL  # noqa: E402
from backend.models.transcoder_files import load_transcoder, transcoder_summary  # noqa: E402
from backend.models.transcoder_registry import resolve_transcoder  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.store import queries  # noqa: E402
from backend.store.db import open_store, transaction  # noqa: E402
from backend.store.interp import InterpStore  # noqa: E402
from backend.tasks import get_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcoder", default=f"{DEMO_MODEL}/clt")
    parser.add_argument("-n", type=int, default=20, help="IOI prompts of the circuit")
    parser.add_argument("--features", type=int, default=8, help="features to score per setting")
    parser.add_argument("--corpus-tokens", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="piescope-fade-bench-"))
    settings = Settings().model_copy(update={"data_dir": tmp, "db_url": None})
    adapter = load_model(DEMO_MODEL, settings)
    tc_name, tc_path = resolve_transcoder(args.transcoder, settings)
    tc = load_transcoder(tc_path)
    batch = get_task("ioi").build(adapter.tokenizer, args.n, seed=0)
    circuit = run_prune(adapter, tc, batch, PruneConfig(method="fap", k=50, completeness=False, all_token_kl=False),
                        model_name=DEMO_MODEL, transcoder_name=tc_name, task_name="ioi")
    on_prompt = list(dict.fromkeys((o.layer, o.feature) for o in circuit.prompts[0].kept))
    engine, sessions = open_store(settings)
    with transaction(sessions) as session:
        model_row = queries.get_or_create_model(session, DEMO_MODEL)
        queries.get_or_create_transcoder(session, tc_name, model_row, transcoder_summary(tc_path))
    store = InterpStore(sessions)
    docs = job_functions.corpus_documents("default")
    features = on_prompt[:args.features]
    t = time.perf_counter()
    explain_circuit(adapter, tc, store, tc_name, on_prompt, docs, OfflineExplainer(), "default",
                    HarvestConfig(n_tokens=args.corpus_tokens))
    harvest_s = time.perf_counter() - t
    settings_rows = [("no faithfulness", ScoreConfig(faithfulness=False)),
                     ("faithfulness 2 prompts x 8 tokens (old default)",
                      ScoreConfig(n_steer_prompts=2, n_new_tokens=8)),
                     (f"faithfulness {N_STEER_PROMPTS} prompts x {N_NEW_TOKENS} tokens (default)", ScoreConfig())]
    rows = []
    for name, config in settings_rows:
        load = os.getloadavg()[0]
        t = time.perf_counter()
        report = score_circuit(adapter, tc, store, tc_name, features, docs, OfflineRater(), config=config,
                               corpus="default")
        seconds = time.perf_counter() - t
        rows.append({"setting": name, "features": len(features), "scored": report.scored,
                     "seconds": round(seconds, 1), "s / feature": round(seconds / max(len(features), 1), 2),
                     "load (1 min)": round(load, 1)})
    engine.dispose()
    print(f"# FADE scoring cost on {DEMO_MODEL} + {tc_name}: {len(on_prompt)} features kept on prompt 0 of a FAP "
          f"K=50 circuit (N={len(batch)}); harvest of all of them ({args.corpus_tokens} corpus tokens) and "
          f"offline explanations took {harvest_s:.0f} s\n")
    print(table(rows))


if __name__ == "__main__":
    main()
