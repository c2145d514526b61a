"""Prompt log probabilities (scoring a text with an adapter) against each adapter merged, run alone.

A prompt's log probabilities must equal log_softmax of the base model's logits with that
request's adapter merged into the weights, run on the prompt alone; whatever shares the batch:
other adapters, prompts of other lengths (left padding), rows already decoding, and requests
that do not ask for them, whose tokens must stay those of generate().
"""

from __future__ import annotations

import pytest
import torch

from flora_core.sampling_params import SamplingParams
from tests.engine_fixtures import ADAPTERS, make_resident, make_setup, one_torch_thread, run_to_completion  # noqa: F401

SHARED_PROMPT = [5, 9, 17, 4, 22, 8]  # scored under every adapter: each must change its log probabilities
OWN_PROMPTS = {None: [7], "lora-a": [3, 30, 12], "lora-b": [11, 6, 40, 2, 19, 25, 33, 9, 14],
               "flora": [21, 13, 8, 27], "ia3": [35, 4, 16, 10, 28, 6, 12]}
TOP = {None: 0, "lora-a": 3, "lora-b": 1, "flora": 5, "ia3": 2}


@torch.no_grad()
def merged_prompt_logprobs(setup, adapter: str | None, prompt: list[int]) -> torch.Tensor:
    """[L - 1, V]: row i is the log distribution of prompt token i + 1, the adapter merged, the prompt alone."""
    return setup.merged(adapter)(input_ids=torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_prompt_logprobs_equal_each_adapter_merged_alone(arch):
    setup = make_setup(arch)
    make_resident(setup, list(ADAPTERS))
    engine = setup.engine()
    try:
        decoding = {engine.add_request([12, 3, 7], SamplingParams(max_tokens=10, temperature=0), a): a
                    for a in ("lora-a", None)}
        engine.step()  # these two now decode beside the prefills below
        scoring, plain = {}, {}
        for adapter in (None, *ADAPTERS):
            for prompt in (SHARED_PROMPT, OWN_PROMPTS[adapter]):
                params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=TOP[adapter])
                scoring[engine.add_request(prompt, params, adapter)] = (adapter, prompt)
            plain[engine.add_request(OWN_PROMPTS[adapter], SamplingParams(max_tokens=4, temperature=0), adapter)] = (
                adapter, OWN_PROMPTS[adapter])
        final = run_to_completion(engine)
    finally:
        engine.close()

    for rid, (adapter, prompt) in scoring.items():
        entries = final[rid].prompt_logprobs
        assert entries is not None and len(entries) == len(prompt) and entries[0] is None
        expected = merged_prompt_logprobs(setup, adapter, prompt)
        for i, entry in enumerate(entries[1:]):
            assert entry.token_id == prompt[i + 1]
            assert entry.logprob == pytest.approx(expected[i, prompt[i + 1]].item(), abs=1e-4), (arch, adapter, i)
            top = expected[i].topk(TOP[adapter])
            assert [token for token, _ in entry.top] == top.indices.tolist()
            assert [value for _, value in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert list(final[rid].token_ids) == setup.reference(adapter, prompt, 4)  # its generation is unchanged
    for rid, (adapter, prompt) in {**plain, **{r: (a, [12, 3, 7]) for r, a in decoding.items()}}.items():
        assert final[rid].prompt_logprobs is None
        assert list(final[rid].token_ids) == setup.reference(adapter, prompt, len(final[rid].token_ids))
        eos = setup.base.generation_config.eos_token_id
        assert final[rid].finish_reason == "length" or final[rid].token_ids[-1] == eos

    base = merged_prompt_logprobs(setup, None, SHARED_PROMPT)
    for adapter in ADAPTERS:
        shifted = (merged_prompt_logprobs(setup, adapter, SHARED_PROMPT) - base).abs().max().item()
        assert shifted > 0.05, f"{arch}: {adapter} barely changes the prompt's log probabilities (a vacuous check)"


def test_a_one_token_prompt_has_one_empty_entry():
    setup = make_setup("llama")
    engine = setup.engine()
    rid = engine.add_request([9], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3), "lora-b")
    final = run_to_completion(engine)
    engine.close()
    assert final[rid].prompt_logprobs == (None,)
    assert list(final[rid].token_ids) == setup.reference("lora-b", [9], 2)
