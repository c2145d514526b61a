"""Long reliability runs: churn at scale, a soak, repeated replica kills. Slow; run them with

    .venv/bin/python -m pytest -m slow tests/test_reliability_soak.py -s

Each test prints its figures (requests, faults, bad inputs, mismatches, memory growth); the
README's "Reliability" section records a run. One local cluster for the module, HTTP on
127.0.0.1:8031: "flora" with two LoRA slots for eight LoRA adapters.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections import Counter

import httpx
import pytest

from tests.reliability_fixtures import (
    BAD_ADAPTERS, BAD_COMPLETIONS, CYCLED, GOOD_MODELS, LORAS, TOKEN, Churner, ask_all, assert_openai_error,
    cluster_processes, engines_idle, kill_process, known_answers, replica_stats, rss_bytes, run_async, serving_cluster,
    stream_then_disconnect, tally, wait_until, write_adapter_root,
)
from tests.serving_fixtures import PROMPTS, app_args

pytestmark = pytest.mark.slow

PORT = 8031
MAX_TOKENS = 6
CONCURRENCY = 16
SOAK_REQUESTS = 10_000
SOAK_CYCLES = 1_000  # unload + load of one adapter, beside reloads (new versions) of others
SOAK_CHUNKS = 10  # memory is sampled after each
BAD_PER_CHUNK = 30  # bad requests and bad adapter loads
DROPS_PER_CHUNK = 20  # streams dropped after their first chunk
MEMORY_BOUND = 256 * 2**20  # growth of the app's processes (ingress, catalog, replica) after warm-up


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return write_adapter_root(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def references(adapter_root):
    return known_answers(adapter_root, GOOD_MODELS, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def app(adapter_root):
    with serving_cluster(PORT, {"flora": ("/", app_args(adapter_root, lora_slots=2))}) as base:
        yield base


def cases_for(count: int, offset: int = 0) -> list[tuple[str, str]]:
    every = [(m, p) for m in [*GOOD_MODELS, *CYCLED] for p in PROMPTS]
    return [every[(offset + i) % len(every)] for i in range(count)]


def test_a_thousand_known_answers_under_churn(app, references):
    cases = cases_for(1000)
    churner = Churner(app, reloaded=LORAS[:4], cycled=list(CYCLED))
    started = time.monotonic()
    churner.start()
    try:
        replies = run_async(ask_all(app, cases, MAX_TOKENS, CONCURRENCY), 1200)
    finally:
        churner.stop()
    counts = tally(cases, replies, references, may_be_missing=frozenset(CYCLED))
    print(f"\nchurn: {len(cases)} requests in {time.monotonic() - started:.0f} s, {dict(counts)}; "
          f"{churner.cycles} churn cycles {dict(churner.statuses)}")
    assert counts["mismatch"] == 0 and counts["ok"] + counts["refused"] == len(cases), counts
    assert wait_until(lambda: engines_idle("flora"), 60)


async def bad_inputs(http: httpx.AsyncClient, count: int, start: int) -> int:
    """`count` bad requests and bad adapter loads, each of which must get a 4xx in OpenAI's format."""
    completions, adapters = itertools.cycle(BAD_COMPLETIONS), itertools.cycle(BAD_ADAPTERS)
    for _ in range(start % len(BAD_COMPLETIONS)):
        next(completions)
    for i in range(count):
        if i % 2:
            _, fields, status, _ = next(completions)
            body = {"model": "lora-r2", "prompt": "x=", "max_tokens": 4, "temperature": 0, **fields}
            assert_openai_error(await http.post("/v1/completions", json=body), status)
        else:
            assert_openai_error(await http.post("/v1/adapters/load", json={"name": next(adapters)}), 400, "name")
    return count


async def dropped_streams(base: str, count: int) -> int:
    body = {"prompt": "hello=", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count + 8)) as http:
        got = await asyncio.gather(*(stream_then_disconnect(http, f"{base}/v1/completions",
                                                            {**body, "model": LORAS[i % len(LORAS)]})
                                     for i in range(count)))
    return sum(got)


