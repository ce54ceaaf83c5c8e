"""Doc-String (Heimersheim & Janiak 2023): predict the next parameter name in a docstring.

Clean prompt::

    def {fn}(self, {P1}, {P2}, {A}, {B}, {C}, {S}):
        \"\"\"{description}

        :param {A}: {words}
        :param {B}: {words}
        :param

The answer is " {C}" (the argument after A and B); the distractors are the other argument names
(P1, P2, A, B, S). The corruption replaces A and B in the docstring by two random names that are
not arguments, so nothing in the docstring points at C. Metric: logit(C) - max distractor logit.
"""

from __future__ import annotations

import random
from typing import Any

from backend.errors import InvalidParameterError, UserError
from backend.tasks.base import PromptPair, Task, single_token_id

# Short lowercase words, most of them one token with a leading space for common tokenizers.
WORDS: tuple[str, ...] = (
    "load", "size", "files", "last", "data", "name", "value", "key", "index", "count", "path",
    "port", "host", "user", "text", "line", "item", "node", "mode", "type", "state", "level",
    "limit", "start", "end", "step", "rate", "time", "date", "file", "page", "list", "table",
    "field", "form", "image", "color", "shape", "width", "height", "order", "group", "role",
    "token", "code", "source", "target", "label", "model", "query", "result", "error", "event",
    "action", "status", "option", "config", "parent", "child", "root",
)
# Description words are kept apart from argument names so they never hint at an argument.
DESCRIPTION_WORDS: tuple[str, ...] = (
    "oil", "column", "piece", "set", "sheet", "scope", "river", "glass", "wall", "door", "song",
    "bird", "stone", "cloud", "paper", "field", "horse", "light", "plant", "fire",
)
TEMPLATE = (
    'def {fn}(self, {P1}, {P2}, {A}, {B}, {C}, {S}):\n'
    '    """{desc}\n\n'
    '    :param {DA}: {d1}\n'
    '    :param {DB}: {d2}\n'
    '    :param'
)


class DocstringTask(Task):
    """Doc-String prompt pairs; metric logit(C) - max logit over the other argument names."""

    name = "docstring"
    description = "Doc-String (Heimersheim & Janiak): predict the next :param name; random-doc corruption"
    metric_kind = "logit_diff_max"

    def words_for(self, tokenizer: Any = None) -> list[str]:
        """The argument names usable with `tokenizer`: one token with a leading space."""
        desc = set(DESCRIPTION_WORDS)
        words = [w for w in WORDS if w not in desc
                 and (tokenizer is None or single_token_id(tokenizer, " " + w) is not None)]
        # fn, six arguments and two replacement names must all differ.
        if len(words) < 9:
            raise UserError(f"Doc-String needs at least 9 one-token names for this tokenizer; only {len(words)} are")
        return words

    def generate(self, n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
        if n <= 0:
            raise InvalidParameterError(f"the number of prompts must be positive, got {n}")
        words = self.words_for(tokenizer)
        rng = random.Random(seed)
        pairs = []
        for _ in range(n):
            fn, p1, p2, a, b, c, s, ra, rb = rng.sample(words, 9)
            desc = " ".join(rng.sample(DESCRIPTION_WORDS, 3))
            d1 = " ".join(rng.sample(DESCRIPTION_WORDS, 2))
            d2 = rng.choice(DESCRIPTION_WORDS)
            common = dict(fn=fn, P1=p1, P2=p2, A=a, B=b, C=c, S=s, desc=desc, d1=d1, d2=d2)
            pairs.append(PromptPair(
                clean=TEMPLATE.format(DA=a, DB=b, **common),
                corrupted=TEMPLATE.format(DA=ra, DB=rb, **common),
                answer=" " + c,
                distractors=tuple(" " + w for w in (p1, p2, a, b, s)),
                meta={"fn": fn, "args": [p1, p2, a, b, c, s], "replaced": [ra, rb]},
            ))
        return pairs
