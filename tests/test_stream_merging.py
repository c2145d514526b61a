"""Merging a request's consecutive outputs (stream_interval_ms): the merged stream carries the same
text, token ids and logprobs as the step-by-step stream, and ends in the same state.

The outputs come from real engine steps (byte-level BPE with multi-byte characters, stop strings,
logprobs), cut into every kind of consecutive group a slow stream could see.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from flora_core.request_output import RequestOutput, as_whole_answer, merge_outputs
from flora_core.sampling_params import SamplingParams
from router.messages import ReplicaError, ReplicaEvent
from router.replica import _merged_events
from tests.engine_fixtures import (  # noqa: F401
    byte_level_tokenizer, make_setup, one_torch_thread, tiny_llama_for,
)

REQUESTS = [  # prompt, params, adapter
    ("東京は", SamplingParams(max_tokens=20, temperature=0, logprobs=2), None),
    ("Emoji time: 🚀", SamplingParams(max_tokens=16, temperature=0.9, seed=3, logprobs=0), "lora-a"),
    ("東京は", SamplingParams(max_tokens=20, temperature=0, stop=["ck+"]), None),  # stops at token 17
    ("naïve café", SamplingParams(max_tokens=12, temperature=0, logprobs=1), "flora"),
]


@pytest.fixture(scope="module")
def step_outputs() -> list[list[RequestOutput]]:
    """Every output of each request, one per engine step that changed it."""
    tokenizer = byte_level_tokenizer()
    setup = make_setup(base=tiny_llama_for(tokenizer))
    engine = setup.engine(tokenizer=tokenizer, max_running=4)
    ids = [engine.add_request(prompt, params, adapter) for prompt, params, adapter in REQUESTS]
    outputs: dict[str, list[RequestOutput]] = {request_id: [] for request_id in ids}
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id].append(output)
    engine.close()
    return [outputs[request_id] for request_id in ids]


def random_groups(outputs: list, rng: random.Random) -> list[list]:
    """outputs cut into consecutive non-empty groups at random places."""
    cuts = sorted(rng.sample(range(1, len(outputs)), rng.randint(0, len(outputs) - 1)))
    return [outputs[a:b] for a, b in zip([0, *cuts], [*cuts, len(outputs)])]


@pytest.mark.parametrize("seed", range(8))
def test_merged_groups_stream_the_same_request(step_outputs, seed):
    rng = random.Random(seed)
    for outputs in step_outputs:
        assert len(outputs) > 3, "too few steps for the grouping to mean anything"
        merged = [merge_outputs(group) for group in random_groups(outputs, rng)]
        final = outputs[-1]
        assert "".join(o.delta_text for o in merged) == final.text
        assert tuple(t for o in merged for t in o.delta_token_ids) == final.token_ids
        if final.logprobs is None:
            assert all(o.delta_logprobs is None for o in merged)
        else:
            assert tuple(lp for o in merged for lp in o.delta_logprobs) == final.logprobs
        last_deltas = {f: getattr(merged[-1], f) for f in ("delta_token_ids", "delta_text", "delta_logprobs")}
        assert merged[-1] == replace(final, **last_deltas)  # the whole-request state, finish and timings
        assert not any(o.finished for o in merged[:-1])


def test_one_group_of_everything_is_the_whole_answer_as_one_delta(step_outputs):
    for outputs in step_outputs:
        merged = merge_outputs(outputs)
        assert merged.delta_text == merged.text == outputs[-1].text
        assert merged.delta_token_ids == merged.token_ids


def test_the_last_output_as_a_whole_answer_equals_every_output_merged(step_outputs):
    """What a replica sends a client that is not streaming: the last output alone, standing for all of them."""
    for outputs in step_outputs:
        assert as_whole_answer(outputs[-1]) == merge_outputs(outputs)


def test_merge_refuses_nothing_and_mixed_requests(step_outputs):
    with pytest.raises(ValueError, match="at least one output"):
        merge_outputs([])
    first, second = step_outputs[0], step_outputs[1]
    with pytest.raises(ValueError, match="one request"):
        merge_outputs([first[0], second[1]])


def test_replica_message_merges_outputs_and_keeps_the_error_last(step_outputs):
    outputs = step_outputs[0][:3]
    error = ReplicaError(status=500, message="the forward pass failed", type="internal_error")
    events = [ReplicaEvent(output=o) for o in outputs] + [ReplicaEvent(error=error)]
    merged = _merged_events(events)
    assert [e.error for e in merged] == [None, error]
    assert merged[0].output == merge_outputs(outputs)
    single = [ReplicaEvent(output=outputs[0])]
    assert _merged_events(single) == single
