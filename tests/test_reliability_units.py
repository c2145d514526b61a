"""Reliability fixes checked where they live, without a cluster: the replica's adapter versions,
the catalog's load validation, sampling parameters that once broke a whole engine step, and the
prompt length bound. The same failures over HTTP are in test_reliability.py.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from ray import serve
from transformers import AutoTokenizer

from deploy.app import AppArgs, resolve
from flora_core.default_model import default_model_dir
from flora_core.sampler import SamplingBatch, next_tokens
from flora_core.sampling_params import SamplingParams
import router.openai_format as fmt
from router.catalog import AdapterCatalog
from router.errors import ApiError
from router.messages import AdapterRef, ReplicaRequest
from router.openai_format import prompt_chars_bound
from router.protocol import ChatMessage
from router.replica import FloraReplica
from tests.reliability_fixtures import BAD_ADAPTERS, write_adapter_root
from tests.serving_fixtures import MAX_MODEL_LEN, app_args, engine_alone_texts, make_catalog, write_test_adapters


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return write_adapter_root(tmp_path_factory.mktemp("adapters"))


def settings_for(adapter_root, **overrides):
    return resolve(AppArgs.model_validate(app_args(adapter_root, **overrides)))


async def run_batch(replica: FloraReplica, requests: list[ReplicaRequest], results: dict) -> None:
    """Consume generate_batch, keeping each request's last event."""
    async for step in replica.generate_batch(requests):
        if isinstance(step, str):
            continue
        for request, events in zip(requests, step):
            if events:
                results[request.request_id] = events[-1]


def test_a_whole_answer_request_gets_one_message_beside_a_stream_of_the_same_request(adapter_root, monkeypatch):
    """A request whose client is not streaming (whole_answer) gets only its finished output from the replica,
    carrying everything; its twin in the same batch, streamed, gets several, which add up to the same answer."""
    replica_settings, _ = settings_for(adapter_root)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tuple(tokenizer("hello=")["input_ids"])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    streamed = ReplicaRequest("streamed", ids, params, AdapterRef("lora-r2", 1))
    whole = ReplicaRequest("whole", ids, params, AdapterRef("lora-r2", 1), whole_answer=True)

    async def scenario(replica: FloraReplica) -> dict[str, list]:
        events: dict[str, list] = {"streamed": [], "whole": []}
        async for step in replica.generate_batch([streamed, whole]):
            if not isinstance(step, str):
                for request, per_request in zip([streamed, whole], step):
                    events[request.request_id] += per_request
        return events

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # a replica outside Serve
    replica = FloraReplica(replica_settings.model_copy(update={"stream_interval_ms": 0.0}))  # a message per step
    try:
        events = asyncio.run(asyncio.wait_for(scenario(replica), 120))
    finally:
        replica.engine.close()
    assert len(events["streamed"]) > 1 and len(events["whole"]) == 1
    parts, (answer,) = [e.output for e in events["streamed"]], [e.output for e in events["whole"]]
    assert answer.finished and len(answer.token_ids) == 12
    assert answer.delta_text == answer.text == "".join(p.delta_text for p in parts) == parts[-1].text
    assert answer.delta_token_ids == answer.token_ids == parts[-1].token_ids
    assert answer.delta_logprobs == answer.logprobs == tuple(lp for p in parts for lp in p.delta_logprobs)
    expected = engine_alone_texts(adapter_root, [("lora-r2", "hello=", 12)])[0]
    assert answer.text.startswith(expected)  # the engine alone stops at the end of sequence; this one ignores it


def test_reloading_an_adapter_keeps_the_requests_waiting_for_its_old_version(adapter_root, monkeypatch):
    """One LoRA slot, busy: a request for lora-r2 version 1 waits for it. Version 2 arriving (a
    reload) must not take version 1 away from the waiting request (it used to fail with a 404),
    and version 1 is dropped once nothing here uses it."""
    replica_settings, _ = settings_for(adapter_root, lora_slots=1)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tuple(tokenizer("hello=")["input_ids"])
    busy = ReplicaRequest("busy", ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                          AdapterRef("lora-r1", 1))
    old = ReplicaRequest("old", ids, SamplingParams(max_tokens=8, temperature=0), AdapterRef("lora-r2", 1))
    new = ReplicaRequest("new", ids, SamplingParams(max_tokens=8, temperature=0), AdapterRef("lora-r2", 2))

    async def scenario(replica: FloraReplica) -> dict:
        results: dict = {}
        first = asyncio.create_task(run_batch(replica, [busy, old], results))
        while "busy" not in results:  # version 1 is registered and its request waits for the slot
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(first, run_batch(replica, [new], results)), 120)
        return results

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # a replica outside Serve
    replica = FloraReplica(replica_settings)
    try:
        results = asyncio.run(scenario(replica))
        expected = engine_alone_texts(adapter_root, [("lora-r2", "hello=", 8)])[0]
        for name in ("old", "new"):
            assert results[name].error is None, results[name].error
            assert results[name].output.text == expected
        assert not replica.model.pool.is_registered("lora-r2@1")
        assert replica.model.pool.is_registered("lora-r2@2")
        assert replica.engine.stats().pinned_adapters == 0
    finally:
        replica.engine.close()


