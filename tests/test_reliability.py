"""Reliability and security of the served app: bad input, bad adapters, faults, overload, churn.

One local cluster for the module (HTTP on 127.0.0.1:8030): "flora" at / has two LoRA slots for
eight LoRA adapters, so requests keep evicting each other, and the management API behind a
token; "small" at /small admits four requests at a time. Every answer that should succeed is
compared with the engine run alone (`engine_alone_texts`). The long runs (1,000 churn requests,
the soak) are in test_reliability_soak.py, behind `-m slow`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from flora_core.default_model import DEFAULT_MODEL_NAME
from tests.reliability_fixtures import (
    BAD_ADAPTERS, BAD_COMPLETIONS, CYCLED, ERROR_FIELDS, GOOD_MODELS, LORAS, TOKEN, Churner, ask_all,
    assert_openai_error, cluster_processes, engines_idle, kill_process, known_answers, pickle_ran, rss_bytes,
    run_async, serving_cluster, stream_then_disconnect, tally, wait_until, write_adapter_root,
)
from tests.serving_fixtures import PROMPTS, app_args


PORT = 8030
SMALL_CAPACITY = 4  # the "small" app's max_queued_requests
MAX_TOKENS = 8
ANSWER_PROMPTS = PROMPTS[:3]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return write_adapter_root(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def references(adapter_root):
    return known_answers(adapter_root, GOOD_MODELS, ANSWER_PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def app(adapter_root):
    apps = {"flora": ("/", app_args(adapter_root, lora_slots=2)),
            "small": ("/small", app_args(adapter_root, max_queued_requests=SMALL_CAPACITY))}
    with serving_cluster(PORT, apps) as base:
        yield base


@pytest.fixture
def http(app):
    with httpx.Client(base_url=app, timeout=60) as client:
        yield client


def assert_serves_known_answers(base: str, references: dict, models=("lora-r2", "flora-r1", "ia3-a")) -> None:
    cases = [(m, p) for m in models for p in ANSWER_PROMPTS]
    counts = tally(cases, run_async(ask_all(base, cases, MAX_TOKENS, concurrency=len(cases)), 120), references)
    assert counts == {"ok": len(cases)}, counts


# ---------------------------------------------------------------------------- bad requests

@pytest.mark.parametrize("case, fields, status, param", BAD_COMPLETIONS, ids=[c[0] for c in BAD_COMPLETIONS])
def test_bad_completion_requests_get_openai_errors(http, case, fields, status, param):
    body = {"model": "lora-r2", "prompt": "x=", "max_tokens": 4, "temperature": 0, **fields}
    error = assert_openai_error(http.post("/v1/completions", json=body, timeout=15), status, param)
    if case == "1 MB of text":  # refused on its length, before tokenizing (which takes seconds)
        assert "characters" in error["message"], error


BAD_CHATS = [
    ("no messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("content of a wrong type", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("1 MB of text", {"messages": [{"role": "user", "content": "a" * 1_000_000}]}, "messages"),
]


@pytest.mark.parametrize("case, fields, param", BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_bad_chat_requests_get_openai_errors(http, case, fields, param):
    body = {"model": "flora-r1", "max_tokens": 4, **fields}
    assert_openai_error(http.post("/v1/chat/completions", json=body, timeout=15), 400, param)


BAD_BODIES = {
    "malformed JSON": "{not json",
    "no body": "",
    "a JSON list": "[]",
    "a JSON string": '"x"',
    "JSON nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "NaN temperature": '{"model": "lora-r2", "prompt": "x", "temperature": NaN}',
    "a 5,000-digit number": '{"model": "lora-r2", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}",
    "invalid UTF-8": b'{"model": "lora-r2", "prompt": "\xff\xfe"}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_unparsable_bodies_get_openai_errors(http, body):
    reply = http.post("/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=15)
    assert_openai_error(reply, 400)


def test_unknown_routes_and_methods_get_openai_errors(http):
    assert_openai_error(http.get("/v1/no-such-route"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_a_bad_request_never_fails_the_requests_beside_it(app, references):
    """Sampling parameters that once broke a whole engine step (a temperature so small that
    logits / t overflows) run beside good requests: the good ones still get their answers."""
    cases = [(m, p) for m in ("lora-r2", "flora-r4", "ia3-b", DEFAULT_MODEL_NAME) for p in ANSWER_PROMPTS]

    async def together():
        async with httpx.AsyncClient(base_url=app, timeout=60) as http:
            odd = {"model": "lora-r1", "prompt": "x=", "max_tokens": 6, "temperature": 1e-40}
            return await asyncio.gather(http.post("/v1/completions", json=odd),
                                        ask_all(app, cases, MAX_TOKENS, concurrency=len(cases)))

    odd, replies = run_async(together(), 120)
    assert odd.status_code == 200, odd.text  # below 1e-5 sampling is greedy
    assert tally(cases, replies, references) == {"ok": len(cases)}


def test_server_answers_normally_after_bad_input(app, references):
    assert_serves_known_answers(app, references)


# ---------------------------------------------------------------------------- management API security


def test_management_api_needs_the_token(http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-token"}):
        for action in ("load", "unload"):
            reply = http.post(f"/v1/adapters/{action}", json={"name": "lora-r2"}, headers=headers)
            assert assert_openai_error(reply, 401)["type"] == "authentication_error"


ESCAPING_NAMES = ["..", "../etc", "../../../../etc/passwd", "/etc", "/tmp", "a/b", "lora-r2/../lora-r1", "",
                  ".hidden", "lora-r2\x00", "x" * 300, "C:\\Windows"]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_adapter_names_cannot_leave_the_adapter_root(http, name):
    assert_openai_error(http.post("/v1/adapters/load", json={"name": name}, headers=TOKEN), 400, "name")


def test_symlinks_out_of_the_adapter_root_are_refused(http, adapter_root, tmp_path):
    outside = tmp_path / "outside-adapter"
    shutil.copytree(adapter_root / "lora-r2", outside)
    (adapter_root / "link-out").symlink_to(outside, target_is_directory=True)
    inner = adapter_root / "file-link-out"
    inner.mkdir()
    (inner / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (inner / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for name in ("link-out", "file-link-out"):
        error = assert_openai_error(http.post("/v1/adapters/load", json={"name": name}, headers=TOKEN), 400, "name")
        assert "outside the adapter root" in error["message"] and str(tmp_path) not in error["message"]
        assert_openai_error(http.post("/v1/completions", json={"model": name, "prompt": "x="}), 404, "model")


# ---------------------------------------------------------------------------- bad adapters


@pytest.mark.parametrize("name", BAD_ADAPTERS)
def test_bad_adapters_are_refused_by_the_load_api(http, adapter_root, name):
    error = assert_openai_error(http.post("/v1/adapters/load", json={"name": name}, headers=TOKEN), 400, "name")
    assert str(adapter_root) not in error["message"], "errors must not show server paths"
    assert not pickle_ran(adapter_root)


@pytest.mark.parametrize("name", BAD_ADAPTERS)
def test_bad_adapters_read_lazily_fail_only_their_requests(http, adapter_root, name):
    """Folders listed at start are read when a request first names them: a 4xx for that request."""
    reply = http.post("/v1/completions", json={"model": name, "prompt": "x=", "max_tokens": 3})
    error = assert_openai_error(reply)
    assert reply.status_code in (400, 404), error
    assert str(adapter_root) not in error["message"]
    assert not pickle_ran(adapter_root)


def test_fifty_bad_loads_beside_good_traffic(app, references):
    bad = list(BAD_ADAPTERS)
    cases = [(m, p) for m in GOOD_MODELS for p in ANSWER_PROMPTS]

    async def scenario():
        async with httpx.AsyncClient(base_url=app, timeout=60, headers=TOKEN) as http:
            async def bad_loads():
                statuses = []
                for i in range(50):
                    name = bad[i % len(bad)]
                    statuses.append((await http.post("/v1/adapters/load", json={"name": name})).status_code)
                    lazily = await http.post("/v1/completions", json={"model": name, "prompt": "x=", "max_tokens": 2})
                    statuses.append(lazily.status_code)
                return statuses

            return await asyncio.gather(bad_loads(), ask_all(app, cases, MAX_TOKENS, concurrency=6))

    statuses, replies = run_async(scenario(), 240)
    assert set(statuses) <= {400, 404}, sorted(set(statuses))
    assert tally(cases, replies, references) == {"ok": len(cases)}


# ---------------------------------------------------------------------------- churn


def test_every_adapter_keeps_its_own_answer_under_churn(app, references):
    """Eight LoRA adapters through two slots while adapters are reloaded (new versions) and
    unloaded in a loop: about a hundred known-answer requests, none answered by another adapter."""
    models = [*GOOD_MODELS, *CYCLED]
    cases = [(m, p) for _ in range(3) for m in models for p in ANSWER_PROMPTS][:108]
    churner = Churner(app, reloaded=LORAS[:3], cycled=list(CYCLED))
    churner.start()
    try:
        replies = run_async(ask_all(app, cases, MAX_TOKENS, concurrency=8), 300)
    finally:
        churner.stop()
    counts = tally(cases, replies, references, may_be_missing=frozenset(CYCLED))
    assert counts["mismatch"] == 0 and counts["ok"] + counts["refused"] == len(cases), counts
    assert churner.cycles >= 3 and set(churner.statuses) <= {"load:200", "unload:200"}, churner.statuses
    assert wait_until(lambda: engines_idle("flora"), 30)


def test_a_reloaded_adapter_never_serves_its_old_weights(http, adapter_root, references):
    """Unload an adapter, replace its files, load it again: answers come from the new files."""
    prompt, swap = ANSWER_PROMPTS[0], adapter_root / "swapped"
    body = {"model": "swapped", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    for source in ("lora-r1", "lora-r8", "lora-r1"):
        http.post("/v1/adapters/unload", json={"name": "swapped"}, headers=TOKEN)
        shutil.rmtree(swap, ignore_errors=True)
        shutil.copytree(adapter_root / source, swap)
        assert http.post("/v1/adapters/load", json={"name": "swapped"}, headers=TOKEN).status_code == 200
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == references[(source, prompt)]
    assert references[("lora-r1", prompt)] != references[("lora-r8", prompt)]


# ---------------------------------------------------------------------------- disconnects, overload, faults


def test_a_hundred_clients_leaving_mid_stream_free_everything(app, references):
    """Ray #50046: a @serve.batch deployment stuck after cancellations. Here 100 streams drop
    after their first chunk and 20 plain requests time out; rows, KV cache and pins all return."""
    long = {"prompt": "hello=", "max_tokens": 50, "temperature": 0, "ignore_eos": True}

    async def storm():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            streams = [stream_then_disconnect(http, f"{app}/v1/completions", {**long, "model": LORAS[i % len(LORAS)]})
                       for i in range(100)]
            async with httpx.AsyncClient(timeout=0.3) as impatient:
                plain = [impatient.post(f"{app}/v1/completions", json={**long, "model": "flora-r2"})
                         for _ in range(20)]
                results = await asyncio.gather(*streams, *plain, return_exceptions=True)
        return results[:100], results[100:]

    streamed, plain = run_async(storm(), 180)
    assert sum(r is True for r in streamed) >= 90, [r for r in streamed if r is not True][:3]
    assert all(isinstance(r, httpx.TimeoutException) for r in plain), plain[:3]
    assert wait_until(lambda: engines_idle("flora"), 60), "rows, KV cache or pins were not freed"
    assert_serves_known_answers(app, references, models=GOOD_MODELS)


def test_overload_at_ten_times_capacity_answers_503_then_recovers(app, references):
    body = {"model": "lora-r4", "prompt": "hello=", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    processes = cluster_processes("ServeReplica:small:")
    before = rss_bytes(processes)

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            async def timed():
                start = time.monotonic()
                reply = await http.post(f"{app}/small/v1/completions", json=body)
                return reply, time.monotonic() - start

            return await asyncio.gather(*(timed() for _ in range(10 * SMALL_CAPACITY)))

    replies = run_async(burst(), 180)
    statuses = sorted(r.status_code for r, _ in replies)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
    assert statuses.count(503) >= 5 * SMALL_CAPACITY, statuses
    for reply, seconds in replies:
        if reply.status_code == 503:
            assert int(reply.headers["retry-after"]) >= 1
            assert assert_openai_error(reply, 503)["type"] == "server_overloaded"
            assert seconds < 10, "a refusal must not wait for capacity"
    growth = rss_bytes(processes) - before
    assert growth < 200 * 2**20, f"the small app's processes grew {growth / 2**20:.0f} MiB under overload"
    again = run_async(ask_all(f"{app}/small", [(m, p) for m in ("lora-r2", "ia3-a") for p in ANSWER_PROMPTS[:2]],
                              MAX_TOKENS, concurrency=SMALL_CAPACITY), 120)
    assert [r.status_code for r in again] == [200] * 4


def test_killing_a_replica_under_load_ends_requests_cleanly_and_recovers(app, references):
    (replica,) = cluster_processes("ServeReplica:flora:FloraReplica")
    long = {"prompt": "hello=", "max_tokens": 56, "temperature": 0, "ignore_eos": True}

    decoding = asyncio.Event()

    async def under_load():
        async with httpx.AsyncClient(base_url=app, timeout=90) as http:
            async def plain(model):
                return await http.post("/v1/completions", json={**long, "model": model})

            async def streamed(model):
                events = []
                async with http.stream("POST", "/v1/completions", json={**long, "model": model, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            decoding.set()
                return r.status_code, events

            tasks = [asyncio.create_task(plain(m)) for m in ("lora-r2", "flora-r1", "ia3-a", DEFAULT_MODEL_NAME)]
            tasks += [asyncio.create_task(streamed(m)) for m in ("lora-r8", "flora-r4")]
            await asyncio.wait_for(decoding.wait(), 60)
            kill_process(replica)  # every request is mid-decode now
            return await asyncio.gather(*tasks)

    *plain, (s1, events1), (s2, events2) = run_async(under_load(), 150)
    for reply in plain:
        if reply.status_code != 200:
            assert assert_openai_error(reply, 503)["type"] == "server_overloaded"
    for status, events in ((s1, events1), (s2, events2)):
        if status == 503 and not events:  # killed before its first token: refused with a clear 503
            continue
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        assert all(e == "[DONE]" or "choices" in json.loads(e) or set(json.loads(e)) == {"error"} for e in events)
    ended_early = [r.status_code for r in plain if r.status_code != 200] + [s for s in (s1, s2) if s != 200] + [
        e for _, ev in ((s1, events1), (s2, events2))
                                                                           for e in ev if '"error"' in e]
    assert ended_early, "the kill came after every request had finished: nothing was tested"
    assert wait_until(lambda: _answers(app), 180, every_s=2), "the app did not recover after its replica was killed"
    assert_serves_known_answers(app, references)


def _answers(base: str) -> bool:
    try:
        reply = httpx.post(f"{base}/v1/completions", json={"model": "lora-r1", "prompt": "x=", "max_tokens": 2},
                           timeout=10)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200


# ---------------------------------------------------------------------------- fuzzing the OpenAPI spec


LORAX_ROUTES = {"/generate", "/generate_stream", "/"}
FUZZ_EXAMPLES = int(os.environ.get("FLORA_FUZZ_EXAMPLES", "30"))  # per operation and mode; raise it to hunt longer


def test_fuzzed_requests_never_get_a_5xx(app):
    """Schemathesis' positive and negative examples for every operation of GET /openapi.json
    (management ones with the token): never a 5xx, every error in OpenAI's format (LoRAX's on its routes)."""
    operations = [result.ok() for result in schemathesis.openapi.from_url(f"{app}/openapi.json").get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/adapters/load",
                                              *LORAX_ROUTES}
    statuses: Counter = Counter()

    def check(case) -> None:
        reply = case.call(headers=TOKEN, timeout=30)
        statuses[reply.status_code] += 1
        assert reply.status_code < 500, (case.method, case.path, case.body, reply.text[:300])
        if reply.status_code >= 400:
            body = reply.json()
            if case.path in LORAX_ROUTES:
                assert set(body) == {"error", "error_type"} and isinstance(body["error"], str), body
            else:
                assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                            suppress_health_check=list(HealthCheck))(
                given(case=operation.as_strategy(generation_mode=mode))(check))
            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /health takes no input)
                assert mode is GenerationMode.NEGATIVE
    assert sum(statuses.values()) >= 100 and any(400 <= s < 500 for s in statuses), statuses
