"""`make demo`: the main job on the embedded Gemma-3-270M model, from nothing to results."""

from __future__ import annotations

import sys

from backend.settings import Settings


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(settings: Settings, n: int = 20) -> None:
    """Prepare the demo model (converted once into models_cache) and show its IOI behaviour."""
    from backend.circuits.behaviour import behaviour
    from backend.models.loading import load_model
    from backend.models.registry import DEMO_MODEL
    from backend.tasks import get_task

    adapter = load_model(DEMO_MODEL, settings, report=_say)
    batch = get_task("ioi").build(adapter.tokenizer, n, seed=0)
    result = behaviour(adapter, batch)
    print(f"{DEMO_MODEL}: {adapter.n_layers} layers, d_model {adapter.d_model}")
    print(f"IOI, {len(batch)} prompts, M = logit(IO) - logit(S): clean {result.clean.mean():.2f}, "
          f"ABC-corrupted {result.corrupted.mean():.2f}")
