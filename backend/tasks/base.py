"""Prompt pairs, their tokenised batches, the task interface and the metric M (DESIGN 5, 9).

A task yields `PromptPair`s (clean text, corrupted text of the same token length, the answer
and the distractors that follow the last token). `tokenize_pairs` turns them into a right-padded
`PromptBatch`; `metric` computes M per prompt from the last-position logits.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from backend.errors import InvalidParameterError, UserError

log = logging.getLogger(__name__)

METRIC_KINDS: tuple[str, ...] = ("logit_diff", "logit_diff_max", "prob_diff", "logsumexp")


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupted prompt pair and what should (answer) or should not (distractors) follow.

    `answer` and `distractors` are written as they follow in text, e.g. " Mary" with its leading
    space. `more_answers` extends the answer into a set for `prob_diff` tasks (Greater-than: every
    year above YY); `answer_set` is `(answer, *more_answers)`. `meta` holds template id, order...
    """

    clean: str
    corrupted: str
    answer: str
    distractors: tuple[str, ...]
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    more_answers: tuple[str, ...] = ()

    @property
    def answer_set(self) -> tuple[str, ...]:
        return (self.answer, *self.more_answers)


@dataclass
class PromptBatch:
    """Tokenised prompt pairs, right-padded. Clean and corrupted have equal length per pair.

    clean_ids, corrupted_ids, attention_mask: [N, T]; last_pos: [N] index of the last real
    token; answer_ids: [N, A] and distractor_ids: [N, D], both padded with -1.
    """

    pairs: list[PromptPair]
    clean_ids: Tensor
    corrupted_ids: Tensor
    attention_mask: Tensor
    last_pos: Tensor
    answer_ids: Tensor
    distractor_ids: Tensor
    metric_kind: str
    has_bos: bool
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, idx: Sequence[int] | slice) -> PromptBatch:
        """The rows `idx`, with trailing columns that are padding in every kept row trimmed."""
        if isinstance(idx, slice):
            rows: Any = idx
            pairs = self.pairs[idx]
        else:
            rows = torch.as_tensor(list(idx), dtype=torch.long, device=self.clean_ids.device)
            pairs = [self.pairs[i] for i in rows.tolist()]
        last_pos = self.last_pos[rows]
        width = int(last_pos.max().item()) + 1 if len(pairs) else 0
        return PromptBatch(
            pairs=pairs,
            clean_ids=self.clean_ids[rows, :width],
            corrupted_ids=self.corrupted_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            last_pos=last_pos,
            answer_ids=self.answer_ids[rows],
            distractor_ids=self.distractor_ids[rows],
            metric_kind=self.metric_kind,
            has_bos=self.has_bos,
            dropped=dict(self.dropped),
        )

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(
            pairs=self.pairs,
            clean_ids=self.clean_ids.to(device),
            corrupted_ids=self.corrupted_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            last_pos=self.last_pos.to(device),
            answer_ids=self.answer_ids.to(device),
            distractor_ids=self.distractor_ids.to(device),
            metric_kind=self.metric_kind,
            has_bos=self.has_bos,
            dropped=dict(self.dropped),
        )


def last_logits(logits: Tensor, last_pos: Tensor) -> Tensor:
    """logits [N, T, V], last_pos [N] -> the logits at each row's last real token, [N, V]."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_pos.to(logits.device)]


def _masked_gather(values: Tensor, ids: Tensor, fill: float) -> Tensor:
    """values [N, V], ids [N, K] padded with -1 -> values at ids [N, K], `fill` where ids == -1."""
    valid = ids >= 0
    picked = values.gather(1, ids.clamp(min=0))
    return torch.where(valid, picked, torch.full_like(picked, fill))


COLUMN_METRICS = ("logit_diff", "logit_diff_max")


def metric(logits_last: Tensor, batch: PromptBatch) -> Tensor:
    """M per prompt from the last-position logits [N, V] -> [N]; differentiable.

    logit_diff: logit(answer) - logit(first distractor) (IOI: logit(IO) - logit(S)).
    logit_diff_max: logit(answer) - max over the valid distractors (Doc-String).
    prob_diff: sum of softmax probs over the answer set - over the distractor set (Greater-than).
    logsumexp: logsumexp of the last logits (a task without an answer).
    """
    if logits_last.dim() != 2 or logits_last.shape[0] != len(batch):
        raise InvalidParameterError(
            f"metric expects last-position logits of shape [{len(batch)}, V], got {tuple(logits_last.shape)}"
        )
    kind = batch.metric_kind
    if kind == "logsumexp":
        return torch.logsumexp(logits_last, dim=-1)
    if kind in COLUMN_METRICS:
        return metric_from_columns(logits_last.gather(1, metric_columns(batch).to(logits_last.device).clamp(min=0)),
                                   batch)
    answers = batch.answer_ids.to(logits_last.device)
    distractors = batch.distractor_ids.to(logits_last.device)
    if kind == "prob_diff":
        probs = logits_last.softmax(dim=-1)
        return _masked_gather(probs, answers, 0.0).sum(1) - _masked_gather(probs, distractors, 0.0).sum(1)
    raise InvalidParameterError(f"unknown metric kind {kind!r}; known: {', '.join(METRIC_KINDS)}")


def metric_columns(batch: PromptBatch) -> Tensor | None:
    """The vocabulary ids M reads, [N, 1 + D] (answer, then the distractors; -1 = padding), for
    metrics that are logit differences; None for metrics that need the whole distribution."""
    if batch.metric_kind not in COLUMN_METRICS:
        return None
    return torch.cat([batch.answer_ids[:, :1], batch.distractor_ids], dim=1)


def metric_from_columns(values: Tensor, batch: PromptBatch) -> Tensor:
    """M from the logits at ``metric_columns(batch)``: values [N, 1 + D] -> [N] (as ``metric``)."""
    answer, wrong = values[:, 0], values[:, 1:]
    if batch.metric_kind == "logit_diff":
        return answer - wrong[:, 0]
    valid = batch.distractor_ids.to(values.device) >= 0
    return answer - wrong.masked_fill(~valid, float("-inf")).amax(dim=1)


def pad_id_of(tokenizer: Any) -> int:
    """The id used for right padding: pad, else eos, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when it is exactly one known token (not <unk>), else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        return None
    return int(ids[0])