def test_a_replica_that_outlives_the_catalog_serves_the_new_starts_files(tmp_path, monkeypatch):
    """Folder x rewritten in place, then the catalog restarts (every version 1 again): the replica, which read
    x@1 before, must serve the new files, not its copy of the old ones under the same version number. And a
    stale version the engine still pins (a cancelled request's abort not yet stepped) neither fails the new
    version's request nor stays registered once it is unpinned."""
    write_test_adapters(tmp_path, names=["lora-r1", "lora-r2"])
    shutil.copytree(tmp_path / "lora-r2", tmp_path / "x")
    replica_settings, _ = settings_for(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tuple(tokenizer("hello=")["input_ids"])
    old_ref = make_catalog(tmp_path).snapshot().entries["x"].ref
    expected = engine_alone_texts(tmp_path, [("lora-r2", "hello=", 8), ("lora-r1", "hello=", 8)])
    assert expected[0] != expected[1]  # the rewrite is visible in the answer

    def request(name: str, ref: AdapterRef) -> ReplicaRequest:
        return ReplicaRequest(name, ids, SamplingParams(max_tokens=8, temperature=0), ref)

    monkeypatch.setattr(serve, "get_replica_context", lambda: None)  # a replica outside Serve
    replica = FloraReplica(replica_settings)
    try:
        results: dict = {}
        asyncio.run(asyncio.wait_for(run_batch(replica, [request("before", old_ref)], results), 120))
        shutil.rmtree(tmp_path / "x")
        shutil.copytree(tmp_path / "lora-r1", tmp_path / "x")
        new_ref = make_catalog(tmp_path).snapshot().entries["x"].ref  # the restarted catalog's x@1
        assert new_ref.version == old_ref.version == 1
        pool = replica.model.pool
        pool.acquire([old_ref.key])  # as the engine holds a cancelled request's pin until its next step
        asyncio.run(asyncio.wait_for(run_batch(replica, [request("after", new_ref)], results), 120))
        assert pool.is_registered(old_ref.key)  # still pinned: kept for a later drop
        pool.release([old_ref.key])
        asyncio.run(asyncio.wait_for(run_batch(replica, [request("again", new_ref)], results), 120))
    finally:
        replica.engine.close()
    for name in ("before", "after", "again"):
        assert results[name].error is None, results[name].error
    assert results["before"].output.text == expected[0]
    assert results["after"].output.text == results["again"].output.text == expected[1]
    assert not pool.is_registered(old_ref.key) and pool.is_registered(new_ref.key)


@pytest.mark.parametrize("name", ["bad-flora-rank", "bad-shape", "bad-module", "bad-lora-rank", "bad-nan"])
def test_the_catalog_refuses_adapters_the_replicas_cannot_serve(adapter_root, name):
    replica_settings, _ = settings_for(adapter_root)
    catalog = AdapterCatalog(str(adapter_root), replica_settings.model_path, replica_settings.capacity(),
                             replica_settings.max_adapter_bytes, base_model_name=replica_settings.served_model_name)
    refusal = catalog.load(name)
    assert isinstance(refusal, str) and str(adapter_root) not in refusal
    assert not isinstance(catalog.load("lora-r2"), str) and not isinstance(catalog.load("flora-r4"), str)


def test_catalog_versions_never_repeat_across_unloads(adapter_root):
    replica_settings, _ = settings_for(adapter_root)
    catalog = AdapterCatalog(str(adapter_root), replica_settings.model_path, replica_settings.capacity(), None,
                             base_model_name=replica_settings.served_model_name)
    versions = [catalog.snapshot().entries["lora-r2"].version]
    for _ in range(3):
        assert catalog.unload("lora-r2")
        versions.append(catalog.load("lora-r2").version)
    assert versions == sorted(set(versions)) and len(versions) == 4


def test_every_bad_adapter_is_refused_by_the_catalog(adapter_root):
    replica_settings, _ = settings_for(adapter_root)
    catalog = AdapterCatalog(str(adapter_root), replica_settings.model_path, replica_settings.capacity(), None,
                             base_model_name=replica_settings.served_model_name)
    assert all(isinstance(catalog.load(name), str) for name in BAD_ADAPTERS)


def test_a_tiny_temperature_samples_greedily_instead_of_overflowing():
    logits = torch.tensor([[10.0, 30.0, -5.0], [1.0, 2.0, 3.0]])
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-6, seed=1)]
    batch = SamplingBatch.from_params(params, [None, torch.Generator().manual_seed(1)], logits.device)
    assert next_tokens(logits, batch).tolist() == [1, 2]
    assert all(p.greedy for p in params)


def test_top_k_must_fit_in_int64():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=2**63)
    assert SamplingParams(top_k=2**63 - 1).top_k == 2**63 - 1


def test_prompt_chars_bound_is_never_below_what_fits_the_context():
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    bound = prompt_chars_bound(tokenizer, MAX_MODEL_LEN)
    longest = max(tokenizer.get_vocab(), key=len)
    assert bound == MAX_MODEL_LEN * len(longest)
    assert len(tokenizer(longest * MAX_MODEL_LEN, add_special_tokens=False)["input_ids"]) <= MAX_MODEL_LEN


def test_a_chat_template_that_refuses_the_messages_is_a_400_naming_them():
    """Many real models' templates raise_exception on messages they do not take (a system role, roles that
    do not alternate): the client's mistake, a 400 on `messages`, not a 500."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ok = fmt.chat_prompt_ids(tokenizer, [ChatMessage(role="user", content="hello")], 10_000)
    assert ok == tokenizer("hello", add_special_tokens=False)["input_ids"]  # the template renders the text alone
    with pytest.raises(ApiError) as raised:
        fmt.chat_prompt_ids(tokenizer, [ChatMessage(role="system", content="be brief"),
                                        ChatMessage(role="user", content="hello")], 10_000)
    assert (raised.value.status, raised.value.param) == (400, "messages")
    assert "System role not supported" in raised.value.message
