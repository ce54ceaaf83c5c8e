"""The task metric M on clean and corrupted prompts, in batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backend.models.adapters import ModelAdapter
from backend.tasks import PromptBatch, metric


@dataclass
class Behaviour:
    """Per-prompt metric M on the clean and the corrupted prompts ([N] each)."""

    clean: Tensor
    corrupted: Tensor

    def summary(self) -> dict[str, float]:
        return {"clean_mean": float(self.clean.mean()), "corrupted_mean": float(self.corrupted.mean()),
                "n": len(self.clean)}


@torch.no_grad()
def behaviour(adapter: ModelAdapter, batch: PromptBatch, batch_size: int = 32) -> Behaviour:
    """M(x) and M(x~) for every prompt pair: two forwards per batch of prompts."""
    clean, corrupted = [], []
    for start in range(0, len(batch), batch_size):
        part = batch.subset(slice(start, start + batch_size)).to(adapter.device)
        for ids, out in ((part.clean_ids, clean), (part.corrupted_ids, corrupted)):
            logits = adapter.run(ids, part.attention_mask, last_pos=part.last_pos).logits
            out.append(metric(logits, part).cpu())
    return Behaviour(torch.cat(clean), torch.cat(corrupted))
