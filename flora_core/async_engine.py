"""Streaming on top of `Engine`: the step loop on a background thread, one asyncio queue per request.

    async with AsyncEngine(engine) as served:
        async for output in served.generate("Hello", SamplingParams(max_tokens=32), adapter="fr-lora"):
            print(output.delta_text, end="")

`generate` is an async iterator of `RequestOutput` increments; the last one has `finished`. A
consumer that stops early (break, `aclose()`, or its task cancelled: asyncio.CancelledError)
aborts the request, and the next step frees its row, its KV cache and its adapter pin. A
request that fails (its adapter could not be loaded) raises that error from the iterator.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import defaultdict
from typing import AsyncIterator, Sequence

from flora_core.engine import Engine
from flora_core.request_output import EngineStats, RequestOutput
from flora_core.sampling_params import SamplingParams

IDLE_POLL_SECONDS = 0.05  # how long the loop sleeps when no request can progress (adapters loading)


class EngineClosedError(RuntimeError):
    """The AsyncEngine was closed while the request was in flight."""


class AsyncEngine:
    """Runs `engine.step()` on a daemon thread and routes each output to its request's queue."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    async def __aenter__(self) -> "AsyncEngine":
        self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise EngineClosedError("this AsyncEngine is closed; build a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flora-engine-loop", daemon=True)
                self._thread.start()

    def is_running(self) -> bool:
        """True while the step loop thread runs: False before start, after close, or if the loop died."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def close(self) -> None:
        """Stop the loop thread (after its current step); requests in flight end with EngineClosedError."""
        self._stopping.set()
        self._engine.wake()
        if self._thread is not None:
            self._thread.join()
        self._deliver(self._engine.fail_all(EngineClosedError("the engine was closed")))
        self._engine.close()

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs as steps produce them; see the module docstring."""
        self.start()
        request_id = uuid.uuid4().hex if request_id is None else request_id
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already streaming; pass a unique id, or None")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)  # before add: outputs may come at once
        added = finished = False
        try:
            if params is not None and params.structured_output is not None:  # compile off the event loop
                await asyncio.to_thread(self._engine.compile_grammar, params.structured_output)
            self._engine.add_request(prompt, params, adapter, request_id)
            added = True
            while not finished:
                output = await queue.get()
                finished = output.finished
                if output.error is not None:
                    raise output.error
                yield output
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if added and not finished:
                self._engine.abort(request_id)

    def abort(self, request_id: str) -> bool:
        """End a request at the next step; its stream gets a last output with finish_reason "abort"."""
        return self._engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def _run(self) -> None:
        engine = self._engine
        while not self._stopping.is_set():
            if not engine.has_unfinished():
                engine.wait_for_work()
                continue
            try:
                outputs = engine.step()
            except Exception as error:  # a failed forward pass ends every request in flight, not the loop
                outputs = engine.fail_all(error)
            self._deliver(outputs)
            if not outputs:  # nothing runs: waiting for an adapter read or for a free slot
                engine.wait_for_work(IDLE_POLL_SECONDS)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams: one call into each event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = defaultdict(list)
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    by_loop[stream[0]].append((stream[1], output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)
