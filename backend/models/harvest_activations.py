"""Harvest `resid_mid` and `mlp_out` of every layer over a corpus into memory-mapped files.

Layout of a store directory:
- `resid_mid.f16`, `mlp_out.f16`: raw float16 arrays [N, L, d] (token n, layer l) — a token's
  activations at all layers are contiguous, so a random batch of tokens is N small reads;
- `meta.json`: {"n_tokens", "n_layers", "d_model", "fingerprint", "complete"}.

Sequences are `BOS + up to seq_len-1 tokens` of one document; the BOS position is dropped
(attention sink: its activations are orders of magnitude larger than the rest), and so is
padding. 100k tokens of an 18-layer, d=640 model take 4.6 GB, hence files, not RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backend.errors import UserError
from backend.models.adapters import ModelAdapter

log = logging.getLogger(__name__)
Report = Callable[[str], None]
FP16_MAX = 65504.0


def token_sequences(tokenizer, docs: list[str], seq_len: int, max_tokens: int,
                    min_tokens: int = 4) -> list[list[int]]:
    """Token-id lists `[BOS] + chunk` (chunk <= seq_len - 1 tokens of one document) until
    `max_tokens` non-BOS tokens are collected (the last list may overshoot; the harvest cuts)."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UserError("the tokenizer has no BOS token; cannot build training sequences")
    seqs, total = [], 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len - 1):
            piece = ids[start:start + seq_len - 1]
            if len(piece) < min_tokens:
                continue
            seqs.append([bos, *piece])
            total += len(piece)
            if total >= max_tokens:
                return seqs
    return seqs


def _fingerprint(model_name: str, seqs: list[list[int]], n_tokens: int) -> str:
    h = hashlib.sha256(f"{model_name}|{n_tokens}|{len(seqs)}".encode())
    for s in seqs:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _layer_major(rows: np.ndarray) -> torch.Tensor:
    """fp16 rows [B, L, d] (a gathered copy, or a read-only view of the memmap) -> [L, B, d] fp32."""
    if not rows.flags.writeable:  # a slice of the read-only memmap: copy it out first
        rows = np.array(rows)
    return torch.from_numpy(rows).transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)


@dataclass
class ActivationStore:
    """Harvested activations on disk: `resid_mid` and `mlp_out` memmaps [N, L, d] float16."""

    directory: Path
    n_tokens: int
    n_layers: int
    d_model: int

    def __post_init__(self) -> None:
        shape = (self.n_tokens, self.n_layers, self.d_model)
        self.resid_mid = np.memmap(self.directory / "resid_mid.f16", np.float16, "r", shape=shape)
        self.mlp_out = np.memmap(self.directory / "mlp_out.f16", np.float16, "r", shape=shape)

    def rows(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `index` (int64 [B] or a slice) -> (resid_mid, mlp_out), each [L, B, d] fp32."""
        if isinstance(index, torch.Tensor):
            index = np.sort(index.numpy())  # sorted reads are faster; order is irrelevant
        # One fp16 gather, then one pass that converts and transposes (not three copies).
        return _layer_major(self.resid_mid[index]), _layer_major(self.mlp_out[index])

    def chunks(self, size: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive (resid_mid, mlp_out) chunks [L, <=size, d] over the first `limit` tokens."""
        end = self.n_tokens if limit is None else min(limit, self.n_tokens)
        for start in range(0, end, size):
            yield self.rows(slice(start, min(start + size, end)))

    @property
    def nbytes(self) -> int:
        return 2 * self.n_tokens * self.n_layers * self.d_model * 2

    @staticmethod
    def open(directory: Path, fingerprint: str | None = None) -> ActivationStore | None:
        """The complete store in `directory` (matching `fingerprint` if given), else None."""
        meta_file = Path(directory) / "meta.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        if not meta.get("complete") or (fingerprint and meta.get("fingerprint") != fingerprint):
            return None
        return ActivationStore(Path(directory), meta["n_tokens"], meta["n_layers"], meta["d_model"])


def harvest(adapter: ModelAdapter, docs: list[str], directory: str | Path, n_tokens: int, *,
            seq_len: int = 128, batch_size: int = 16, progress: bool = True,
            desc: str = "harvest", report: Report = log.info) -> ActivationStore:
    """Run the model over `docs` and store `n_tokens` tokens of activations in `directory`.

    Reuses a complete store made from the same model, sequences and size. Model forwards are
    batched and run without gradients. Raises UserError when the corpus is too small.
    """
    directory = Path(directory)
    if n_tokens <= 0:
        raise UserError(f"the number of tokens to harvest must be positive, got {n_tokens}")
    seqs = token_sequences(adapter.tokenizer, docs, seq_len, n_tokens)
    available = sum(len(s) - 1 for s in seqs)
    if available < n_tokens:
        raise UserError(f"the corpus yields only {available} tokens (without BOS), fewer than the "
                        f"{n_tokens} asked for; use a larger corpus or fewer tokens")
    fp = _fingerprint(adapter.name, seqs, n_tokens)
    existing = ActivationStore.open(directory, fp)
    if existing is not None:
        report(f"reusing {n_tokens} harvested tokens in {directory}")
        return existing

    L, d = adapter.n_layers, adapter.d_model
    directory.mkdir(parents=True, exist_ok=True)
    meta_file = directory / "meta.json"
    meta_file.unlink(missing_ok=True)
    shape = (n_tokens, L, d)
    resid = np.memmap(directory / "resid_mid.f16", np.float16, "w+", shape=shape)
    mlp = np.memmap(directory / "mlp_out.f16", np.float16, "w+", shape=shape)
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else 0
    device = adapter.device
    written, clipped, start = 0, 0, time.perf_counter()
    bar = tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    with torch.no_grad():
        for b in range(0, len(seqs), batch_size):
            if written >= n_tokens:
                break
            batch = seqs[b:b + batch_size]
            T = max(len(s) for s in batch)
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            out = adapter.run(ids.to(device), mask.to(device), capture=True)
            keep = mask.bool().clone()
            keep[:, 0] = False  # BOS
            keep = keep.to(device)
            x = out.resid_mid[:, keep].transpose(0, 1).float()  # [n, L, d]
            y = out.mlp_out[:, keep].transpose(0, 1).float()
            n = min(x.shape[0], n_tokens - written)
            x, y = x[:n], y[:n]
            clipped += int((x.abs() > FP16_MAX).sum() + (y.abs() > FP16_MAX).sum())
            resid[written:written + n] = x.clamp(-FP16_MAX, FP16_MAX).cpu().numpy().astype(np.float16)
            mlp[written:written + n] = y.clamp(-FP16_MAX, FP16_MAX).cpu().numpy().astype(np.float16)
            written += n
            bar.update(n)
    bar.close()
    resid.flush()
    mlp.flush()
    del resid, mlp
    if clipped:
        log.warning("%d activation values exceeded the float16 range and were clipped", clipped)
    seconds = time.perf_counter() - start
    meta_file.write_text(json.dumps({"n_tokens": n_tokens, "n_layers": L, "d_model": d,
                                     "fingerprint": fp, "complete": True, "seconds": seconds,
                                     "clipped_values": clipped}))
    report(f"harvested {n_tokens} tokens in {seconds:.0f} s ({n_tokens / max(seconds, 1e-9):.0f} tok/s)"
           f" -> {directory}")
    return ActivationStore(directory, n_tokens, L, d)


def delete_store(directory: str | Path) -> None:
    """Remove a store's files (the directory too, if then empty)."""
    directory = Path(directory)
    for name in ("resid_mid.f16", "mlp_out.f16", "meta.json"):
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass
