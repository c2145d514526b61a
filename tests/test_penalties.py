"""Presence, frequency and repetition penalties: the batched math against transformers and against
their definitions per row, and the engine's mixed batches against each row generated alone.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from flora_core.penalties import PenaltyBatch, apply_penalties, token_pairs
from flora_core.sampler import SamplingBatch, next_tokens
from flora_core.sampling_params import SamplingParams
from tests.engine_fixtures import make_setup, one_torch_thread, run_to_completion  # noqa: F401
from tests.reference import penalized_greedy

VOCAB = 24
CPU = torch.device("cpu")


def test_token_pairs_count_each_rows_own_tokens():
    histories = [[3, 3, 5], [], [23, 0, 3, 0, 0]]
    rows, tokens, counts = token_pairs(histories, VOCAB)
    got = {(r, t): c for r, t, c in zip(rows.tolist(), tokens.tolist(), counts.tolist())}
    assert got == {(row, token): count for row, history in enumerate(histories)
                   for token, count in Counter(history).items()}


def test_repetition_penalty_equals_transformers_per_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    prompts = [[1, 2, 3], [4, 4], [7], [9, 10, 11, 12]]
    outputs = [[5, 1], [], [7, 7, 8], [13]]
    penalties = [1.3, 2.0, 0.7, 1.0]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    ours = apply_penalties(logits, PenaltyBatch.from_rows(params, prompts, outputs, VOCAB, CPU))
    for row in range(4):
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        expected = RepetitionPenaltyLogitsProcessor(penalties[row])(input_ids, logits[row : row + 1].clone())
        assert torch.equal(ours[row], expected[0])
    assert torch.equal(ours[3], logits[3]) and not torch.equal(ours[0], logits[0])


def test_frequency_and_presence_follow_openai_per_row():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, VOCAB, generator=gen)
    outputs = [[2, 2, 2, 6], [2, 6, 6], [4]]
    settings = [(0.5, 0.0), (0.0, 1.5), (-0.4, 0.8)]  # (frequency, presence)
    params = [SamplingParams(frequency_penalty=f, presence_penalty=p) for f, p in settings]
    prompts = [[2, 3, 4]] * 3  # the prompt does not count for these two
    ours = apply_penalties(logits, PenaltyBatch.from_rows(params, prompts, outputs, VOCAB, CPU))
    for row, (frequency, presence) in enumerate(settings):
        expected = logits[row].clone()
        for token, count in Counter(outputs[row]).items():
            expected[token] -= frequency * count + presence
        assert torch.allclose(ours[row], expected, atol=1e-6), row


def test_rows_without_penalties_are_untouched_and_a_batch_without_any_costs_nothing():
    plain = [SamplingParams(), SamplingParams(temperature=0)]
    assert PenaltyBatch.from_rows(plain, [[1], [2]], [[3], [4]], VOCAB, CPU) is None
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=2.0), SamplingParams()]
    outputs = [[logits[0].argmax().item()], [logits[1].argmax().item()], [logits[2].argmax().item()]]
    penalties = PenaltyBatch.from_rows(params, [[0], [0], [0]], outputs, VOCAB, CPU)
    penalized = apply_penalties(logits, penalties)
    assert torch.equal(penalized[0], logits[0]) and torch.equal(penalized[2], logits[2])
    batch = SamplingBatch.from_params(params, [None, None, None], CPU, penalties=penalties)
    greedy = next_tokens(logits.clone(), batch)
    assert greedy[0] == logits[0].argmax() and greedy[1] != logits[1].argmax()  # greedy rows are penalized too


def test_extreme_repetition_penalties_saturate_instead_of_breaking_sampling():
    """A penalty of 1e-300 or 1e300 is valid (> 0, finite) but leaves float32's range: the penalized logits stay
    finite, so a sampled row still gets a token: the tiny one makes the seen token with a positive logit certain,
    the huge one takes the seen token with a negative logit out."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    logits[:, 5], logits[:, 6], logits[:, 7] = 4.0, -3.0, 0.0
    params = [SamplingParams(repetition_penalty=1e-300, seed=1), SamplingParams(repetition_penalty=1e300, seed=1)]
    penalties = PenaltyBatch.from_rows(params, [[5, 6, 7], [5, 6, 7]], [[], []], VOCAB, CPU)
    penalized = apply_penalties(logits, penalties)
    assert bool(torch.isfinite(penalized).all())
    largest = torch.finfo(torch.float32).max
    assert penalized[0, 5] == largest and -1e-30 < penalized[0, 6] <= 0 and penalized[0, 7] == 0
    assert 0 <= penalized[1, 5] < 1e-30 and penalized[1, 6] == -largest and penalized[1, 7] == 0
    batch = SamplingBatch.from_params(params, [None, None], CPU, penalties=penalties)
    for _ in range(5):
        tokens = next_tokens(logits.clone(), batch)
        assert tokens[0] == 5 and tokens[1] != 6


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"presence_penalty": True}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
])
def test_bad_penalties_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# ----- the engine -----

