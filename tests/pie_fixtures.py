"""A tiny model + tokenizer + IOI prompts + random CLT: the PIE engine's test bench."""

from __future__ import annotations

from dataclasses import dataclass

from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder, TranscoderConfig
from backend.tasks import PromptBatch, get_task
from tests.tiny_models import tiny_model
from tests.tokenizers import tiny_tokenizer


@dataclass
class PieSetup:
    adapter: ModelAdapter
    transcoder: Transcoder
    batch: PromptBatch


def pie_setup(arch: str = "llama", n_prompts: int = 6, n_features: int = 24, n_layers: int = 3,
              activation: str = "relu", seed: int = 0) -> PieSetup:
    tok = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok), n_layers=n_layers, d_model=32, seed=seed)
    adapter = ModelAdapter(model, tok, name=f"tiny-{arch}")
    k = 6 if activation == "topk" else None
    tc = Transcoder.random(TranscoderConfig("clt", n_layers, 32, n_features, activation, k=k), seed=seed)
    batch = get_task("ioi").build(tok, n_prompts, seed=seed)
    return PieSetup(adapter, tc, batch)
