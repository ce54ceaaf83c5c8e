"""Modular addition (DESIGN 8.4, 9): "a + b =" -> (a + b) mod p, for the model PIEscope trains.

The corrupted prompt changes a to a different a' (same length: one token either way), so its
answer c' = (a' + b) mod p differs from c. Metric: logit(c) - logit(c'), i.e. how much the
model prefers the clean answer over the corrupted prompt's answer. `corrupt="b"` changes b
instead (the same question through the other operand: a different set of active features).

p defaults to what the tokenizer writes as single tokens: every number 0..p-1 must be one
token (the modadd model's tokenizer has exactly p of them; a tokenizer of single digits gives
p = 10).
"""

from __future__ import annotations

import random
from typing import Any

from backend.errors import InvalidParameterError, UserError
from backend.tasks.base import PromptPair, Task, single_token_id

MAX_P = 1000


def numbers_as_tokens(tokenizer: Any, limit: int = MAX_P) -> int:
    """The largest p such that "0".."p-1" are each one token (with and without a leading space)."""
    p = 0
    while p < limit and single_token_id(tokenizer, str(p)) is not None \
            and single_token_id(tokenizer, f" {p}") is not None:
        p += 1
    return p


class ModAddTask(Task):
    """(a + b) mod p prompt pairs; metric logit(c) - logit(c') (see module docstring)."""

    name = "modadd"
    description = "Modular addition 'a + b =' -> (a + b) mod p; corrupted with a different a"
    metric_kind = "logit_diff"

    def __init__(self, p: int | None = None, corrupt: str = "a") -> None:
        if p is not None and (not isinstance(p, int) or not 2 <= p <= MAX_P):
            raise InvalidParameterError(f"modadd p must be a whole number from 2 to {MAX_P}, not {p!r}")
        if corrupt not in ("a", "b"):
            raise InvalidParameterError(f"modadd corrupt must be 'a' or 'b', not {corrupt!r}")
        self.p, self.corrupt = p, corrupt

    def modulus(self, tokenizer: Any = None) -> int:
        if tokenizer is None:
            return self.p or 113
        usable = numbers_as_tokens(tokenizer)
        p = self.p or usable
        if p < 2 or p > usable:
            raise UserError(f"modadd with p={p} needs the numbers 0..{p - 1} to be single tokens; "
                            f"this tokenizer has {usable} of them")
        return p

    def generate(self, n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
        if n <= 0:
            raise InvalidParameterError(f"the number of prompts must be positive, got {n}")
        p = self.modulus(tokenizer)
        rng = random.Random(seed)
        pairs = []
        for _ in range(n):
            a, b = rng.randrange(p), rng.randrange(p)
            shift = rng.randrange(1, p)  # any other value of the corrupted operand, uniformly
            a2, b2 = ((a + shift) % p, b) if self.corrupt == "a" else (a, (b + shift) % p)
            c, c_corr = (a + b) % p, (a2 + b2) % p
            pairs.append(PromptPair(clean=f"{a} + {b} =", corrupted=f"{a2} + {b2} =", answer=f" {c}",
                                    distractors=(f" {c_corr}",),
                                    meta={"a": a, "b": b, "a_corrupted": a2, "b_corrupted": b2, "p": p}))
        return pairs
