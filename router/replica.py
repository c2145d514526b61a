"""The replica deployment: one base model, its adapter pool and the generation engine.

The router sends it whole batches (`generate_batch`): every request of a batch is admitted into
the engine at once, so requests for different adapters prefill and decode together, each row
with its own adapter. Adapters are read lazily from the adapter root the first time a request
names them, under their catalog version, so a reloaded adapter never reuses stale weights; a
merged adapter is merged from its components' folders then, on the pool's loader thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from typing import AsyncIterator, Optional

import torch
from ray import serve
from transformers import AutoTokenizer

from flora_core.adapter_merge import MergedSource
from flora_core.adapter_pool import PoolExhaustedError, UnknownAdapterError
from flora_core.adapter_root import AdapterRoot
from flora_core.async_engine import AsyncEngine
from flora_core.engine import Engine
from flora_core.host_memory import keep_freed_host_memory
from flora_core.multi_adapter_model import MultiAdapterModel
from flora_core.request_output import as_whole_answer, merge_outputs
from router.errors import error_for_exception
from router.messages import AdapterRef, ReplicaError, ReplicaEvent, ReplicaRequest
from router.metrics import ReplicaMetrics
from router.settings import ReplicaSettings

logger = logging.getLogger("ray.serve")


class FloraReplica:
    """Holds the model and engine; see the module docstring. Deployed by deploy.app.build_app."""

    def __init__(self, settings: ReplicaSettings) -> None:
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        if settings.keep_freed_host_memory and not keep_freed_host_memory():
            logger.info("flora replica: this C library is not glibc; freed host memory is managed its own way")
        logger.info("flora replica: loading %s (%s on %s)", settings.model_path, settings.dtype, settings.device)
        self.model = MultiAdapterModel.from_pretrained(
            settings.model_path, dtype=settings.torch_dtype(), device=settings.device,
            capacity=settings.capacity(), limits=settings.pool_limits(),
        )
        tokenizer = AutoTokenizer.from_pretrained(settings.model_path, local_files_only=True)
        self.engine = AsyncEngine(Engine(self.model, settings.engine_config(), tokenizer))
        self.engine.start()
        self.root = AdapterRoot(settings.adapter_dir) if settings.adapter_dir else None
        self._versions: dict[str, AdapterRef] = {}  # adapter name -> its newest ref registered in the pool
        self._users: Counter[str] = Counter()  # pool key -> requests of this replica using it now
        self._stale: set[str] = set()  # keys of older versions, unregistered once no request uses them
        self._metrics = ReplicaMetrics()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else "local"
        logger.info("flora replica %s: ready", self.replica_id)

    # ------------------------------------------------------------ serving

    async def generate_batch(self, requests: list[ReplicaRequest]) -> AsyncIterator[object]:
        """Stream a batch: first this replica's id, then one list per message, entry i = request i's events.

        A message goes out at most every `stream_interval_ms`: outputs a request made in between
        are merged into one (flora_core.request_output.merge_outputs), so the ingress and proxy
        handle one message per interval instead of one per engine step. A message never waits
        when the previous one left longer than the interval ago (first tokens go out at once). A
        request with `whole_answer` gets one event, when it finishes (as_whole_answer).
        """
        yield self.replica_id
        events: asyncio.Queue[tuple[int, ReplicaEvent]] = asyncio.Queue()
        pumps = [asyncio.create_task(self._pump(i, request, events)) for i, request in enumerate(requests)]
        loop = asyncio.get_running_loop()
        interval_s, sent_at = self.settings.stream_interval_ms / 1e3, -math.inf
        remaining = len(requests)
        try:
            while remaining:
                step: list[list[ReplicaEvent]] = [[] for _ in requests]
                index, event = await events.get()
                step[index].append(event)
                if (wait_s := sent_at + interval_s - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                while not events.empty():
                    index, more = events.get_nowait()
                    step[index].append(more)
                remaining -= sum(1 for per_request in step for e in per_request if e.finished)
                sent_at = loop.time()
                yield [_merged_events(per_request) for per_request in step]
        finally:
            for pump in pumps:  # a cancelled stream aborts whatever is still running
                pump.cancel()
            self._metrics.record_pool(self.model.pool.stats())

    async def _pump(self, index: int, request: ReplicaRequest, events: asyncio.Queue) -> None:
        adapter = None
        try:
            adapter = self._register(request.adapter)
            stream = self.engine.generate(list(request.prompt_token_ids), request.params, adapter, request.request_id)
            async for output in stream:
                if request.whole_answer:  # nothing to send before the end: fewer messages for ingress and proxy
                    if not output.finished:
                        continue
                    output = as_whole_answer(output)
                events.put_nowait((index, ReplicaEvent(output=output)))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # reported to this request's client; the replica keeps serving
            if not isinstance(error, (ValueError, UnknownAdapterError, PoolExhaustedError)):
                logger.exception("flora replica: request %s failed", request.request_id)
            api_error = error_for_exception(error)
            message = self.root.relative(api_error.message) if self.root else api_error.message
            events.put_nowait((index, ReplicaEvent(error=ReplicaError(
                status=api_error.status, message=message, type=api_error.type, param=api_error.param))))
        finally:
            if adapter is not None:
                self._release(adapter)

    def _register(self, ref: Optional[AdapterRef]) -> Optional[str]:
        """The pool name of ref's version, registered (lazily read) on first use; held until `_release`."""
        if ref is None:
            return None
        pool = self.model.pool
        if not pool.is_registered(ref.key):
            if self.root is None:
                raise UnknownAdapterError(ref.name)
            pool.register(ref.key, self._source(ref))
        newest = self._versions.get(ref.name)
        if newest is None or ref.order > newest.order:
            self._versions[ref.name] = ref
            if newest is not None:
                self._stale.add(newest.key)
        elif ref.order < newest.order:  # sent by an ingress whose catalog copy is a moment old
            self._stale.add(ref.key)
        self._users[ref.key] += 1
        self._drop_unused_stale()
        return ref.key

    def _source(self, ref: AdapterRef):
        """Where the pool reads ref from: its folder, or its components' folders and weights for a merge."""
        if not ref.merged_from:
            return self.root.resolve(ref.name)
        return MergedSource(tuple(self.root.resolve(name) for name, _ in ref.merged_from),
                            tuple(weight for _, weight in ref.merged_from))

    def _release(self, key: str) -> None:
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key]
        self._drop_unused_stale()

    def _drop_unused_stale(self) -> None:
        """Unregister older versions that no request here uses: never one still in use, since a
        waiting request would lose its adapter (a 404 mid-flight) and a running one its slot. One the
        engine still pins (a cancelled request whose abort it has not stepped yet) waits for a later call."""
        for key in [key for key in self._stale if not self._users[key]]:
            try:
                self.model.pool.unregister(key)
            except UnknownAdapterError:
                pass
            except ValueError:  # still pinned: kept in _stale, dropped by a later register or release
                continue
            self._stale.discard(key)

    async def abort(self, request_id: str, target_replica: Optional[str] = None) -> bool:
        """End a request at the next step (a client went away). target_replica steers the router only."""
        return self.engine.abort(request_id)

    # ------------------------------------------------------------ Ray Serve hooks

    def record_routing_stats(self) -> dict:
        """Read by router.adapter_router: which adapters are resident here, and how busy it is."""
        stats = self.engine.stats()
        resident = sorted({key.rsplit("@", 1)[0] for key in self.model.pool.resident()})
        self._metrics.record_engine(stats)
        return {"resident_adapters": resident, "load": stats.running + stats.waiting}

    async def check_health(self) -> None:
        if not self.engine.is_running():
            raise RuntimeError("the engine loop has stopped; Serve will restart this replica")

    async def stats(self, target_replica: Optional[str] = None) -> dict:
        """Engine and pool counters of this replica (target_replica steers the router only)."""
        engine, pool = self.engine.stats(), self.model.pool.stats()
        return {"replica_id": self.replica_id, "engine": vars(engine),
                "pool": {k: v for k, v in vars(pool).items() if k != "resident"},
                "resident_adapters": sorted(self.model.pool.resident())}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _merged_events(events: list[ReplicaEvent]) -> list[ReplicaEvent]:
    """One request's events of one message, its outputs merged into one (an error stays last)."""
    outputs = [e.output for e in events if e.output is not None]
    if len(outputs) < 2:
        return events
    return [ReplicaEvent(output=merge_outputs(outputs)), *(e for e in events if e.error is not None)]
