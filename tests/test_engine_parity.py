"""Greedy generation through the engine equals transformers' generate() per request, alone.

Each request's tokens (fp32, temperature 0) must equal `generate(do_sample=False)` on the base
model with that request's adapter merged, run alone: whatever shares its batches. Random
schedules (hypothesis) mix LoRA, FLoRA, IA3 and base rows, arrival steps (requests joining
mid-decode), prompt lengths, max_tokens and engine limits, for tiny Llama, Qwen2 and GPT-2.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flora_core.sampling_params import SamplingParams
from tests.engine_fixtures import (  # noqa: F401
    ADAPTERS, make_resident, make_setup, one_torch_thread, run_to_completion,
)
from tests.factories import VOCAB

ADAPTER_CHOICES = [None, *ADAPTERS]
REFERENCE_TOKENS = 12  # references are generated this long once and cut to each max_tokens

_setups: dict = {}
_references: dict = {}


def setup_for(arch: str):
    if arch not in _setups:
        _setups[arch] = make_setup(arch)
    return _setups[arch]


def reference(arch: str, adapter: str | None, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy generation is prefix-stable, so one long reference serves every max_tokens."""
    key = (arch, adapter, tuple(prompt))
    if key not in _references:
        _references[key] = setup_for(arch).reference(adapter, prompt, REFERENCE_TOKENS)
    return _references[key][:max_tokens]


request_strategy = st.tuples(
    st.sampled_from(ADAPTER_CHOICES),
    st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=10),  # prompt
    st.integers(1, REFERENCE_TOKENS),  # max_tokens
    st.integers(0, 8),  # arrival step
)


def run_schedule(arch: str, schedule, max_running: int, max_batched_tokens: int) -> None:
    setup = setup_for(arch)
    engine = setup.engine(max_running=max_running, max_batched_tokens=max_batched_tokens)
    try:
        expected, final, step = {}, {}, 0
        pending = sorted(enumerate(schedule), key=lambda item: item[1][3])
        while pending or engine.has_unfinished():
            while pending and pending[0][1][3] <= step:
                index, (adapter, prompt, max_tokens, _) = pending.pop(0)
                rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), adapter)
                expected[rid] = (adapter, reference(arch, adapter, prompt, max_tokens))
            final.update({o.request_id: o for o in engine.step() if o.finished})
            step += 1
            assert step < 500
        final.update(run_to_completion(engine))
    finally:
        engine.close()
    eos = setup.base.generation_config.eos_token_id
    for rid, (adapter, tokens) in expected.items():
        assert list(final[rid].token_ids) == tokens, f"{arch} adapter={adapter}: {final[rid].token_ids} != {tokens}"
        assert final[rid].finish_reason == ("stop" if tokens[-1] == eos else "length")
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens, stats.pinned_adapters) == (0, 0, 0, 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.lists(request_strategy, min_size=1, max_size=7),
    max_running=st.integers(1, 6),
    max_batched_tokens=st.sampled_from([64, 128]),
)
def test_random_schedules_equal_generate_alone(arch, schedule, max_running, max_batched_tokens):
    run_schedule(arch, schedule, max_running, max_batched_tokens)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_requests_joining_mid_decode(arch):
    """A long request decodes while shorter and longer prompts with other adapters join and leave:
    the new batch's cache is padded on the left in one join, the running batch's in another."""
    schedule = [
        ("lora-a", list(range(10, 16)), 12, 0),
        ("flora", list(range(40, 42)), 5, 2),  # shorter than the running cache
        (None, list(range(50, 70)), 6, 4),  # longer than the running cache
        ("ia3", list(range(70, 73)), 9, 4),
        ("lora-b", list(range(80, 84)), 3, 7),
        ("lora-a", list(range(90, 91)), 4, 7),
    ]
    run_schedule(arch, schedule, max_running=8, max_batched_tokens=64)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_adapter_changes_the_greedy_tokens(arch):
    """Not vacuous: on these prompts, each adapter's reference differs from the base model's."""
    prompts = [[5, 9, 17, 33], [100, 3, 64], [7]]
    for adapter in ADAPTERS:
        differs = [reference(arch, adapter, p, REFERENCE_TOKENS) != reference(arch, None, p, REFERENCE_TOKENS)
                   for p in prompts]
        assert all(differs), f"{arch}: {adapter} generates what the base model generates"


def test_batch_really_mixes_adapters_in_one_step():
    """Several adapters decode in the same forward pass: the running batch holds them together."""
    setup = setup_for("llama")
    make_resident(setup, list(ADAPTERS))
    engine = setup.engine(max_running=8)
    try:
        for adapter in ADAPTER_CHOICES:
            engine.add_request([7, 8, 9], SamplingParams(max_tokens=6, temperature=0), adapter)
        engine.step()
        stats = engine.stats()
        assert stats.running == len(ADAPTER_CHOICES) and stats.pinned_adapters == len(ADAPTERS)
        assert stats.kv_tokens == len(ADAPTER_CHOICES) * 3
        engine.step()
        assert engine.stats().kv_tokens == len(ADAPTER_CHOICES) * 4
        run_to_completion(engine)
    finally:
        engine.close()
    assert torch.is_grad_enabled()
