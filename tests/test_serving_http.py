"""The application on a real local Ray cluster, called over real HTTP with the openai client.

Every answer is compared with the engine run alone in this process for that adapter.
"""

from __future__ import annotations

import asyncio
import shutil

import httpx
import openai
import pytest
import ray
from ray import serve

from deploy.app import build_app
from flora_core.default_model import DEFAULT_MODEL_NAME
from router.handle_api import GenerateRequest
from tests.serving_fixtures import PROMPTS, TEST_ADAPTERS, app_args, engine_alone_texts, write_test_adapters

BASE_URL = "http://127.0.0.1:8000"
TOKEN = {"Authorization": "Bearer test-token"}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_test_adapters(root)
    return root


@pytest.fixture(scope="module")
def app(adapter_root):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(app_args(adapter_root)), name="flora", route_prefix="/")
    serve.run(build_app(app_args(adapter_root, max_queued_requests=1)), name="small", route_prefix="/small")
    serve.run(build_app(app_args(adapter_root, stream_interval_ms=1000)), name="merged", route_prefix="/merged")
    yield BASE_URL
    serve.shutdown()
    ray.shutdown()


def with_client(scenario):
    """Run scenario(client) in a fresh event loop with its own openai client."""

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_concurrent_completions_across_adapters_match_the_engine_alone(app, adapter_root):
    models = [None, *TEST_ADAPTERS]
    cases = [(m, p) for m in models for p in PROMPTS[:3]]

    async def ask(client, model, prompt):
        reply = await client.completions.create(model=model or DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=10,
                                                temperature=0)
        return reply.choices[0].text

    async def ask_all(client):
        return await asyncio.gather(*(ask(client, m, p) for m, p in cases))

    got = with_client(ask_all)
    expected = engine_alone_texts(adapter_root, [(m, p, 10) for m, p in cases])
    assert got == expected
    base = {p: t for (m, p), t in zip(cases, got) if m is None}
    changed = sum(t != base[p] for (m, p), t in zip(cases, got) if m is not None)
    assert changed >= len(TEST_ADAPTERS), "adapters barely change the answers: the comparison would be vacuous"


def test_streamed_text_equals_the_whole_answer(app):
    async def both(client, model):
        whole = await client.completions.create(model=model, prompt="stream=", max_tokens=12, temperature=0)
        parts = []
        async for chunk in await client.completions.create(model=model, prompt="stream=", max_tokens=12,
                                                           temperature=0, stream=True):
            parts.append(chunk.choices[0].text)
        return whole.choices[0].text, "".join(parts), len(parts)

    async def each(client):
        return await asyncio.gather(*(both(client, m) for m in ["lora-r8", "flora-r1", "ia3-a", DEFAULT_MODEL_NAME]))

    for whole, streamed, chunks in with_client(each):
        assert streamed == whole
        assert chunks > 1


def test_merged_stream_carries_every_token_and_logprob(app):
    """stream_interval_ms=1000: tokens made within a second travel in one chunk, and nothing is lost."""

    async def both(whole_client, merged_client, model):
        kwargs = dict(model=model, prompt="merge=", max_tokens=24, temperature=0, logprobs=2,
                      extra_body={"ignore_eos": True})
        whole = (await whole_client.completions.create(**kwargs)).choices[0]
        parts, tokens, logprobs = [], [], []
        async for chunk in await merged_client.completions.create(**kwargs, stream=True):
            parts.append(chunk.choices[0].text)
            tokens += chunk.choices[0].logprobs.tokens
            logprobs += chunk.choices[0].logprobs.token_logprobs
        return whole, "".join(parts), tokens, logprobs, len(parts)

    async def each(client):
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/merged/v1", api_key="unused", max_retries=0,
                                      timeout=60) as merged_client:
            return await asyncio.gather(*(both(client, merged_client, m)
                                          for m in ["lora-r8", "flora-r2", "ia3-b", DEFAULT_MODEL_NAME]))

    for whole, streamed, tokens, logprobs, chunks in with_client(each):
        assert streamed == whole.text
        assert tokens == whole.logprobs.tokens and len(tokens) == 24
        assert logprobs == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
        assert chunks < len(tokens)  # merged: 24 chunks would need a second per engine step


