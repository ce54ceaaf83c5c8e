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

IOI pairs are generated here: clean "Then, {A} and {B} went to the {place}. {B} gave a {object}
to" -> " {A}" (distractor " {B}"), corrupted = the same with three other names (ABC); only names
that are single tokens are used, so clean and corrupted have equal token lengths.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.models.adapters import ModelAdapter  # noqa: E402
from backend.models.corpus import NAMES, OBJECTS, PLACES, default_corpus, split_heldout  # noqa: E402
from backend.models.harvest_activations import token_sequences  # noqa: E402
from backend.models.transcoder import Transcoder  # noqa: E402
from backend.models.transcoder_files import load_transcoder  # noqa: E402

IOI_TEMPLATE = "Then, {A} and {B} went to the {place}. {S} gave a {obj} to"
EXTRA_NAMES = ("Bob", "Jane", "Sam", "Ben", "Max", "Joe", "Kim", "Dan", "Tim", "Ann", "Leo",
               "Ruth", "Carl", "Rose", "Will", "Nick")


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def ioi_pairs(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """n clean/corrupted IOI pairs with single-token names (ids include BOS)."""
    def one(word: str) -> int | None:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    names = [w for w in dict.fromkeys(NAMES + EXTRA_NAMES) if one(w) is not None]
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        a, b, c, d, e = rng.sample(names, 5)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        clean = IOI_TEMPLATE.format(A=a, B=b, S=b, place=place, obj=obj)
        corrupted = IOI_TEMPLATE.format(A=c, B=d, S=e, place=place, obj=obj)
        ci, ri = tokenizer(clean)["input_ids"], tokenizer(corrupted)["input_ids"]
        if len(ci) != len(ri):
            continue
        pairs.append({"clean": ci, "corrupted": ri, "io": one(a), "s": one(b)})
    return pairs


class FVUMeter:
    """Accumulates per-layer FVU, L0 and which features fired over batches of tokens."""

    def __init__(self, tc: Transcoder):
        L, d = tc.n_layers, tc.d_model
        self.err = torch.zeros(L, dtype=torch.float64)
        self.y_sum = torch.zeros(L, d, dtype=torch.float64)
        self.y_sq = torch.zeros(L, dtype=torch.float64)
        self.l0 = torch.zeros(L, dtype=torch.float64)
        self.fired = torch.zeros(L, tc.n_features, dtype=torch.bool)
        self.n = 0

    def add(self, y: torch.Tensor, recon: torch.Tensor, acts: torch.Tensor) -> None:
        """y, recon [L, N, d]; acts [L, N, F] (N tokens, BOS and padding already removed)."""
        self.err += (recon - y).double().pow(2).sum((1, 2))
        self.y_sum += y.double().sum(1)
        self.y_sq += y.double().pow(2).sum((1, 2))
        self.l0 += (acts != 0).sum((1, 2)).double()
        self.fired |= (acts != 0).any(1)
        self.n += y.shape[1]

    def fvu(self) -> list[float]:
        return (self.err / (self.y_sq - self.y_sum.pow(2).sum(-1) / self.n)).tolist()


@torch.no_grad()
def measure_text(adapter: ModelAdapter, tc: Transcoder, seqs: list[list[int]], meter: FVUMeter,
                 batch_size: int = 8) -> None:
    pad = adapter.tokenizer.pad_token_id or 0
    for b in range(0, len(seqs), batch_size):
        ids, mask = _pad(seqs[b:b + batch_size], pad)
        out = adapter.run(ids, mask, capture=True)
        keep = mask.bool()
        keep[:, 0] = False
        x, y = out.resid_mid[:, keep], out.mlp_out[:, keep]
        acts = tc.encode(x)
        meter.add(y, tc.decode(acts), acts)


@torch.no_grad()
def measure_ioi(adapter: ModelAdapter, tc: Transcoder, pairs: list[dict], meter: FVUMeter,
                batch_size: int = 8) -> dict:
    pad = adapter.tokenizer.pad_token_id or 0
    kls, m_clean, m_corr, m_sub = [], [], [], []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        ids, mask = _pad([p["clean"] for p in chunk], pad)
        cids, _ = _pad([p["corrupted"] for p in chunk], pad)
        io = torch.tensor([p["io"] for p in chunk])
        s = torch.tensor([p["s"] for p in chunk])
        rows = torch.arange(len(chunk))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logits[rows, io] - logits[rows, s]

        clean = adapter.run(ids, mask, capture=True)
        corr = adapter.run(cids, mask, capture=True)
        keep = mask.bool().clone()
        keep[:, 0] = False
        acts_clean = tc.encode(clean.resid_mid)  # [L, B, T, F]
        recon = tc.decode(acts_clean)
        meter.add(clean.mlp_out[:, keep], recon[:, keep], acts_clean[:, keep])
        # Patch real tokens only, never BOS: the CLT is trained without it (attention sink,
        # activations orders of magnitude larger), so BOS keeps its own mlp_out (an error node).
        valid = keep[None, :, :, None]
        replaced = adapter.run(ids, mask, patch=(recon - clean.mlp_out) * valid)
        logp, logq = clean.logits.log_softmax(-1), replaced.logits.log_softmax(-1)
        kls.append((logp.exp() * (logp - logq)).sum(-1))
        delta = (recon - tc.decode(tc.encode(corr.resid_mid))) * valid  # Delta-writes, no bias
        subtracted = adapter.run(ids, mask, patch=-delta)
        m_clean.append(metric(clean.logits))
        m_corr.append(metric(corr.logits))
        m_sub.append(metric(subtracted.logits))
    mc, mr, ms = torch.cat(m_clean), torch.cat(m_corr), torch.cat(m_sub)
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
    text_meter, ioi_meter = FVUMeter(tc), FVUMeter(tc)
    measure_text(adapter, tc, seqs, text_meter)
    ioi = measure_ioi(adapter, tc, ioi_pairs(adapter.tokenizer, args.prompts, args.seed), ioi_meter)

    fvu_text, fvu_ioi = text_meter.fvu(), ioi_meter.fvu()
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
