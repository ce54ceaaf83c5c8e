"""Explainers: text explanations of features from their harvested examples and statistics.

- `LLMExplainer`: any OpenAI-compatible endpoint (`backend.interp.llm`). The prompt shows the
  feature's example windows with every token above `highlight` x the feature's max activation
  wrapped in `<<...>>`, plus its logit-lens tokens; the answer is read from an `[EXPLANATION]:`
  line. A reply without one is an error for that feature only (MalformedReply).
- `OfflineExplainer`: deterministic and network-free. A *heuristic*, not a language model: it
  names the most frequent highlighted tokens of the examples (quoted, so that the offline rater
  can find them) and the logit-lens tokens the feature's decoder promotes.
- People write explanations in the dashboard (source "human", through the API).

Every explanation records its source (llm | offline | human) and model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.interp.llm import LLMClient, MalformedReply

HIGHLIGHT = 0.5
OFFLINE_MODEL = "offline-heuristic-v1"
EXPLANATION_LINE = re.compile(r"^\s*\[EXPLANATION\]\s*:\s*(.+?)\s*$", re.MULTILINE)

SYSTEM_PROMPT = (
    "You are an interpretability researcher studying one feature of a language model. You see text "
    "excerpts where the feature activates; tokens where it activates strongly are wrapped in <<...>>. "
    "You also see the output tokens the feature promotes. Describe in one short sentence what the "
    "feature detects. End your answer with a line of the form\n[EXPLANATION]: <your explanation>"
)


@dataclass
class FeatureInput:
    """What an explainer sees of one feature: statistics and examples as the harvest stored them."""

    layer: int
    feature: int
    statistics: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ExplainResult:
    """One feature's explanation, or the error that prevented it (then text is None)."""

    layer: int
    feature: int
    text: str | None
    source: str
    model: str
    error: str | None = None


class Explainer(Protocol):
    source: str
    model: str

    def explain_all(self, inputs: Sequence[FeatureInput]) -> list[ExplainResult]: ...


def highlighted(example: dict[str, Any], threshold: float) -> list[bool]:
    """Per token of an example, whether its activation is above `threshold` (and > 0)."""
    return [a > threshold and a > 0 for a in example["activations"]]


def mark_example(example: dict[str, Any], threshold: float) -> str:
    """The example's text with tokens above `threshold` wrapped in <<...>>."""
    return "".join(f"<<{t}>>" if h else t for t, h in zip(example["tokens"], highlighted(example, threshold)))


def top_highlighted_tokens(inputs: FeatureInput, fraction: float = HIGHLIGHT, n: int = 3) -> list[str]:
    """The `n` most frequent highlighted tokens (stripped, non-empty) over the top examples."""
    max_act = float(inputs.statistics.get("max_activation") or 0.0)
    counts: Counter[str] = Counter()
    examples = [e for e in inputs.examples if e.get("quantile", 0) == 0] or inputs.examples
    for ex in examples:
        for tok, h in zip(ex["tokens"], highlighted(ex, fraction * max_act)):
            if h and tok.strip():
                counts[tok.strip()] += 1
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def explanation_prompt(inputs: FeatureInput, fraction: float = HIGHLIGHT,
                       max_examples: int = 12) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of one feature."""
    max_act = float(inputs.statistics.get("max_activation") or 0.0)
    lines = [f"Example {i + 1}: {mark_example(ex, fraction * max_act)}"
             for i, ex in enumerate(inputs.examples[:max_examples])]
    promoted = [t for t, _ in inputs.statistics.get("logit_lens", {}).get("top", [])][:10]
    user = "\n".join(lines) or "(no activating examples were found)"
    if promoted:
        user += "\n\nTokens the feature promotes: " + ", ".join(repr(t) for t in promoted)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_explanation(reply: str) -> str:
    """The text after the last `[EXPLANATION]:`; MalformedReply when there is none."""
    found = EXPLANATION_LINE.findall(reply or "")
    if not found or not found[-1].strip():
        raise MalformedReply(f"no '[EXPLANATION]:' line in the reply: {(reply or '')[:200]!r}")
    return found[-1].strip()


class OfflineExplainer:
    """A deterministic heuristic from the harvested statistics (no network, no language model)."""

    source = "offline"
    model = OFFLINE_MODEL

    def __init__(self, fraction: float = HIGHLIGHT) -> None:
        self.fraction = fraction
        self.calls = 0

    def explain(self, inputs: FeatureInput) -> str:
        self.calls += 1
        fires = top_highlighted_tokens(inputs, self.fraction)
        promoted = [t.strip() for t, _ in inputs.statistics.get("logit_lens", {}).get("top", [])[:3] if t.strip()]
        if fires:
            text = "Fires on " + ", ".join(f'"{t}"' for t in fires)
        else:
            text = "Rarely active in the corpus"
        if promoted:
            text += "; its decoder promotes " + " / ".join(promoted)
        return text + ". (Offline heuristic: frequent highlighted tokens and logit lens, not a language model.)"

    def explain_all(self, inputs: Sequence[FeatureInput]) -> list[ExplainResult]:
        return [ExplainResult(i.layer, i.feature, self.explain(i), self.source, self.model) for i in inputs]


class LLMExplainer:
    """Explanations from an OpenAI-compatible endpoint, `concurrency` requests at a time."""

    source = "llm"

    def __init__(self, client: LLMClient, fraction: float = HIGHLIGHT) -> None:
        self.client = client
        self.fraction = fraction
        self.model = client.model

    @property
    def calls(self) -> int:
        return self.client.usage.calls

    def explain(self, inputs: FeatureInput) -> str:
        return parse_explanation(self.client.chat(explanation_prompt(inputs, self.fraction)))

    def explain_all(self, inputs: Sequence[FeatureInput]) -> list[ExplainResult]:
        out = []
        for i, result in zip(inputs, self.client.map(self.explain, list(inputs))):
            if isinstance(result, Exception):
                out.append(ExplainResult(i.layer, i.feature, None, self.source, self.model,
                                         error=f"{type(result).__name__}: {result}"))
            else:
                out.append(ExplainResult(i.layer, i.feature, result, self.source, self.model))
        return out
