"""A small thread-safe LRU of serialised responses, keyed by (id, revision).

A hit is served without touching the store while its revision was confirmed within `max_age`
seconds; `keep_confirmed` re-reads the revisions of all entries in one query twice per max_age,
and a request finding an older entry re-validates it with one primary-key read. ORM writes committed
in this process (the API, its jobs, an in-process CLI command) invalidate at once: one listener
on every Session drops the changed rows from every live cache. Writers in other processes (a
second worker, a CLI in another shell, Ray workers on a shared PostgreSQL store) are seen within
`max_age`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable

import anyio
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

log = logging.getLogger(__name__)
STALE_KEY = "piescope_stale_cache_keys"
_LIVE: weakref.WeakSet[ResponseCache] = weakref.WeakSet()


class ResponseCache:
    """Serialised JSON bodies of immutable-per-revision records (e.g. circuits).

    A circuit's detail is tens of kilobytes of JSON; validating and serialising it costs
    milliseconds, and even reading its revision costs more than serving the cached bytes.
    """

    def __init__(self, mapped: type, max_entries: int = 256, max_age: float = 1.0, max_builds: int = 2) -> None:
        """mapped: the ORM class whose rows' ids are the keys (commits changing them invalidate).
        max_builds: bodies built at once in the threadpool (see `build`)."""
        self.mapped = mapped
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_builds = max_builds
        # per event loop: the build limiter and the builds in flight by key
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[anyio.CapacityLimiter,
                                               dict[int, asyncio.Future[bytes]]]] = weakref.WeakKeyDictionary()
        # key -> (revision, body, monotonic time the revision was last confirmed)
        self._data: OrderedDict[int, tuple[int, bytes, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._asked: set[int] = set()
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

    def holds(self, key: int) -> bool:
        """Whether an entry (fresh or not) is cached for key."""
        with self._lock:
            return key in self._data

    async def build(self, key: int, make: Callable[..., tuple[int, bytes]], *args: object) -> bytes:
        """The body of `key`, made by `make(*args) -> (revision, body)` in a worker thread and cached.

        Concurrent requests for one key share one build, and at most max_builds run at once:
        a build is GIL-bound (decode, validate, serialise), and forty of them at once after a
        start-up take turns with the event loop and stall the cached hits behind them. The build
        is its own task, so a client that goes away does not cancel it for the others.
        """
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = (anyio.CapacityLimiter(self.max_builds), {})
        limiter, building = state
        task = building.get(key)
        if task is None:
            task = building[key] = asyncio.ensure_future(self._make(key, make, args, limiter))
            task.add_done_callback(lambda _: building.pop(key, None))
        return await asyncio.shield(task)

    async def _make(self, key: int, make: Callable[..., tuple[int, bytes]], args: tuple,
                    limiter: anyio.CapacityLimiter) -> bytes:
        revision, body = await anyio.to_thread.run_sync(make, *args, limiter=limiter)
        self.put(key, revision, body)
        return body

    def put(self, key: int, revision: int, body: bytes) -> None:
        with self._lock:
            self._data[key] = (revision, body, time.monotonic())
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def ask(self) -> list[int]:
        """The keys a refresher should read revisions for (remembered, so deleted rows drop out)."""
        with self._lock:
            self._asked = set(self._data)
            return list(self._asked)

    def confirm(self, revisions: dict[int, int], checked_at: float) -> None:
        """The revisions read at `checked_at` for the asked keys: entries still of that revision count
        as confirmed then; changed or missing ones (the row was updated or deleted) are dropped."""
        with self._lock:
            for key in self._asked & self._data.keys():
                revision, body, checked = self._data[key]
                if revisions.get(key) == revision:
                    self._data[key] = (revision, body, max(checked, checked_at))
                else:
                    del self._data[key]
            self._asked = set()

    def invalidate(self, keys: Iterable[int]) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)


def read_revisions(engine: Engine, mapped: type, keys: list[int]) -> dict[int, int]:
    """{id: revision} of the rows of `mapped` among `keys` (one indexed query)."""
    with engine.connect() as conn:
        return dict(conn.execute(select(mapped.id, mapped.revision).where(mapped.id.in_(keys))).all())


async def keep_confirmed(cache: ResponseCache, engine: Engine) -> None:
    """Re-read every cached entry's revision twice per max_age, in one query off the event loop,
    so that requests for cached records never wait on the store (runs until cancelled)."""
    while True:
        await asyncio.sleep(cache.max_age / 2)
        keys = cache.ask()
        if not keys:
            continue
        checked_at = time.monotonic()
        try:
            revisions = await run_in_threadpool(read_revisions, engine, cache.mapped, keys)
        except Exception as err:  # the store is away: entries age out and requests re-validate themselves
            log.warning("could not re-read cached revisions: %s", err)
            continue
        cache.confirm(revisions, checked_at)


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
