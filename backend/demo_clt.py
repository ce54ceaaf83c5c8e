"""The demo CLT for Gemma-3-270M: trained into `models_cache/gemma-3-270m/clt/` on first use.

`ensure_demo_clt` reuses a complete CLT, resumes an interrupted build from its checkpoint, or
trains one (`backend.models.training.train_clt`) on the default corpus with `DEMO_CONFIG`,
sized to finish within ~20 minutes on 2 CPU cores (harvest ~3 min, training ~16 min).
`long=True` trains `LONG_CONFIG` instead (more tokens and steps, better FVU; ~1 hour) into
`clt-long/`. Harvested activations go to `models_cache/gemma-3-270m/activations/` while
training and are deleted afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from backend.models.adapters import ModelAdapter
from backend.models.training import CHECKPOINT_FILE, Report, TrainConfig, is_complete, train_clt
from backend.settings import Settings

log = logging.getLogger(__name__)

DEMO_MODEL = "gemma-3-270m"
# Sized for 20 minutes on two quiet cores. Harvest: 72k tokens at ~400 tok/s (~3 min). Training
# with bf16 matmuls (AMX): ~2.5 s per 1024-token step (bench/clt_train_speed.py; the float32
# trainer took 5.0), so 360 steps (5 epochs) in ~15-17 minutes. Measured on a fresh clone with a
# helper's niced work beside it: 3.4 + 17.5 minutes, held-out FVU 0.220 (TopK 0.188), 187 of
# 18,432 features dead (input centring keeps them alive; uncentred, 59% died). On a CPU without
# fast bf16 the same config runs in float32 with the cache-blocked decoder kernel: on an AVX2
# EPYC 5.1 (harvest, with tests beside it) + 11.9 minutes at 515 tok/s, FVU 0.221, 158 dead.
DEMO_CONFIG = TrainConfig(features_per_layer=1024, k=32, tokens=72_000, heldout_tokens=4096,
                          steps=360, batch_size=1024, lr=3e-3, warmup_steps=10, seed=0,
                          checkpoint_every=25, eval_every=45, export_activation="jumprelu")
LONG_CONFIG = replace(DEMO_CONFIG, tokens=200_000, steps=1600, eval_every=100)


def demo_clt_dir(settings: Settings, long: bool = False) -> Path:
    return Path(settings.models_cache) / DEMO_MODEL / ("clt-long" if long else "clt")


def ensure_demo_clt(settings: Settings, adapter: ModelAdapter, report: Report = log.info, *,
                    long: bool = False, progress: bool = True) -> Path:
    """The demo CLT's directory, training it first unless a complete one is there."""
    out = demo_clt_dir(settings, long)
    if is_complete(out):
        report(f"using the demo CLT in {out}")
        return out
    resume = (out / CHECKPOINT_FILE).exists()
    config = LONG_CONFIG if long else DEMO_CONFIG
    report(("resuming" if resume else "training") + f" the demo CLT into {out} "
           f"({config.features_per_layer} features per layer, {config.tokens} tokens, "
           f"{config.total_steps} steps; about {'60' if long else '20'} minutes on two cores; once)")
    train_clt(adapter, out, config, corpus=None,
              activations_dir=Path(settings.models_cache) / DEMO_MODEL / "activations",
              resume=resume, progress=progress, report=report)
    return out
