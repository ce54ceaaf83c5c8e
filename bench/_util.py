"""Shared bits of the benchmarks: the demo setup, a peak-RSS sampler and table printing."""

from __future__ import annotations

import os
import threading
import time


def demo_ioi(n: int, settings=None):
    """(adapter, transcoder name, transcoder, IOI batch of n pairs, seed 0) on the demo model and CLT."""
    from backend.models.loading import load_model
    from backend.models.registry import DEMO_MODEL
    from backend.models.transcoder_files import load_transcoder
    from backend.models.transcoder_registry import resolve_transcoder
    from backend.settings import Settings
    from backend.tasks import get_task
    settings = settings or Settings()
    adapter = load_model(DEMO_MODEL, settings)
    tc_name, tc_path = resolve_transcoder(f"{DEMO_MODEL}/clt", settings)
    return adapter, tc_name, load_transcoder(tc_path), get_task("ioi").build(adapter.tokenizer, n, seed=0)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples RSS every 20 ms in a thread and attributes each sample to the current label.

    Set ``label`` from a progress callback; ``peaks[label]`` is the largest RSS seen under it.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.label = interval, "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes()
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table (pastes into notes and issues as is)."""
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
