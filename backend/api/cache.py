"""A small thread-safe LRU of serialised responses, keyed by (id, revision).

A hit is served without touching the store while its revision was confirmed within `max_age`
seconds; after that one primary-key read of the revision re-validates it. ORM writes committed
in this process (the API, its jobs, an in-process CLI command) invalidate at once: one listener
on every Session drops the changed rows from every live cache. Writers in other processes (a
second worker, a CLI in another shell, Ray workers on a shared PostgreSQL store) are seen within
`max_age`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable

from sqlalchemy import event
from sqlalchemy.orm import Session

STALE_KEY = "piescope_stale_cache_keys"
_LIVE: weakref.WeakSet[ResponseCache] = weakref.WeakSet()


class ResponseCache:
    """Serialised JSON bodies of immutable-per-revision records (e.g. circuits).

    A circuit's detail is tens of kilobytes of JSON; validating and serialising it costs
    milliseconds, and even reading its revision costs more than serving the cached bytes.
    """

    def __init__(self, mapped: type, max_entries: int = 256, max_age: float = 1.0) -> None:
        """mapped: the ORM class whose rows' ids are the keys (commits changing them invalidate)."""
        self.mapped = mapped
        self.max_entries = max_entries
        self.max_age = max_age
        # key -> (revision, body, monotonic time the revision was last confirmed)
        self._data: OrderedDict[int, tuple[int, bytes, float]] = OrderedDict()
        self._lock = threading.Lock()
        _LIVE.add(self)

    def fresh(self, key: int) -> bytes | None:
        """The body if its revision was confirmed within max_age seconds, else None."""
        with self._lock:
            hit = self._data.get(key)
            if hit is None or time.monotonic() - hit[2] > self.max_age:
                return None
            self._data.move_to_end(key)
            return hit[1]

    def get(self, key: int, revision: int) -> bytes | None:
        """The body if it is of `revision` (which the caller just read); confirms it."""
        with self._lock:
            hit = self._data.get(key)
            if hit is None or hit[0] != revision:
                return None
            self._data[key] = (revision, hit[1], time.monotonic())
            self._data.move_to_end(key)
            return hit[1]

    def put(self, key: int, revision: int, body: bytes) -> None:
        with self._lock:
            self._data[key] = (revision, body, time.monotonic())
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def invalidate(self, keys: Iterable[int]) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)


@event.listens_for(Session, "after_flush")
def _collect(session: Session, _context) -> None:
    # After a flush the dirty/deleted collections still show what the flush wrote.
    changed = {(type(obj), obj.id) for obj in (*session.dirty, *session.deleted)
               if any(isinstance(obj, cache.mapped) for cache in _LIVE)}
    if changed:
        session.info.setdefault(STALE_KEY, set()).update(changed)


@event.listens_for(Session, "after_commit")
def _invalidate(session: Session) -> None:
    changed = session.info.pop(STALE_KEY, ())
    for cache in list(_LIVE):
        cache.invalidate(key for kind, key in changed if issubclass(kind, cache.mapped))


@event.listens_for(Session, "after_rollback")
def _forget(session: Session) -> None:
    session.info.pop(STALE_KEY, None)
