"""User prompt pairs from a JSONL file in the PIE reference format.

One JSON object per line with `text_clean`, `text_corr`, `io_clean` (the answer) and `s_clean`
(the distractor); blank lines are skipped. Metric: logit(io_clean) - logit(s_clean). Because the
answer follows the prompt in running text, a leading space is added to io/s when the prompt does
not end with a space and they do not already start with one ("... gave it to" + " Mary").
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from backend.errors import InvalidParameterError, NotFoundError, UserError
from backend.tasks.base import PromptPair, Task

FIELDS: tuple[str, ...] = ("text_clean", "text_corr", "io_clean", "s_clean")


def _as_continuation(text: str, word: str) -> str:
    return word if text.endswith(" ") or word.startswith(" ") else " " + word


def read_pairs(path: str | Path) -> list[PromptPair]:
    """Parse the file into prompt pairs; errors name the file and the 1-based line number."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"prompt file not found: {path}")
    pairs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [f for f in FIELDS if f not in row]
            if missing:
                raise UserError(f"{path}: line {lineno}: missing field(s) {', '.join(missing)}")
            bad = [f for f in FIELDS if not isinstance(row[f], str) or not row[f]]
            if bad:
                raise UserError(f"{path}: line {lineno}: field(s) {', '.join(bad)} must be non-empty strings")
            clean = row["text_clean"]
            pairs.append(PromptPair(
                clean=clean,
                corrupted=row["text_corr"],
                answer=_as_continuation(clean, row["io_clean"]),
                distractors=(_as_continuation(clean, row["s_clean"]),),
                meta={"line": lineno},
            ))
    if not pairs:
        raise UserError(f"{path}: no prompt pairs in the file")
    return pairs


class JsonlTask(Task):
    """Prompt pairs read from a JSONL file (loaded and validated on construction)."""

    name = "jsonl"
    description = "Your own prompt pairs: JSONL with text_clean, text_corr, io_clean, s_clean"
    metric_kind = "logit_diff"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.pairs = read_pairs(self.path)

    def generate(self, n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
        """The first n pairs in file order (seed 0), else of a seeded shuffle; fewer if the file is short."""
        if n <= 0:
            raise InvalidParameterError(f"the number of prompts must be positive, got {n}")
        pairs = list(self.pairs)
        if seed != 0:
            random.Random(seed).shuffle(pairs)
        return pairs[:n]
