"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year > 32.

The corrupted prompt uses YY = "01". Metric `prob_diff`: p(answer set) - p(distractor set) at
the last position. The sets depend on how the tokenizer writes numbers:

- "pairs" (GPT-2 style, every "00".."99" is one token): answers = the two-digit tokens > YY,
  distractors = those <= YY; YY is drawn from 02..98 so both sets are non-empty.
- "digits" (Gemma, and tokenizers that split numbers into single digits): the next token is only
  the first digit of the year's last two digits, so answers = digits > the first digit of YY,
  distractors = digits < it (the equal digit is ambiguous and left out); YY is drawn with its
  first digit in 1..8 (10..89) so both sets are non-empty. Llama-3 groups up to three digits
  ("1732" -> "173", "2"), which neither regime matches exactly; "auto" picks "pairs" for it since
  every two-digit string is one token, so treat its numbers as approximate.

`digits="auto"` picks "pairs" when every two-digit string is one token, else "digits" when every
digit is; without a tokenizer it uses "pairs".
"""

from __future__ import annotations

import random
from typing import Any, Literal

from backend.errors import InvalidParameterError, UserError
from backend.tasks.base import PromptPair, Task, single_token_id

NOUNS: tuple[str, ...] = (
    "war", "campaign", "expedition", "reign", "dynasty", "siege", "journey", "voyage", "treaty",
    "alliance", "conflict", "rebellion", "occupation", "famine", "plague", "marriage", "trial",
    "project", "tradition", "empire",
)
TEMPLATE = "The {noun} lasted from the year {XX}{YY} to the year {XX}"
CENTURIES: tuple[str, ...] = ("11", "12", "13", "14", "15", "16", "17")
CORRUPT_YY = "01"

TWO_DIGITS: tuple[str, ...] = tuple(f"{i:02d}" for i in range(100))
ONE_DIGITS: tuple[str, ...] = tuple(str(i) for i in range(10))


def number_regime(tokenizer: Any) -> Literal["pairs", "digits"]:
    """'pairs' when every "00".."99" is one token, else 'digits' when every "0".."9" is."""
    if tokenizer is None or all(single_token_id(tokenizer, s) is not None for s in TWO_DIGITS):
        return "pairs"
    if all(single_token_id(tokenizer, s) is not None for s in ONE_DIGITS):
        return "digits"
    raise UserError("Greater-than needs a tokenizer with one token per two-digit number or per digit")


class GreaterThanTask(Task):
    """Greater-than prompt pairs; metric p(years > YY) - p(years <= YY) (see module docstring)."""

    name = "greater-than"
    description = "Greater-than (Hanna et al.): 'from the year XXYY to the year XX'; corrupted YY=01"
    metric_kind = "prob_diff"

    def __init__(self, digits: Literal["auto", "pairs", "digits"] = "auto") -> None:
        if digits not in ("auto", "pairs", "digits"):
            raise InvalidParameterError(f"greater-than digits must be 'auto', 'pairs' or 'digits', got {digits!r}")
        self.digits = digits

    def generate(self, n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
        if n <= 0:
            raise InvalidParameterError(f"the number of prompts must be positive, got {n}")
        regime = number_regime(tokenizer) if self.digits == "auto" else self.digits
        rng = random.Random(seed)
        pairs = []
        for _ in range(n):
            noun, xx = rng.choice(NOUNS), rng.choice(CENTURIES)
            if regime == "pairs":
                yy = rng.randint(2, 98)
                answers = TWO_DIGITS[yy + 1:]
                distractors = TWO_DIGITS[: yy + 1]
            else:
                yy = rng.randint(10, 89)
                first = yy // 10
                answers = ONE_DIGITS[first + 1:]
                distractors = ONE_DIGITS[:first]
            pairs.append(PromptPair(
                clean=TEMPLATE.format(noun=noun, XX=xx, YY=f"{yy:02d}"),
                corrupted=TEMPLATE.format(noun=noun, XX=xx, YY=CORRUPT_YY),
                answer=answers[0],
                distractors=distractors,
                more_answers=answers[1:],
                meta={"noun": noun, "xx": xx, "yy": f"{yy:02d}", "regime": regime},
            ))
        return pairs
