"""Load for the end-to-end serving benchmark: workloads, a streaming client, closed and open loops.

A `Workload` draws requests: an adapter (none, uniform or Zipf over N adapters), a prompt length
and an output length (max_tokens, with ignore_eos so every request generates exactly that many).
`closed_loop` keeps C requests in flight for a duration; `poisson` sends requests at exponential
gaps for a duration. Both stream (SSE) and time every chunk: time to first token, the gaps
between tokens (inter-token latency), the whole request; `summarize` turns them into rates and
percentiles.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import string
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Workload:
    """Which adapters requests use and how long prompts and outputs are.

    adapters: names to draw from (empty: every request uses the base model);
    distribution: "uniform" or "zipf" (p(k) ~ 1 / k**zipf_s over the names in order);
    prompt_chars, output_tokens: inclusive ranges drawn uniformly.
    """

    label: str
    adapters: tuple[str, ...]
    distribution: str = "uniform"
    zipf_s: float = 1.0
    prompt_chars: tuple[int, int] = (4, 24)
    output_tokens: tuple[int, int] = (8, 32)

    stream: bool = True  # False: whole answers (no TTFT or ITL), one HTTP body per request

    def sampler(self, base_model: str, seed: int) -> "RequestSampler":
        return RequestSampler(self, base_model, random.Random(seed))


class RequestSampler:
    def __init__(self, workload: Workload, base_model: str, rng: random.Random) -> None:
        self.workload, self.base_model, self.rng = workload, base_model, rng
        n = len(workload.adapters)
        weights = [1.0 / (k + 1) ** workload.zipf_s for k in range(n)] if workload.distribution == "zipf" else None
        self._cum = None if weights is None else list(_cumulative(weights))

    def next_body(self) -> dict:
        w = self.workload
        if not w.adapters:
            model = self.base_model
        elif self._cum is None:
            model = self.rng.choice(w.adapters)
        else:
            model = self.rng.choices(w.adapters, cum_weights=self._cum)[0]
        prompt = "".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(*w.prompt_chars))) + "="
        body = {"model": model, "prompt": prompt, "max_tokens": self.rng.randint(*w.output_tokens),
                "temperature": 0, "ignore_eos": True, "stream": w.stream}
        return body | ({"stream_options": {"include_usage": True}} if w.stream else {})


def _cumulative(weights: list[float]):
    total = 0.0
    for w in weights:
        total += w
        yield total


@dataclass
class RequestRecord:
    """One request as the client saw it (seconds on the client's perf_counter)."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    done: float | None = None
    output_tokens: int = 0
    error: str | None = None


async def stream_one(http: httpx.AsyncClient, url: str, body: dict, timeout_s: float) -> RequestRecord:
    record = RequestRecord(sent=time.perf_counter())
    if not body["stream"]:
        return await _whole_one(http, url, body, timeout_s, record)
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", url, json=body) as reply:
                if reply.status_code != 200:
                    record.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                    return record
                async for line in reply.aiter_lines():
                    _read_event(line, record)
        if record.error is None and record.done is None:
            record.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, TimeoutError) as error:
        record.error = f"{type(error).__name__}: {error}"
    return record


async def _whole_one(http: httpx.AsyncClient, url: str, body: dict, timeout_s: float,
                     record: RequestRecord) -> RequestRecord:
    try:
        reply = await http.post(url, json=body, timeout=timeout_s)
        record.done = time.perf_counter()
        if reply.status_code != 200:
            record.error = f"HTTP {reply.status_code}: {reply.text[:200]!r}"
        else:
            record.output_tokens = reply.json()["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    return record


def _read_event(line: str, record: RequestRecord) -> None:
    if not line.startswith("data: "):
        return
    now = time.perf_counter()
    data = line[len("data: "):]
    if data == "[DONE]":
        record.done = now
        return
    event = json.loads(data)
    if "error" in event:
        record.error = event["error"].get("message", "error event")
    elif event.get("choices") and event["choices"][0].get("text"):
        record.chunk_times.append(now)
    if event.get("usage"):
        record.output_tokens = event["usage"]["completion_tokens"]


def client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0))


async def closed_loop(url: str, sampler: RequestSampler, concurrency: int, duration_s: float,
                      timeout_s: float = 60.0) -> tuple[list[RequestRecord], float]:
    """`concurrency` workers each send a request as soon as their previous one ends, for duration_s.

    Returns the records and the wall time from the first send to the last reply.
    """
    records: list[RequestRecord] = []
    start = time.perf_counter()
    stop = start + duration_s

    async def worker(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            records.append(await stream_one(http, url, sampler.next_body(), timeout_s))

    async with client(concurrency) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return records, time.perf_counter() - start


async def poisson(url: str, sampler: RequestSampler, rate: float, duration_s: float, seed: int,
                  timeout_s: float = 60.0, max_in_flight: int = 512) -> tuple[list[RequestRecord], float]:
    """Requests at exponential gaps (mean 1/rate) for duration_s; each runs to its end (or timeout)."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)
    start = time.perf_counter()
    async with client(max_in_flight) as http:
        tasks = []
        for at in arrivals:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(http, url, sampler.next_body(), timeout_s)))
        records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(records: list[RequestRecord], elapsed_s: float) -> dict:
    """Throughput over the whole run; latencies (ms) of the requests that succeeded."""
    ok = [r for r in records if r.error is None]
    ttft = [(r.chunk_times[0] - r.sent) * 1e3 for r in ok if r.chunk_times]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]  # between chunks
    # Time per output token after the first (vLLM's TPOT): unlike the gaps between chunks, it does
    # not depend on how many tokens each chunk carries (stream_interval_ms merges them).
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) * 1e3 / (r.output_tokens - 1)
            for r in ok if r.chunk_times and r.output_tokens > 1]
    chunks = sum(len(r.chunk_times) for r in ok)
    e2e = [(r.done - r.sent) * 1e3 for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    errors = sorted({r.error for r in records if r.error})[:5]
    stats = {"requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
             "elapsed_s": round(elapsed_s, 2), "requests_per_s": round(len(ok) / elapsed_s, 2),
             "output_tokens_per_s": round(tokens / elapsed_s, 1), "output_tokens": tokens, "errors": errors,
             "tokens_per_chunk": round(tokens / chunks, 2) if chunks else None}
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("tpot_ms", tpot), ("e2e_ms", e2e)):
        for q in (50, 99):
            value = _percentile(values, q)
            stats[f"{name}_p{q}"] = None if value is None else round(value, 1)
    return stats