EOS = 2  # the tiny Llama's end-of-sequence token
MIXED = [  # (adapter, prompt, penalties); each row's penalties change its greedy tokens
    ("lora-a", [5, 6, 7, 5], {"repetition_penalty": 1.8}),
    ("lora-b", [40, 41], {"frequency_penalty": 1.5}),
    ("flora", [9, 9, 9, 9, 9], {"presence_penalty": 1.2, "frequency_penalty": 0.4}),
    ("ia3", [60, 61, 62], {"repetition_penalty": 1.4, "presence_penalty": 0.8}),
    (None, [70, 71, 72, 73], {"repetition_penalty": 2.0, "frequency_penalty": -0.5}),
    ("lora-a", [80, 81, 82], {}),
    (None, [90, 91], {}),
]
LATE = [  # arrive while the rows above decode
    ("lora-b", [11, 12, 13], {"frequency_penalty": 2.0, "repetition_penalty": 0.8}),
    ("flora", [20, 21], {}),
]
MAX_TOKENS = 14


def _reference(setup, adapter, prompt, penalties, eos=EOS):
    """The row alone: greedy on the merged model, its penalties applied by their definitions."""
    return penalized_greedy(setup.merged(adapter), prompt, MAX_TOKENS, eos_token_id=eos,
                            presence=penalties.get("presence_penalty", 0.0),
                            frequency=penalties.get("frequency_penalty", 0.0),
                            repetition=penalties.get("repetition_penalty", 1.0))


def test_the_hand_reference_equals_generate_with_repetition_penalty():
    setup = make_setup("llama")
    prompt = [5, 6, 7, 5]
    with torch.no_grad():
        generated = setup.merged("lora-a").generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=MAX_TOKENS,
            do_sample=False, repetition_penalty=1.8, pad_token_id=0)
    assert _reference(setup, "lora-a", prompt, {"repetition_penalty": 1.8}) == generated[0, 4:].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_rows_each_get_their_own_penalties_and_adapter(arch):
    setup = make_setup(arch)
    eos = EOS if arch == "llama" else None
    engine = setup.engine(max_running=16)
    requests = {}
    for adapter, prompt, penalties in MIXED:
        rid = engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **penalties), adapter)
        requests[rid] = (adapter, prompt, penalties)
    engine.step(), engine.step(), engine.step()
    for adapter, prompt, penalties in LATE:
        rid = engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **penalties), adapter)
        requests[rid] = (adapter, prompt, penalties)
    final = run_to_completion(engine)
    engine.close()
    for rid, (adapter, prompt, penalties) in requests.items():
        expected = _reference(setup, adapter, prompt, penalties, eos)
        assert list(final[rid].token_ids) == expected, (adapter, penalties)
        if penalties:
            assert expected != _reference(setup, adapter, prompt, {}, eos), \
                f"{penalties} leave {adapter}'s tokens unchanged: the check would be vacuous"


def test_sampled_rows_with_penalties_do_not_depend_on_their_batch():
    setup = make_setup("llama")
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=77, frequency_penalty=2.0, repetition_penalty=3.0)
    prompt = [30, 31, 32]

    def run(crowd: bool) -> list[int]:
        engine = setup.engine(max_running=8)
        if crowd:
            for adapter, other_prompt, penalties in MIXED[:4]:
                engine.add_request(other_prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=3, **penalties),
                                   adapter)
            engine.step()
        rid = engine.add_request(prompt, params, "flora")
        final = run_to_completion(engine)
        engine.close()
        return list(final[rid].token_ids)

    alone = run(crowd=False)
    assert alone == run(crowd=True)
    unpenalized = SamplingParams(max_tokens=12, temperature=0.9, seed=77)
    engine = setup.engine()
    rid = engine.add_request(prompt, unpenalized, "flora")
    assert alone != list(run_to_completion(engine)[rid].token_ids), "penalties leave the samples unchanged"
    engine.close()
