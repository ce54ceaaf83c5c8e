"""A client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama...).

Configured by PIESCOPE_LLM_BASE_URL (e.g. ``https://api.openai.com/v1``,
``http://localhost:11434/v1`` for Ollama, ``http://host:8000/v1`` for vLLM), PIESCOPE_LLM_API_KEY
(optional for local servers) and PIESCOPE_LLM_MODEL. Requests go to ``{base_url}/chat/completions``.

- Timeouts per request; retries with exponential backoff (and jitter-free, so runs are
  reproducible) on 429, 5xx, timeouts and connection errors, honouring a ``Retry-After`` header
  (seconds or an HTTP date), capped at ``max_backoff``.
- A concurrency limit: `map` runs at most ``concurrency`` requests at a time.
- Accounting: requests, failures, retries and the ``usage`` tokens the server reports.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import httpx

from backend.errors import UserError
from backend.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class LLMError(UserError):
    """The endpoint failed (after retries) or answered something unusable."""

    http_status = 502


class MalformedReply(LLMError):
    """The endpoint answered, but not in the format that was asked for."""


class LLMNotConfigured(UserError):
    """An LLM explainer or rater was asked for, but no endpoint is configured."""

    http_status = 422


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call the endpoint."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    concurrency: int = 4
    temperature: float = 0.0
    max_tokens: int = 400

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LLMConfig:
        """The endpoint of PIESCOPE_LLM_BASE_URL / _MODEL / _API_KEY; LLMNotConfigured if unset."""
        if not settings.llm_base_url or not settings.llm_model:
            raise LLMNotConfigured("no LLM endpoint configured: set PIESCOPE_LLM_BASE_URL and PIESCOPE_LLM_MODEL "
                                   "(and PIESCOPE_LLM_API_KEY if it needs one), or use the offline explainer/rater")
        return cls(base_url=settings.llm_base_url, model=settings.llm_model, api_key=settings.llm_api_key,
                   **overrides)


@dataclass
class Usage:
    """What the client spent: requests sent (retries included), failed calls, and tokens."""

    calls: int = 0
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        return {**data, "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: an integer of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class LLMClient:
    """Chat completions with retries, a concurrency limit and usage accounting (thread-safe)."""

    def __init__(self, config: LLMConfig, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.usage = Usage()
        self._sleep = sleep
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._http = httpx.Client(base_url=config.base_url.rstrip("/") + "/", headers=headers,
                                  timeout=httpx.Timeout(config.timeout), transport=transport)
        self._slots = threading.BoundedSemaphore(max(1, config.concurrency))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> str:
        return self.config.model

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        wait = retry_after_seconds(response.headers.get("Retry-After")) if response is not None else None
        if wait is None:
            wait = self.config.backoff * (2 ** attempt)
        return min(wait, self.config.max_backoff)

    def chat(self, messages: Sequence[dict[str, str]], **options: Any) -> str:
        """The assistant's reply to `messages` ([{"role", "content"}]); LLMError after retries."""
        body = {"model": self.config.model, "messages": list(messages), "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens, **options}
        self.usage.add(calls=1)
        last_error = "no attempt made"
        with self._slots:
            for attempt in range(self.config.max_retries + 1):
                response: httpx.Response | None = None
                if attempt:
                    self.usage.add(retries=1)
                self.usage.add(requests=1)
                try:
                    response = self._http.post("chat/completions", json=body)
                except httpx.TimeoutException:
                    last_error = f"timed out after {self.config.timeout:g} s"
                except httpx.TransportError as err:
                    last_error = f"connection failed: {err}"
                else:
                    if response.status_code < 400:
                        return self._content(response)
                    last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                    if response.status_code not in RETRY_STATUSES:
                        break
                if attempt < self.config.max_retries:
                    wait = self._delay(attempt, response)
                    log.info("LLM request failed (%s); retrying in %.2f s", last_error, wait)
                    self._sleep(wait)
        self.usage.add(failures=1)
        raise LLMError(f"LLM endpoint {self.config.base_url}: {last_error}")

    def _content(self, response: httpx.Response) -> str:
        try:
            data = response.json()
        except ValueError:
            self.usage.add(failures=1)
            raise MalformedReply(f"the endpoint's answer is not JSON: {response.text[:200]!r}") from None
        usage = (data.get("usage") or {}) if isinstance(data, dict) else {}
        self.usage.add(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                       completion_tokens=int(usage.get("completion_tokens") or 0))
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            self.usage.add(failures=1)
            raise MalformedReply(f"no choices[0].message.content in the answer: {str(data)[:200]!r}") from None
        if not isinstance(content, str):
            self.usage.add(failures=1)
            raise MalformedReply("the answer's message content is not text")
        return content

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R | Exception]:
        """fn over items with at most `concurrency` in flight; each result or the exception it raised."""
        def safe(item: T) -> R | Exception:
            try:
                return fn(item)
            except Exception as err:  # one item's failure is that item's result, not the batch's
                return err
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.config.concurrency, len(items)))) as pool:
            return list(pool.map(safe, items))