def test_soak(app, references):
    """10,000 known-answer requests beside 1,000 unload/load cycles, bad inputs and dropped streams."""
    processes = cluster_processes("ServeReplica:flora:")
    assert len(processes) == 3, [p.cmdline() for p in processes]  # ingress, catalog, replica
    run_async(ask_all(app, cases_for(300), MAX_TOKENS, CONCURRENCY), 600)  # warm-up
    gc.collect()
    baseline = rss_bytes(processes)
    churner = Churner(app, reloaded=[LORAS[0]], cycled=list(CYCLED), pause_s=0.0, max_cycles=SOAK_CYCLES)
    totals, bad, dropped, samples = Counter(), 0, 0, []
    started = time.monotonic()
    churner.start()

    async def chunk(index: int) -> tuple[Counter, int, int]:
        cases = cases_for(SOAK_REQUESTS // SOAK_CHUNKS, offset=index)
        async with httpx.AsyncClient(base_url=app, timeout=60, headers=TOKEN) as http:
            replies, bad_count, drops = await asyncio.gather(
                ask_all(app, cases, MAX_TOKENS, CONCURRENCY), bad_inputs(http, BAD_PER_CHUNK, index),
                dropped_streams(app, DROPS_PER_CHUNK))
        return tally(cases, replies, references, may_be_missing=frozenset(CYCLED)), bad_count, drops

    try:
        for index in range(SOAK_CHUNKS):
            counts, bad_count, drops = run_async(chunk(index), 900)
            totals, bad, dropped = totals + counts, bad + bad_count, dropped + drops
            samples.append(rss_bytes(processes) - baseline)
        churner.join(timeout=900)
    finally:
        churner.stop()
    assert wait_until(lambda: engines_idle("flora"), 60), "rows, KV cache or pins left behind"
    pool = [s["pool"] for s in replica_stats("flora")]
    growth = rss_bytes(processes) - baseline
    print(f"\nsoak: {sum(totals.values())} requests in {time.monotonic() - started:.0f} s, {dict(totals)}; "
          f"{churner.cycles} unload/load cycles {dict(churner.statuses)}; {bad} bad inputs; {dropped} streams "
          f"dropped; memory growth {growth / 2**20:.0f} MiB (after each chunk: "
          f"{[round(s / 2**20) for s in samples]} MiB; bound {MEMORY_BOUND // 2**20} MiB); pool {pool}")
    assert totals["mismatch"] == 0 and totals["ok"] + totals["refused"] == SOAK_REQUESTS, totals
    assert churner.cycles == SOAK_CYCLES and set(churner.statuses) == {"load:200", "unload:200"}, churner.statuses
    assert growth < MEMORY_BOUND
    assert all(p["registered"] <= len(GOOD_MODELS) + len(CYCLED) + len(BAD_ADAPTERS) for p in pool), pool


def test_repeated_replica_kills_under_load(app, references):
    """Three times: 24 requests in flight, the replica's process killed. Each request completes or
    gets a 503 in OpenAI's format; the app comes back and answers correctly."""
    outcomes: Counter = Counter()
    cases = cases_for(24)
    for _ in range(3):
        (replica,) = cluster_processes("ServeReplica:flora:FloraReplica")

        async def under_load():
            traffic = asyncio.create_task(ask_all(app, cases, 48, concurrency=len(cases)))
            # Kill while requests run in the engine: after a fixed delay they may all be done.
            def running() -> bool:
                return any(s["engine"]["running"] for s in replica_stats("flora"))

            await asyncio.to_thread(wait_until, running, 60, 0.02)
            kill_process(replica)
            return await traffic

        replies = run_async(under_load(), 300)
        for reply in replies:
            assert not isinstance(reply, Exception), reply
            outcomes[reply.status_code] += 1
            if reply.status_code != 200:
                assert assert_openai_error(reply, 503)["type"] == "server_overloaded"
        assert wait_until(lambda: _answers(app), 240, every_s=2), "no recovery after the replica was killed"
        counts = tally(cases, run_async(ask_all(app, cases, MAX_TOKENS, CONCURRENCY), 300), references)
        assert counts == {"ok": len(cases)}, counts
    print(f"\nfaults: 3 replica kills with {len(cases)} requests in flight each: {dict(outcomes)}")
    assert outcomes[503] >= 1, "no request was in flight at any kill: nothing was tested"


def _answers(base: str) -> bool:
    try:
        reply = httpx.post(f"{base}/v1/completions", json={"model": "lora-r1", "prompt": "x=", "max_tokens": 2},
                           timeout=10)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200
