"""How good is a trained CLT? Prints a table (run: `make bench` or `python bench/clt_quality.py`).

Measured on the demo model (default) or any model + CLT directory:
- per-layer FVU of `mlp_out` on held-out corpus text (the default corpus's held-out documents)
  and on IOI prompts (BOS and padding excluded);
- mean L0 per layer and dead features (never active on either text);
- replacement KL: KL(original || model with every mlp_out replaced by the CLT reconstruction)
  at the last token of the IOI prompts, via the additive patch `recon - mlp_out` (at every
  position but BOS, which the CLT never saw: BOS keeps its own mlp_out);
- feature share of the IOI behaviour: subtracting every feature's Delta-write
  (decode(acts_clean) - decode(acts_corrupted), biases cancel) from the clean run changes
  M = logit(IO) - logit(S) by what fraction of M(clean) - M(corrupted)? (sum over prompts of
  the change / sum of the clean-to-corrupted change; the per-prompt median is shown too).

IOI pairs come from the tasks module (ABC corruption); the Delta-writes and M with all of them
removed come from the PIE engine (`Attributor`, `Evaluator.m_none`), as PIEscope computes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.circuits.attribution import Attributor  # noqa: E402
from backend.circuits.evaluation import Evaluator, kl_divergence  # noqa: E402
from backend.models.adapters import ModelAdapter  # noqa: E402
from backend.models.corpus import default_corpus, split_heldout  # noqa: E402
from backend.models.harvest_activations import token_sequences  # noqa: E402
from backend.models.training import ReconstructionStats  # noqa: E402
from backend.models.transcoder import Transcoder  # noqa: E402
from backend.models.transcoder_files import load_transcoder  # noqa: E402
from backend.tasks import PromptBatch, get_task, metric  # noqa: E402


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask [B, T] for token sequences of different lengths."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _add(stats: ReconstructionStats, tc: Transcoder, resid_mid: torch.Tensor, mlp_out: torch.Tensor,
         keep: torch.Tensor) -> torch.Tensor:
    """Reconstruct every position, count the kept ones ([B, T] bool); returns recon [L, B, T, d]."""
    acts = tc.encode(resid_mid)
    recon = tc.decode(acts)
    stats.add(recon[:, keep], mlp_out[:, keep], acts[:, keep] != 0)
    return recon


@torch.no_grad()
def measure_text(adapter: ModelAdapter, tc: Transcoder, seqs: list[list[int]], stats: ReconstructionStats,
                 batch_size: int = 8) -> None:
    pad = adapter.tokenizer.pad_token_id or 0
    for b in range(0, len(seqs), batch_size):
        ids, mask = _pad(seqs[b:b + batch_size], pad)
        out = adapter.run(ids, mask, capture=True)
        keep = mask.bool()
        keep[:, 0] = False  # BOS: the CLT never saw it
        _add(stats, tc, out.resid_mid, out.mlp_out, keep)


@torch.no_grad()
def measure_ioi(adapter: ModelAdapter, tc: Transcoder, batch: PromptBatch, stats: ReconstructionStats,
                batch_size: int = 16) -> dict:
    attr = Attributor(adapter, tc)
    evaluator = Evaluator(attr)
    kls, m_clean, m_corr, m_none = [], [], [], []
    for b in range(0, len(batch), batch_size):
        part = batch.subset(slice(b, b + batch_size))
        ids, mask, last = part.clean_ids, part.attention_mask, part.last_pos
        clean = adapter.run(ids, mask, last_pos=last, capture=True)
        keep = mask.bool().clone()
        keep[:, 0] = False
        recon = _add(stats, tc, clean.resid_mid, clean.mlp_out, keep)
        # Replace mlp_out by the reconstruction at real tokens; BOS keeps its own (an error node).
        replaced = adapter.run(ids, mask, last_pos=last, patch=(recon - clean.mlp_out) * keep[None, :, :, None])
        kls.append(kl_divergence(clean.logits, replaced.logits))
        runs = attr.prepare(part)
        m_clean.append(runs.clean_metric)
        m_corr.append(metric(adapter.run(part.corrupted_ids, mask, last_pos=last).logits, part))
        m_none.append(evaluator.m_none(runs))
    mc, mr, ms = torch.cat(m_clean), torch.cat(m_corr), torch.cat(m_none)
    return {"kl": float(torch.cat(kls).mean()), "m_clean": float(mc.mean()),
            "m_corrupted": float(mr.mean()), "m_features_removed": float(ms.mean()),
            "feature_share": float((mc - ms).sum() / (mc - mr).sum()),
            "feature_share_median": float(((mc - ms) / (mc - mr)).median())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--clt", type=Path, default=None,
                        help="CLT directory (default: the demo CLT in models_cache)")
    parser.add_argument("--prompts", type=int, default=48, help="IOI prompt pairs")
    parser.add_argument("--heldout-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    from backend.models.loading import load_model
    from backend.settings import Settings

    settings = Settings()
    clt_dir = args.clt or Path(settings.models_cache) / args.model / "clt"
    t0 = time.perf_counter()
    adapter = load_model(args.model, settings)
    tc = load_transcoder(clt_dir)
    tc.check_fits(adapter.n_layers, adapter.d_model, args.model)

    _, held_docs = split_heldout(default_corpus(seed=0))
    seqs = token_sequences(adapter.tokenizer, held_docs, 128, args.heldout_tokens)
    text_meter = ReconstructionStats(tc.n_layers, tc.d_model, tc.n_features)
    ioi_meter = ReconstructionStats(tc.n_layers, tc.d_model, tc.n_features)
    measure_text(adapter, tc, seqs, text_meter)
    ioi = measure_ioi(adapter, tc, get_task("ioi").build(adapter.tokenizer, args.prompts, seed=args.seed), ioi_meter)

    fvu_text, fvu_ioi = text_meter.fvu, ioi_meter.fvu
    L = tc.n_layers
    print(f"CLT {clt_dir} ({tc.config.activation}, {tc.n_features} features/layer) on {args.model}: "
          f"{text_meter.n} held-out tokens, {args.prompts} IOI pairs ({ioi_meter.n} tokens)\n")
    print(f"{'layer':>5}  {'FVU held-out':>12}  {'FVU IOI':>8}  {'L0 held-out':>11}  {'dead':>5}")
    fired = text_meter.fired | ioi_meter.fired
    for l in range(L):
        print(f"{l:>5}  {fvu_text[l]:>12.3f}  {fvu_ioi[l]:>8.3f}  "
              f"{float(text_meter.l0[l] / text_meter.n):>11.1f}  {int((~fired[l]).sum()):>5}")
    summary = {
        "mean FVU held-out text": sum(fvu_text) / L,
        "mean FVU IOI prompts": sum(fvu_ioi) / L,
        "mean L0 (held-out, per layer)": float(text_meter.l0.sum() / text_meter.n / L),
        "dead features (of %d)" % (L * tc.n_features): int((~fired).sum()),
        "replacement KL (IOI last token)": ioi["kl"],
        "M clean / corrupted": f"{ioi['m_clean']:.3f} / {ioi['m_corrupted']:.3f}",
        "M with all Delta-writes removed": ioi["m_features_removed"],
        "feature share of IOI change": ioi["feature_share"],
        "  (per-prompt median)": ioi["feature_share_median"],
    }
    report_file = clt_dir / "training_report.json"
    if report_file.is_file():
        rep = json.loads(report_file.read_text())
        summary["training: steps x batch"] = f"{rep['total_steps']} x {rep['config']['batch_size']}"
        summary["training: minutes (harvest+train)"] = round(rep["seconds"]["total"] / 60, 1)
        summary["training: minutes harvest / train"] = (f"{rep['seconds']['harvest'] / 60:.1f} / "
                                                        f"{rep['seconds']['train'] / 60:.1f}")
        if "train_tokens_per_second" in rep:
            summary["training: tokens per second"] = (f"{rep['train_tokens_per_second']:.0f} "
                                                      f"({rep.get('compute_dtype', '?')}, "
                                                      f"{rep.get('decoder_backward', '?')} decoder backward)")
    print()
    for key, value in summary.items():
        print(f"{key:<36} {value:.3f}" if isinstance(value, float) else f"{key:<36} {value}")
    print(f"\n(bench took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"fvu_heldout": fvu_text, "fvu_ioi": fvu_ioi, **ioi,
                                         "summary": {k: str(v) for k, v in summary.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
