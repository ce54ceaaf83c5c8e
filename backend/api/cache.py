"""A small thread-safe LRU of serialised responses, keyed by (id, revision)."""

from __future__ import annotations

import threading
from collections import OrderedDict


class ResponseCache:
    """Serialised JSON bodies of immutable-per-revision records (e.g. circuits).

    A circuit's detail is tens of kilobytes of JSON; validating and serialising it costs
    milliseconds, reading its revision a fraction of one. Entries for an older revision are
    simply replaced.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int, revision: int) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None or hit[0] != revision:
                return None
            self._data.move_to_end(key)
            return hit[1]

    def put(self, key: int, revision: int, body: bytes) -> None:
        with self._lock:
            self._data[key] = (revision, body)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
