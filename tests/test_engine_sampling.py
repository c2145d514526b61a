"""Sampling: parameter validation, the pure sampler against transformers' warpers, per-request
seeds that make a request's samples independent of its batch, and logprobs.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from flora_core.sampler import (
    SamplingBatch, apply_temperature, apply_top_k, apply_top_p, next_tokens, sample_rows, token_logprobs,
)
from flora_core.sampling_params import SamplingParams
from tests.engine_fixtures import make_setup, one_torch_thread, run_to_completion  # noqa: F401

BAD_PARAMS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 2.0}, "prompt_logprobs"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
]


@pytest.mark.parametrize("kwargs, field", BAD_PARAMS)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalize():
    params = SamplingParams(stop="\n", stop_token_ids=[5, 6], top_k=-1, temperature=0)
    assert params.stop == ("\n",) and params.stop_token_ids == (5, 6) and params.top_k == 0 and params.greedy
    hash(params)  # frozen and hashable: usable as a key


def test_warpers_equal_transformers_per_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=gen) * 3
    top_k, top_p = [0, 1, 5, 17, 40], [1.0, 0.9, 0.5, 0.95, 0.2]
    ours_k = apply_top_k(logits, torch.tensor(top_k))
    ours_p = apply_top_p(logits, torch.tensor(top_p))
    for row in range(5):
        one = logits[row : row + 1]
        expected_k = one if top_k[row] == 0 else TopKLogitsWarper(top_k[row])(None, one)
        expected_p = one if top_p[row] == 1 else TopPLogitsWarper(top_p[row])(None, one)
        assert torch.equal(ours_k[row : row + 1], expected_k)
        assert torch.equal(ours_p[row : row + 1], expected_p)
    kept = torch.isfinite(ours_k).sum(dim=1).tolist()
    assert kept == [40, 1, 5, 17, 40]
    assert torch.allclose(apply_temperature(logits, torch.full((5,), 0.5)), logits * 2)


def test_next_tokens_greedy_rows_and_restricted_support():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=gen)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=5.0, top_k=1),
              SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.3)]
    allowed_k = set(logits[2].topk(3).indices.tolist())
    allowed_p = set(torch.nonzero(torch.isfinite(apply_top_p(logits[3:], torch.tensor([0.3]))[0])).flatten().tolist())
    generators = [None] + [torch.Generator().manual_seed(i) for i in range(3)]
    batch = SamplingBatch.from_params(params, generators, torch.device("cpu"))
    seen_k, seen_p = set(), set()
    for _ in range(200):
        tokens = next_tokens(logits.clone(), batch).tolist()
        assert tokens[0] == int(logits[0].argmax()) and tokens[1] == int(logits[1].argmax())
        seen_k.add(tokens[2])
        seen_p.add(tokens[3])
    assert seen_k == allowed_k  # every allowed token drawn, nothing else
    assert seen_p <= allowed_p and len(allowed_p) < 30


def test_sample_rows_follows_the_distribution_and_its_generator():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(4000, 3)
    draws = sample_rows(logits, [torch.Generator().manual_seed(7)] * 4000)
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq
    one = [sample_rows(logits[:1], [torch.Generator().manual_seed(s)]).item() for s in range(20)]
    assert one == [sample_rows(logits[:1], [torch.Generator().manual_seed(s)]).item() for s in range(20)]


def test_token_logprobs():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([0, 5, 19])
    chosen, values, ids = token_logprobs(logits, tokens, 4)
    expected = logits.log_softmax(-1)
    assert torch.allclose(chosen, expected[torch.arange(3), tokens])
    assert torch.equal(ids, expected.topk(4).indices) and bool((values[:, :-1] >= values[:, 1:]).all())


# ----- the engine -----

SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, top_k=40, top_p=0.9, seed=1234)


@torch.no_grad()
def reference_samples(setup, adapter, prompt, params) -> list[int]:
    """The merged model alone, full forward each token, our sampler with a generator seeded as the engine's."""
    model = setup.merged(adapter)
    generator = torch.Generator().manual_seed(params.seed)
    batch = SamplingBatch.from_params([params], [generator], torch.device("cpu"))
    ids = list(prompt)
    for _ in range(params.max_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[:, -1].float()
        ids.append(int(next_tokens(logits, batch)))
    return ids[len(prompt):]


def busy_engine_run(setup, target_params, adapter):
    """The target request arrives mid-decode among greedy and sampled requests of other adapters."""
    engine = setup.engine(max_running=6)
    others = [("lora-b", SamplingParams(max_tokens=12, temperature=1.0, seed=1)), (None, SamplingParams(max_tokens=3)),
              ("flora", SamplingParams(max_tokens=8, temperature=0)), ("ia3", SamplingParams(max_tokens=12, seed=9))]
    for i, (other_adapter, params) in enumerate(others[:2]):
        engine.add_request([9, 8, 7, 6, 5][: i + 2], params, other_adapter)
    engine.step(), engine.step()
    target = engine.add_request([20, 21, 22, 23], target_params, adapter)
    engine.step()
    for i, (other_adapter, params) in enumerate(others[2:]):
        engine.add_request(list(range(30, 37 + i)), params, other_adapter)
    final = run_to_completion(engine)
    engine.close()
    return list(final[target].token_ids)


def alone_run(setup, params, adapter):
    engine = setup.engine()
    rid = engine.add_request([20, 21, 22, 23], params, adapter)
    final = run_to_completion(engine)
    engine.close()
    return list(final[rid].token_ids)


@pytest.mark.parametrize("adapter", ["lora-a", None])
def test_seeded_sampling_is_the_same_alone_or_batched(adapter):
    setup = make_setup("llama")
    alone = alone_run(setup, SAMPLED, adapter)
    assert alone == busy_engine_run(setup, SAMPLED, adapter)
    assert alone == reference_samples(setup, adapter, [20, 21, 22, 23], SAMPLED)
    other_seed = SamplingParams(**{**vars(SAMPLED), "seed": 4321})
    greedy = SamplingParams(max_tokens=10, temperature=0)
    assert alone != alone_run(setup, other_seed, adapter), "another seed gives the same tokens: not sampling"
    assert alone != alone_run(setup, greedy, adapter)


def test_logprobs_are_the_models_own():
    setup = make_setup("llama")
    engine = setup.engine()
    prompt = [3, 14, 15, 92]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=4), "flora")
    plain = engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0), "flora")
    final = run_to_completion(engine)
    engine.close()
    output = final[rid]
    assert final[plain].logprobs is None and final[plain].token_ids == output.token_ids
    with torch.no_grad():
        ids = torch.tensor([prompt + list(output.token_ids)])
        expected = setup.merged("flora")(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    assert len(output.logprobs) == len(output.token_ids) == 5
    for step, entry in enumerate(output.logprobs):
        assert entry.token_id == output.token_ids[step]
        assert abs(entry.logprob - expected[step, entry.token_id].item()) < 1e-4
        assert [token for token, _ in entry.top] == expected[step].topk(4).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy: the chosen token is the most likely
