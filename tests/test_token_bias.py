"""logit_bias, min_tokens and min_p: the batched math against transformers' processors per row, and
the engine's mixed batches against transformers' generate() on each row's merged model alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, SequenceBiasLogitsProcessor,
)

from flora_core.sampler import apply_min_p
from flora_core.sampling_params import SamplingParams
from flora_core.token_bias import TokenBiasBatch, apply_token_bias
from tests.engine_fixtures import make_setup, one_torch_thread, run_to_completion  # noqa: F401

VOCAB = 24
CPU = torch.device("cpu")


def test_bias_and_min_tokens_equal_transformers_per_row():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(logit_bias={3: 5.0, 7: -100.0}), SamplingParams(min_tokens=4),
              SamplingParams(min_tokens=2, logit_bias={0: 1.5})]
    stop_ids, lengths = [{2}, {2, 9}, {2}], [0, 3, 2]
    ours = apply_token_bias(logits, TokenBiasBatch.from_rows(params, stop_ids, lengths, CPU))
    prompt = torch.zeros(1, 5, dtype=torch.long)
    for row in range(3):
        input_ids = torch.cat([prompt, torch.ones(1, lengths[row], dtype=torch.long)], dim=1)
        expected = logits[row : row + 1].clone()
        if params[row].min_tokens:
            expected = MinNewTokensLengthLogitsProcessor(5, params[row].min_tokens, sorted(stop_ids[row]))(
                input_ids, expected)
        if params[row].logit_bias:
            bias = {(token,): value for token, value in params[row].logit_bias}
            expected = SequenceBiasLogitsProcessor(bias)(input_ids, expected)
        assert torch.equal(ours[row], expected[0]), row
    assert ours[1, 2] == ours[1, 9] == float("-inf") and torch.isfinite(ours[2]).all()  # row 2 may stop now
    assert TokenBiasBatch.from_rows([SamplingParams(min_tokens=1)], [{2}], [1], CPU) is None


def test_min_p_equals_transformers_per_row():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1)) * 2
    min_p = [0.0, 0.05, 0.3, 1.0]
    ours = apply_min_p(logits, torch.tensor(min_p))
    for row in range(4):
        one = logits[row : row + 1]
        expected = one if min_p[row] == 0 else MinPLogitsWarper(min_p[row])(None, one)
        assert torch.equal(ours[row : row + 1], expected)
    kept = torch.isfinite(ours).sum(dim=1).tolist()
    assert kept[0] == VOCAB and kept[3] == 1 and VOCAB > kept[1] > kept[2] > 1


@pytest.mark.parametrize("kwargs, field", [
    ({"logit_bias": {5: 100.5}}, "logit_bias"),
    ({"logit_bias": {-3: 1.0}}, "logit_bias"),
    ({"logit_bias": [(1, 1.0), (1, 2.0)]}, "logit_bias"),
    ({"logit_bias": {1: float("inf")}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
    ({"min_p": 1.01}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_ids_are_checked_against_the_vocabulary():
    engine = make_setup("llama").engine()
    with pytest.raises(ValueError, match="logit_bias has 128"):
        engine.add_request([1, 2], SamplingParams(logit_bias={128: 1.0}))
    engine.close()


# ----- the engine against generate() -----

EOS = 2  # the tiny Llama's end-of-sequence token
MAX_TOKENS = 12


@torch.no_grad()
def generated(setup, adapter, prompt, *, eos=(EOS,), seed=None, **kwargs) -> list[int]:
    """transformers' generate() on the merged model, this row alone; seed: sampling on the global RNG."""
    if seed is not None:
        torch.manual_seed(seed)
    out = setup.merged(adapter).generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=MAX_TOKENS, pad_token_id=0, eos_token_id=list(eos), **kwargs)
    return out[0, len(prompt):].tolist()


def test_mixed_batch_rows_each_get_their_own_bias_and_min_tokens():
    setup = make_setup("llama")
    plain = {adapter: generated(setup, adapter, [5, 6, 7], do_sample=False) for adapter in ("lora-a", "flora")}
    early_stop = plain["flora"][1]  # flora's second greedy token: a stop token that ends it at once
    rows = [  # (adapter, prompt, our parameters, generate()'s for the same)
        ("lora-a", [5, 6, 7], {"logit_bias": {plain["lora-a"][0]: -100.0, 50: 3.0}},
         {"sequence_bias": {(plain["lora-a"][0],): -100.0, (50,): 3.0}}),
        ("flora", [5, 6, 7], {"stop_token_ids": [early_stop], "min_tokens": 6},
         {"eos": (early_stop, EOS), "min_new_tokens": 6}),
        ("ia3", [40, 41], {"logit_bias": {9: 4.0}, "repetition_penalty": 1.5},
         {"sequence_bias": {(9,): 4.0}, "repetition_penalty": 1.5}),
        (None, [60, 61, 62], {"min_tokens": 3, "logit_bias": {EOS: 2.0}},
         {"min_new_tokens": 3, "sequence_bias": {(EOS,): 2.0}}),
        ("lora-b", [70, 71], {}, {}),
    ]
    engine = setup.engine(max_running=8)
    ids = {}
    for i, (adapter, prompt, ours, _) in enumerate(rows):
        ids[i] = engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **ours), adapter)
        if i == 2:
            engine.step(), engine.step()  # the last rows join mid-decode
    final = run_to_completion(engine)
    engine.close()
    for i, (adapter, prompt, ours, theirs) in enumerate(rows):
        eos = theirs.pop("eos", (EOS,))
        expected = generated(setup, adapter, prompt, eos=eos, do_sample=False, **theirs)
        assert list(final[ids[i]].token_ids) == expected, (adapter, ours)
        if ours:
            assert expected != generated(setup, adapter, prompt, eos=eos, do_sample=False), f"{ours} change nothing"
    held = list(final[ids[1]].token_ids)  # would have stopped at its second token; min_tokens holds it to 6
    assert len(held) >= 6 and early_stop not in held[:6]


def test_seeded_sampling_with_every_control_equals_generate():
    """temperature, top-k, top-p, min-p, logit_bias and repetition_penalty in one sampled row, among others."""
    setup = make_setup("llama")
    ours = dict(temperature=0.7, top_k=50, top_p=0.95, min_p=0.1, logit_bias={12: 2.0}, repetition_penalty=1.3)
    theirs = dict(temperature=0.7, top_k=50, top_p=0.95, min_p=0.1, sequence_bias={(12,): 2.0},
                  repetition_penalty=1.3)
    engine = setup.engine(max_running=8)
    engine.add_request([9, 9, 9], SamplingParams(max_tokens=10, temperature=1.0, seed=4, min_p=0.2), "lora-b")
    engine.add_request([8, 8], SamplingParams(max_tokens=10, temperature=0, logit_bias={3: 9.0}), "flora")
    engine.step()
    rid = engine.add_request([30, 31, 32], SamplingParams(max_tokens=MAX_TOKENS, seed=21, **ours), "lora-a")
    final = run_to_completion(engine)
    engine.close()
    expected = generated(setup, "lora-a", [30, 31, 32], seed=21, do_sample=True, **theirs)
    assert list(final[rid].token_ids) == expected
    for left_out in ("min_p", "sequence_bias", "repetition_penalty"):  # each control changes the samples
        others = {k: v for k, v in theirs.items() if k != left_out}
        assert expected != generated(setup, "lora-a", [30, 31, 32], seed=21, do_sample=True, **others), left_out