def _encode(tokenizer: Any, text: str, add_bos: bool | None) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    bos = tokenizer.bos_token_id
    if add_bos is True and (not ids or ids[0] != bos):
        if bos is None:
            raise UserError("add_bos=True but the tokenizer has no BOS token")
        ids = [int(bos), *ids]
    elif add_bos is False and ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    return ids


def _pad(rows: list[list[int]], width: int, value: int) -> Tensor:
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def tokenize_pairs(
    tokenizer: Any,
    pairs: Sequence[PromptPair],
    metric_kind: str,
    add_bos: bool | None = None,
    limit: int | None = None,
) -> PromptBatch:
    """Tokenise prompt pairs into a right-padded `PromptBatch`, dropping pairs that do not fit.

    A pair is kept when its clean and corrupted tokenisations have equal length and (unless the
    metric is `logsumexp`) its answer(s) and each distractor are exactly one known token. Drops
    are counted by reason in `dropped`. `add_bos` None follows the tokenizer, True forces a
    leading BOS, False removes it. `limit` stops after that many kept pairs (used by
    `Task.build`, so the drop counts describe only the pairs actually examined).
    """
    if metric_kind not in METRIC_KINDS:
        raise InvalidParameterError(f"unknown metric kind {metric_kind!r}; known: {', '.join(METRIC_KINDS)}")
    needs_answer = metric_kind != "logsumexp"
    token_cache: dict[str, int | None] = {}

    def tok1(s: str) -> int | None:
        if s not in token_cache:
            token_cache[s] = single_token_id(tokenizer, s)
        return token_cache[s]

    dropped: Counter[str] = Counter()
    kept: list[PromptPair] = []
    clean_rows: list[list[int]] = []
    corr_rows: list[list[int]] = []
    answer_rows: list[list[int]] = []
    distractor_rows: list[list[int]] = []
    for pair in pairs:
        if limit is not None and len(kept) >= limit:
            break
        clean = _encode(tokenizer, pair.clean, add_bos)
        corr = _encode(tokenizer, pair.corrupted, add_bos)
        if len(clean) != len(corr) or not clean:
            dropped["length mismatch"] += 1
            continue
        answers = [tok1(a) for a in pair.answer_set] if needs_answer else []
        distractors = [tok1(d) for d in pair.distractors] if needs_answer else []
        if needs_answer and (not answers or None in answers):
            dropped["answer not one token"] += 1
            continue
        if needs_answer and (not distractors or None in distractors):
            dropped["distractor not one token"] += 1
            continue
        kept.append(pair)
        clean_rows.append(clean)
        corr_rows.append(corr)
        answer_rows.append(answers)  # type: ignore[arg-type]
        distractor_rows.append(distractors)  # type: ignore[arg-type]

    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "no pairs given"
        raise UserError(f"no prompt pair survived tokenisation ({sum(dropped.values())} dropped; {reasons})")
    if dropped:
        log.info("dropped %d prompt pairs while tokenising: %s", sum(dropped.values()), dict(dropped))

    lengths = torch.tensor([len(r) for r in clean_rows], dtype=torch.long)
    width = int(lengths.max())
    pad = pad_id_of(tokenizer)
    clean_ids = _pad(clean_rows, width, pad)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    bos = tokenizer.bos_token_id
    return PromptBatch(
        pairs=kept,
        clean_ids=clean_ids,
        corrupted_ids=_pad(corr_rows, width, pad),
        attention_mask=attention_mask,
        last_pos=lengths - 1,
        answer_ids=_pad(answer_rows, max(1, max(map(len, answer_rows))), -1),
        distractor_ids=_pad(distractor_rows, max(1, max(map(len, distractor_rows))), -1),
        metric_kind=metric_kind,
        has_bos=bos is not None and bool((clean_ids[:, 0] == bos).all()),
        dropped=dict(dropped),
    )


class Task(ABC):
    """A family of prompt pairs with its metric. Options go to the constructor."""

    name: str = ""
    description: str = ""
    metric_kind: str = "logit_diff"

    @abstractmethod
    def generate(self, n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
        """n prompt pairs, deterministic by seed; generate(n) is a prefix of generate(m > n).

        With a tokenizer, the task may restrict its word lists to single tokens.
        """

    def build(self, tokenizer: Any, n: int, seed: int = 0) -> PromptBatch:
        """Exactly n tokenised pairs when possible: over-generates 4n and keeps the first n that fit."""
        if n <= 0:
            raise InvalidParameterError(f"the number of prompts must be positive, got {n}")
        pairs = self.generate(4 * n, seed=seed, tokenizer=tokenizer)
        batch = tokenize_pairs(tokenizer, pairs, self.metric_kind, limit=n)
        if len(batch) < n:
            log.warning("task %s: only %d of %d prompt pairs survived tokenisation (%s)",
                        self.name, len(batch), n, batch.dropped)
        return batch
