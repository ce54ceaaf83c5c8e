"""Complete attribution graphs on a real model: cost and exactness (run: `python bench/graph_build.py`).

On the demo model (default) or any model + CLT: a FAP circuit at K on N IOI prompts, then each
prompt's complete graph for the metric and for the answer logit. Per graph: nodes, nonzero
edges, wall time, "max err of sums" (the largest |sum of incoming edges - value| over its
targets: the kept features' pre-activations and the target), the target's value next to the
model's own M (or answer logit), and the share of the target's incoming |weight| carried by each
kind of source.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.circuits.graph_attribution import prompt_graph  # noqa: E402
from backend.circuits.pipeline import PruneConfig, run_prune  # noqa: E402
from backend.models.transcoder_files import load_transcoder  # noqa: E402
from backend.tasks import get_task, metric  # noqa: E402
from bench._util import table  # noqa: E402

KINDS = ("feature", "error", "token", "pruned", "bias")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--clt", type=Path, default=None, help="CLT directory (default: the model's clt/)")
    parser.add_argument("--prompts", type=int, default=4, help="IOI prompt pairs")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-features", type=int, default=None,
                        help="use a random CLT with this many features per layer instead (exactness and cost do "
                             "not depend on training; the shares do)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    from backend.models.loading import load_model
    from backend.settings import Settings
    settings = Settings()
    adapter = load_model(args.model, settings)
    if args.random_features:
        from backend.models.transcoder import Transcoder, TranscoderConfig
        tc = Transcoder.random(TranscoderConfig("clt", adapter.n_layers, adapter.d_model, args.random_features, "relu"),
                               seed=args.seed)
    else:
        tc = load_transcoder(args.clt or Path(settings.models_cache) / args.model / "clt")
    tc.check_fits(adapter.n_layers, adapter.d_model, args.model)
    batch = get_task("ioi").build(adapter.tokenizer, args.prompts, args.seed)
    circuit = run_prune(adapter, tc, batch, PruneConfig(method="fap", k=args.k, all_token_kl=False, completeness=False),
                        model_name=args.model, transcoder_name=f"{args.model}/clt", task_name="ioi")
    rows = []
    for p in circuit.prompts:
        one = batch.subset([p.index])
        T = int(one.last_pos[0]) + 1
        with torch.no_grad():
            logits = adapter.run(one.clean_ids[:, :T], one.attention_mask[:, :T]).logits
        for target in ("metric", "logit"):
            t0 = time.perf_counter()
            graph = prompt_graph(adapter, tc, batch, p.index, p.kept, target=target)
            seconds = time.perf_counter() - t0
            sums = graph.incoming_sums()
            worst = max(abs(float(sums[i]) - n.value) for i, n in enumerate(graph.nodes) if n.value is not None)
            node = graph.target
            model_value = float(metric(logits, one)[0]) if target == "metric" else float(logits[0, node.feature])
            row = graph.adjacency[graph.index(node.node_id)].double()
            total = float(row.abs().sum()) or 1.0
            shares = {kind: float(row[[j for j, n in enumerate(graph.nodes) if n.kind == kind]].abs().sum()) / total
                      for kind in KINDS}
            rows.append({"prompt": p.index, "target": node.label, "nodes": len(graph.nodes),
                         "edges": int(torch.count_nonzero(graph.adjacency)), "seconds": seconds,
                         "max err of sums": worst, "value": node.value, "model": model_value,
                         **{f"share {k}": shares[k] for k in KINDS}})
    clt = f"random CLT, {args.random_features} features/layer" if args.random_features else "trained CLT"
    print(f"{args.model} ({clt}), FAP K={args.k}, {len(circuit.prompts)} IOI prompts; "
          "share of the target's incoming |weight|")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
