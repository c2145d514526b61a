"""Reads adapters from disk into the pool's host cache off the step loop, one at a time.

The engine asks `ready(name)` for each waiting request's adapter: the first call starts
`pool.prefetch_to_host(name)` on the loader thread, later calls say whether it is done (and
raise its error if the read failed). Admission then copies the host weights into a device slot
with `pool.acquire`, which no longer touches the disk. A finished read is forgotten once the
engine has admitted a request with it (`discard`): from then on the adapter is resident.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from flora_core.adapter_pool import AdapterPool


class AdapterLoader:
    """One background thread running `pool.prefetch_to_host`, one read per adapter name at a time."""

    def __init__(self, pool: AdapterPool, on_done: Callable[[], None]) -> None:
        self._pool = pool
        self._on_done = on_done  # called on the loader thread after every read: wakes the step loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flora-adapter-loader")
        self._lock = threading.Lock()
        self._reads: dict[str, Future] = {}

    def ready(self, name: str) -> bool:
        """True once `name` is in host memory; starts its read if none is under way.

        A failed read raises its error here, once: the next call starts a fresh read.
        """
        with self._lock:
            read = self._reads.get(name)
            if read is None:
                read = self._executor.submit(self._pool.prefetch_to_host, name)
                read.add_done_callback(lambda _: self._on_done())
                self._reads[name] = read
                return False
            if not read.done():
                return False
            if read.exception() is not None:
                del self._reads[name]
                raise read.exception()
            return True

    def discard(self, name: str) -> None:
        """Forget a finished read of `name` (its adapter now lives in a device slot)."""
        with self._lock:
            read = self._reads.get(name)
            if read is not None and read.done():
                del self._reads[name]

    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for read in self._reads.values() if not read.done())

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
