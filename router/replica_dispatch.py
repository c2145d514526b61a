"""Requests to model replicas in `@serve.batch` groups, and each request's outputs back.

Concurrent requests, whatever their adapters, are grouped by `@serve.batch` (max_batch_size,
batch_wait_timeout_s, max_concurrent_batches from the settings) and each group goes to one replica
in ONE streaming call, chosen by router.adapter_router; the replica runs them in one engine, each
row with its own adapter, and streams every step's events back, which are fanned out per request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import ExitStack, contextmanager
from typing import AsyncIterator, Iterator, Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from flora_core.request_output import RequestOutput
from flora_core.sampling_params import SamplingParams
from router.errors import ApiError, error_for_exception, overloaded
from router.messages import AdapterRef, ReplicaRequest
from router.metrics import IngressMetrics
from router.settings import IngressSettings

logger = logging.getLogger("ray.serve")

StartedStream = tuple[AsyncIterator[RequestOutput], RequestOutput]  # a request's outputs, and its first one


def new_job(ids: list[int], params: SamplingParams, adapter: Optional[AdapterRef],
            whole_answer: bool) -> ReplicaRequest:
    """A request for the replicas under a fresh id: prompt token ids, sampling, adapter (None: the base model);
    whole_answer: the client is not streaming, so the replica sends only the finished output."""
    return ReplicaRequest(request_id=uuid.uuid4().hex, prompt_token_ids=tuple(ids), params=params, adapter=adapter,
                          whole_answer=whole_answer)


class ReplicaDispatch:
    """The ingress's side of the replicas: admission up to max_queued_requests, batching, outputs, aborts."""

    def __init__(self, settings: IngressSettings, replica: DeploymentHandle, metrics: IngressMetrics) -> None:
        self.settings = settings
        self.replica = replica
        self.metrics = metrics
        self._dispatch = serve.batch(max_batch_size=settings.max_batch_size,
                                     batch_wait_timeout_s=settings.batch_wait_timeout_s,
                                     max_concurrent_batches=settings.max_concurrent_batches)(self._dispatch_batch)
        self._in_flight = 0
        self._replica_of: dict[str, str] = {}  # request id -> the replica running it
        self.seen_replicas: set[str] = set()  # every replica a batch went to

    @contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        """Hold `count` places among max_queued_requests for the block; a 503 when they are not free."""
        if self._in_flight + count > self.settings.max_queued_requests:
            raise overloaded(f"the server is at capacity ({self._in_flight} requests in flight); retry shortly")
        self._in_flight += count
        self.metrics.queue.set(self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= count
            self.metrics.queue.set(self._in_flight)

    async def run_all(self, jobs: list[ReplicaRequest]) -> list[RequestOutput]:
        """Admit the jobs, run them, and return each one's last (finished) output, in order."""
        with self.admitted(len(jobs)):
            return list(await asyncio.gather(*(self._last_output(job) for job in jobs)))

    async def start_streams(self, jobs: list[ReplicaRequest]) -> tuple[ExitStack, list[StartedStream]]:
        """Admit the jobs and start them; the caller closes the returned admission when its stream ends."""
        admission = ExitStack()
        admission.enter_context(self.admitted(len(jobs)))
        try:
            return admission, await self._first_events(jobs)
        except BaseException:
            admission.close()
            raise

    async def outputs(self, job: ReplicaRequest) -> AsyncIterator[RequestOutput]:
        """One request's outputs; ApiError if it failed; an abandoned stream aborts it on its replica.

        After its last event the batch stream is read to its end (which follows at once): Serve's
        batching has already made a future for the next item, and leaving it unread logs
        "Future exception was never retrieved" for every request.
        """
        finished, failure = False, None
        try:
            async for events in self._dispatch(job):
                for event in events:
                    if event.error is not None:
                        e = event.error
                        finished, failure = True, ApiError(e.status, e.message, e.type, e.param)
                    else:
                        finished = event.output.finished
                        yield event.output
            if failure is not None:
                raise failure
            if not finished:
                raise ApiError(503, "the model replica stopped before finishing this request; retry",
                               "server_overloaded")
        except ApiError:
            raise
        except Exception as error:  # the dispatch failed (its replica died...): a clear error, mid-stream too
            api_error = error_for_exception(error)
            if api_error.status == 500:
                logger.exception("flora ingress: request %s failed", job.request_id)
            raise api_error from error
        finally:
            replica = self._replica_of.pop(job.request_id, None)
            if not finished and replica is not None:
                asyncio.get_running_loop().create_task(self._abort(job.request_id, replica))

    @staticmethod
    async def merged(started: list[StartedStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index, output) of the started streams as the outputs come; the first failure ends it, raised."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator, first: RequestOutput) -> None:
            try:
                await queue.put((index, first))
                async for output in stream:
                    await queue.put((index, output))
            except Exception as error:
                await queue.put((index, error))

        tasks = [asyncio.create_task(pump(i, s, f)) for i, (s, f) in enumerate(started)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a stream cannot close while its pump reads it
            for stream, _ in started:
                await stream.aclose()

    async def _dispatch_batch(self, requests: list[ReplicaRequest]) -> AsyncIterator[list]:
        """@serve.batch body: send the whole group to one replica, fan its per-step events back out."""
        self.metrics.record_batch([r.adapter.name if r.adapter else "" for r in requests])
        stream = self.replica.options(stream=True).generate_batch.remote(requests)
        done = [False] * len(requests)
        async for item in stream:
            if isinstance(item, str):  # the replica's id comes first
                self.seen_replicas.add(item)
                for request in requests:
                    self._replica_of[request.request_id] = item
                continue
            batch, newly_done = [], False
            for i, events in enumerate(item):
                batch.append(StopIteration if done[i] else events)
                if not done[i] and any(event.finished for event in events):
                    done[i] = newly_done = True
            yield batch
            if newly_done and not all(done):
                # End the finished requests' streams now rather than at the batch's next message:
                # their readers wait for this end (see outputs), the others get no events.
                yield [StopIteration if d else [] for d in done]
        if not all(done):  # the stream ended early: its requests must not wait forever
            yield [StopIteration if d else [] for d in done]

    async def _abort(self, request_id: str, replica: str) -> None:
        try:
            await self.replica.abort.remote(request_id, target_replica=replica)
        except Exception:  # the replica is gone: nothing left to free
            logger.info("flora ingress: could not abort %s on %s", request_id, replica)

    async def _last_output(self, job: ReplicaRequest) -> RequestOutput:
        last = None
        async for output in self.outputs(job):
            last = output
        return last

    async def _first_events(self, jobs: list[ReplicaRequest]) -> list[StartedStream]:
        """Start every job and wait for its first output, so admission errors get a real status."""
        streams = [self.outputs(job) for job in jobs]
        try:
            firsts = await asyncio.gather(*(anext(s) for s in streams))
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise
        return list(zip(streams, firsts))
