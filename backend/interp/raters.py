"""Raters for FADE: label texts 0 (concept absent), 1 (vague), 2 (clearly present) given an
explanation, and write texts that express a concept (for clarity).

- `LLMRater`: an OpenAI-compatible endpoint; texts are rated `per_call` at a time, the answer
  read from lines `<number>: <rating>`.
- `OfflineRater` (rater name "offline-proxy"): a *proxy*, not a judgement of meaning. The key
  tokens of an explanation are its quoted strings (the offline explainer quotes the tokens a
  feature fires on) or, without quotes, its content words. A text is rated 2 when it contains
  a key token as a whole word, 1 when a key token (3+ characters) only appears inside a word,
  else 0. Its "texts that express the concept" are templates filled with the key tokens.

  Why a proxy and not a replacement: judging whether a text expresses a concept described in
  words needs a language model. Every network-free rule is lexical, and so shares the offline
  explainer's mechanism (surface tokens): with it, FADE measures whether the quoted tokens
  predict the feature's activation on held-out text, which is worth knowing but is not what a
  human or LLM rating measures. So its scores carry `is_proxy(rater)`, every page and export
  labels them "proxy", and they are never put side by side with human or LLM scores.
- Human ratings come from the dashboard as annotations (see `backend.store.interp`).

Both raters count their calls (a call = one batch of texts to rate, or one generation request)
so that the cost of scoring can be compared across circuits; the offline rater spends no tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from backend.interp.llm import LLMClient, MalformedReply

OFFLINE_RATER = "offline-proxy"
PROXY_NOTE = "proxy: an offline lexical rater, not a judgement of meaning; not comparable with human or LLM ratings"
WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')
STOPWORDS = frozenset("""a an and are as at be by fires for from in is it its of on or that the this to
token tokens with feature activates detects when which word words text""".split())
TEMPLATES: tuple[str, ...] = (
    "{a}", "{a} {b}", "It was {a}.", "They talked about {a} and {b}.", "Then {a} came, and {b} followed.",
    "The word is {a}.", "{a}, {b}, {a}.", "Here is {b}, next to {a}.", "We saw {a} again.",
    "Everyone remembered {b} and {a}.",
)

RATE_SYSTEM = (
    "You judge whether texts express a concept. For each numbered text answer on its own line "
    "'<number>: <rating>' with rating 0 (the concept is absent), 1 (vaguely or partly present) "
    "or 2 (clearly present). Answer with the lines only."
)
GENERATE_SYSTEM = (
    "You write short, varied English texts (one or two sentences each) that clearly express a "
    "given concept. Answer with one text per line, each line starting with '- '."
)


def is_proxy(rater: str) -> bool:
    """Whether scores by `rater` are proxies (the offline rater, under any version of its name)."""
    return rater == OFFLINE_RATER or rater.startswith("offline")


class Rater(Protocol):
    name: str
    calls: int
    tokens: int

    def rate(self, explanation: str, texts: Sequence[str]) -> list[int]: ...

    def generate(self, explanation: str, n: int) -> list[str]: ...


def key_tokens(explanation: str) -> list[str]:
    """An explanation's key tokens: its quoted strings, else its content words (lowercased)."""
    quoted = [(a or b).strip() for a, b in QUOTED.findall(explanation)]
    quoted = [q.lower() for q in quoted if q]
    if quoted:
        return list(dict.fromkeys(quoted))
    words = [w.lower() for w in WORD.findall(explanation.split("(Offline heuristic")[0])]
    return list(dict.fromkeys(w for w in words if w.isalnum() and len(w) >= 3 and w not in STOPWORDS))


class OfflineRater:
    """A deterministic proxy rater (see the module docstring); name "offline-proxy"."""

    name = OFFLINE_RATER

    def __init__(self, per_call: int = 10) -> None:
        self.per_call = per_call
        self.calls = 0
        self.tokens = 0

    def rate_one(self, keys: Sequence[str], text: str) -> int:
        words = {w.lower() for w in WORD.findall(text)}
        lowered = text.lower()
        if any(k in words or (" " in k and k in lowered) for k in keys):
            return 2
        if any(len(k) >= 3 and k in lowered for k in keys):
            return 1
        return 0

    def rate(self, explanation: str, texts: Sequence[str]) -> list[int]:
        self.calls += -(-len(texts) // self.per_call)
        keys = key_tokens(explanation)
        return [self.rate_one(keys, t) for t in texts]

    def generate(self, explanation: str, n: int) -> list[str]:
        self.calls += 1
        keys = key_tokens(explanation) or ["it"]
        out = []
        for i in range(n):
            a, b = keys[i % len(keys)], keys[(i + 1) % len(keys)]
            out.append(TEMPLATES[i % len(TEMPLATES)].format(a=a, b=b))
        return out


def parse_ratings(reply: str, n: int) -> list[int]:
    """Ratings of texts 1..n from lines '<number>: <rating>'; MalformedReply if any is missing."""
    found: dict[int, int] = {}
    for number, rating in re.findall(r"^\s*\(?(\d+)\)?\s*[:.)-]\s*\[?([012])\]?\b", reply or "", re.MULTILINE):
        found.setdefault(int(number), int(rating))
    missing = [i for i in range(1, n + 1) if i not in found]
    if missing:
        raise MalformedReply(f"no rating for text(s) {missing[:5]} in the reply: {(reply or '')[:200]!r}")
    return [found[i] for i in range(1, n + 1)]


def parse_generated(reply: str) -> list[str]:
    """Texts from lines starting with '- ' (or a number); MalformedReply when there are none."""
    texts = [m.strip() for m in re.findall(r"^\s*(?:-|\*|\d+[.)])\s+(.+)$", reply or "", re.MULTILINE)]
    texts = [t for t in texts if t]
    if not texts:
        raise MalformedReply(f"no '- ' lines in the reply: {(reply or '')[:200]!r}")
    return texts


class LLMRater:
    """Ratings and concept texts from an OpenAI-compatible endpoint (name "llm:<model>")."""

    def __init__(self, client: LLMClient, per_call: int = 10) -> None:
        self.client = client
        self.per_call = per_call
        self.name = f"llm:{client.model}"

    @property
    def calls(self) -> int:
        return self.client.usage.calls

    @property
    def tokens(self) -> int:
        return self.client.usage.total_tokens

    def _rate_chunk(self, explanation: str, texts: Sequence[str]) -> list[int]:
        body = f"Concept: {explanation}\n\n" + "\n".join(f"{i + 1}. {t!r}" for i, t in enumerate(texts))
        reply = self.client.chat([{"role": "system", "content": RATE_SYSTEM}, {"role": "user", "content": body}])
        return parse_ratings(reply, len(texts))

    def rate(self, explanation: str, texts: Sequence[str]) -> list[int]:
        chunks = [list(texts[i:i + self.per_call]) for i in range(0, len(texts), self.per_call)]
        results = self.client.map(lambda chunk: self._rate_chunk(explanation, chunk), chunks)
        out: list[int] = []
        for r in results:
            if isinstance(r, Exception):
                raise r
            out += r
        return out

    def generate(self, explanation: str, n: int) -> list[str]:
        reply = self.client.chat([{"role": "system", "content": GENERATE_SYSTEM},
                                  {"role": "user", "content": f"Concept: {explanation}\nWrite {n} texts."}])
        return parse_generated(reply)[:n]