def test_chat_completions_use_the_chat_template(app):
    async def ask(client):
        chat = await client.chat.completions.create(model="flora-r4", messages=[{"role": "user", "content": "hello"}],
                                                    max_tokens=10, temperature=0)
        plain = await client.completions.create(model="flora-r4", prompt="hello=", max_tokens=10, temperature=0)
        return chat.choices[0].message.content, plain.choices[0].text

    chat, plain = with_client(ask)
    assert chat == plain  # the template renders the last user message followed by "="


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(app):
    async def expect(client, error_type, **kwargs):
        with pytest.raises(error_type) as info:
            await client.completions.create(**{"model": "lora-r2", "prompt": "x=", **kwargs})
        return info.value

    async def scenario(client):
        missing = await expect(client, openai.NotFoundError, model="no-such-adapter")
        assert missing.status_code == 404 and missing.body["param"] == "model"
        bad_top_p = await expect(client, openai.BadRequestError, top_p=1.5)
        assert bad_top_p.body["param"] == "top_p"
        too_long = await expect(client, openai.BadRequestError, max_tokens=500)
        assert too_long.body["param"] == "max_tokens"
        await expect(client, openai.BadRequestError, max_tokens=0)
        await expect(client, openai.BadRequestError, temperature=-1)
        await expect(client, openai.BadRequestError, prompt="")
        await expect(client, openai.BadRequestError, prompt=[10_000_000])
        reply = await client.completions.create(model="lora-r2", prompt="x=", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")

    with_client(scenario)
    malformed = httpx.post(f"{BASE_URL}/v1/completions", content="{not json", timeout=30,
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and set(malformed.json()["error"]) == {"message", "type", "param", "code"}
    unknown_field = httpx.post(f"{BASE_URL}/v1/completions", timeout=30,
                               json={"model": "lora-r2", "prompt": "x=", "max_tokenz": 3})
    assert unknown_field.status_code == 400 and "max_tokenz" in unknown_field.json()["error"]["message"]


def test_models_lists_base_and_adapters_with_kind_and_rank(app):
    cards = {c["id"]: c for c in httpx.get(f"{app}/v1/models", timeout=30).json()["data"]}
    assert cards[DEFAULT_MODEL_NAME]["parent"] is None
    for name, (kind, rank, _, _) in TEST_ADAPTERS.items():
        assert cards[name]["kind"] == kind.value and cards[name]["rank"] == rank
        assert cards[name]["parent"] == DEFAULT_MODEL_NAME


def test_adapters_load_and_unload_at_runtime(app, adapter_root):
    shutil.copytree(adapter_root / "lora-r8", adapter_root / "late-lora")
    body = {"model": "late-lora", "prompt": "hello=", "max_tokens": 6, "temperature": 0}
    assert httpx.post(f"{app}/v1/completions", json=body, timeout=30).status_code == 404
    assert httpx.post(f"{app}/v1/adapters/load", json={"name": "late-lora"}, timeout=30).status_code == 401
    escape = httpx.post(f"{app}/v1/adapters/load", json={"name": "../etc"}, headers=TOKEN, timeout=30)
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "name"
    loaded = httpx.post(f"{app}/v1/adapters/load", json={"name": "late-lora"}, headers=TOKEN, timeout=30)
    assert loaded.status_code == 200 and loaded.json()["loaded"]["kind"] == "lora"
    late = httpx.post(f"{app}/v1/completions", json=body, timeout=60)
    same = httpx.post(f"{app}/v1/completions", json={**body, "model": "lora-r8"}, timeout=60)
    assert late.status_code == 200 and late.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]
    assert httpx.post(f"{app}/v1/adapters/unload", json={"name": "late-lora"}, headers=TOKEN,
                      timeout=30).status_code == 200
    assert httpx.post(f"{app}/v1/completions", json=body, timeout=30).status_code == 404


def test_python_handle_api(app, adapter_root):
    handle = serve.get_app_handle("flora")
    reply = handle.generate.remote(GenerateRequest(adapter="flora-r2", prompt="abcde=", max_tokens=10)).result()
    assert reply.text == engine_alone_texts(adapter_root, [("flora-r2", "abcde=", 10)])[0]
    assert reply.usage.completion_tokens == len(reply.token_ids)
    with pytest.raises(Exception, match="does not exist"):
        handle.generate.remote(GenerateRequest(adapter="nope", prompt="abcde=")).result()
    chunks = list(handle.options(stream=True).generate_stream.remote(
        GenerateRequest(adapter="flora-r2", prompt="abcde=", max_tokens=10)))
    assert "".join(c.delta_text for c in chunks) == reply.text


def test_overload_answers_503_with_retry_after_then_recovers(app):
    """The "small" app admits one request at a time: 16 simultaneous long requests overload it."""
    body = {"model": "lora-r1", "prompt": "hello=", "max_tokens": 50, "temperature": 0, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{app}/small/v1/completions", json=body) for _ in range(16)))

    replies = asyncio.run(burst())
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    for reply in replies:
        if reply.status_code == 503:
            assert int(reply.headers["retry-after"]) >= 1
            assert reply.json()["error"]["type"] == "server_overloaded"
    again = httpx.post(f"{app}/small/v1/completions", json={**body, "max_tokens": 3}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3
