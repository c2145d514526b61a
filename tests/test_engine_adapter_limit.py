"""EngineConfig.max_adapters_per_step: the running batch holds at most that many distinct adapters.

Every forward pass (prefill and decode) is recorded through the model's adapter_scope: with a
limit of k no pass mixes more than k adapters (the base model counting as one), rows of one
adapter still share passes, every request still finishes, and each one's greedy tokens equal
transformers' generate() on its merged model, run alone. Without a limit the same schedule
mixes all of them in one pass, so the recording cannot pass vacuously.
"""

from __future__ import annotations

import pytest

from flora_core.engine import EngineConfig
from flora_core.sampling_params import SamplingParams
from tests.engine_fixtures import ADAPTERS, make_resident, make_setup, one_torch_thread  # noqa: F401

CHOICES = [*ADAPTERS, None]  # 5 distinct "adapters", the base model included
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def setup():
    setup = make_setup("llama")
    make_resident(setup, list(ADAPTERS))
    return setup


def schedule() -> list[tuple[int, str | None, list[int]]]:
    """(arrival step, adapter, prompt): two rounds of every adapter, interleaved, the second mid-decode."""
    requests = []
    for round_, arrival in enumerate([0, 3]):
        for i, adapter in enumerate(CHOICES):
            requests.append((arrival, adapter, [5 + i, 9 + round_, 17 + 3 * i, 33][: 2 + (i + round_) % 3]))
    return requests


def run_recording(setup, monkeypatch, limit: int | None):
    """Run the schedule; returns (final output per request, [(rows, distinct adapters) per forward pass])."""
    passes = []
    scope = setup.model.adapter_scope

    def recording_scope(row_slots, tokens_per_row):
        passes.append((len(row_slots), len(set(row_slots))))
        return scope(row_slots, tokens_per_row)

    monkeypatch.setattr(setup.model, "adapter_scope", recording_scope)
    engine = setup.engine(max_running=8, max_adapters_per_step=limit)
    pending, expected, final, step = schedule(), {}, {}, 0
    try:
        while pending or engine.has_unfinished():
            while pending and pending[0][0] <= step:
                _, adapter, prompt = pending.pop(0)
                rid = engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), adapter)
                expected[rid] = (adapter, prompt)
            final.update({o.request_id: o for o in engine.step() if o.finished})
            assert engine.stats().pinned_adapters <= (limit or len(CHOICES))
            step += 1
            assert step < 200, "requests starved"
    finally:
        engine.close()
    return expected, final, passes


@pytest.mark.parametrize("limit", [1, 2, None])
def test_limit_bounds_every_forward_pass_and_keeps_outputs(setup, monkeypatch, limit):
    expected, final, passes = run_recording(setup, monkeypatch, limit)
    assert set(final) == set(expected)
    for rid, (adapter, prompt) in expected.items():
        assert list(final[rid].token_ids) == setup.reference(adapter, prompt, MAX_TOKENS), f"adapter={adapter}"
    most_mixed = max(distinct for _, distinct in passes)
    assert most_mixed == (limit or len(CHOICES))
    assert max(rows for rows, _ in passes) > most_mixed  # rows of one adapter still share a pass


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_invalid_limit_is_refused(value):
    with pytest.raises(ValueError, match="max_adapters_per_step"):
        EngineConfig(max_adapters_per_step=value)
