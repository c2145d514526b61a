"""The whole engine on each device here, the CPU always and CUDA where present, against references run
alone on that same device: greedy rows of every adapter kind joining mid-decode, rows held to
grammars, and seeded sampling with penalties and logprobs.

CI has no GPU, so it runs the CPU half, which checks these tests themselves (test_engine_parity,
test_structured_output and test_engine_sampling check the CPU at more length). On a GPU machine
`bash bench/gpu_session.sh check` runs the CUDA half: the KV cache, sampler, penalties and
xgrammar's mask on CUDA tensors, which the layer-level test_cuda_parity does not reach.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from flora_core.sampling_params import SamplingParams
from flora_core.structured_output import StructuredOutput
from tests.engine_fixtures import (  # noqa: F401
    byte_level_tokenizer, make_setup, one_torch_thread, run_to_completion, tiny_llama_for,
)
from tests.reference import grammar_greedy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device (none here)"))]
GREEDY_ROWS = [("lora-a", "The quick"), ("lora-b", "Adapters for"), ("flora", "Emoji time"), ("ia3", "naïve"),
               (None, "The lazy dog"), ("lora-a", "friends")]
REGEX = r"[a-z]{2,5}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe not"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tokenizer):
    """Setup (ADAPTERS registered) over a tiny Llama with the tokenizer's vocabulary, on the device."""
    setup = make_setup(base=tiny_llama_for(tokenizer))
    setup.model.model.to(request.param)
    return setup


def merged_on_device(setup, adapter: str | None):
    """The base model with `adapter` merged into its weights, on the engine's device."""
    return copy.deepcopy(setup.merged(adapter)).to(setup.model.device)


@torch.no_grad()
def generate_alone(setup, tokenizer, adapter: str | None, prompt: str, max_tokens: int) -> list[int]:
    model = merged_on_device(setup, adapter)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_rows_equal_generate_alone(setup, tokenizer):
    engine = setup.engine(tokenizer=tokenizer, max_running=8)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    ids = [engine.add_request(prompt, greedy, adapter) for adapter, prompt in GREEDY_ROWS[:3]]
    engine.step(), engine.step()  # the rest join mid-decode
    ids += [engine.add_request(prompt, greedy, adapter) for adapter, prompt in GREEDY_ROWS[3:]]
    final = run_to_completion(engine)
    engine.close()
    for (adapter, prompt), rid in zip(GREEDY_ROWS, ids):
        expected = generate_alone(setup, tokenizer, adapter, prompt, 12)
        assert list(final[rid].token_ids) == expected, (setup.model.device, adapter, prompt)
        if adapter is not None:
            assert expected != generate_alone(setup, tokenizer, None, prompt, 12), f"{adapter} changes nothing"
    assert engine.stats().pinned_adapters == 0


def test_rows_follow_their_own_grammar(setup, tokenizer):
    pytest.importorskip("xgrammar", reason="structured output needs xgrammar (a GPU machine may lack it)")
    rows = [("flora", "Adapters for", StructuredOutput.regex(REGEX)),
            ("ia3", "Emoji time", StructuredOutput.choice(CHOICES)), ("lora-b", "The quick", None)]
    engine = setup.engine(tokenizer=tokenizer, max_running=8)
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0, structured_output=spec), adapter)
           for adapter, prompt, spec in rows]
    final = run_to_completion(engine)
    engine.close()
    for (adapter, prompt, spec), rid in zip(rows, ids):
        model = merged_on_device(setup, adapter)
        expected = grammar_greedy(model, tokenizer, tokenizer(prompt)["input_ids"], spec, 24)
        assert list(final[rid].token_ids) == expected, (setup.model.device, adapter, spec)
    assert re.fullmatch(REGEX, final[ids[0]].text) and final[ids[1]].text in CHOICES


def test_seeded_sampling_with_penalties_and_logprobs_does_not_depend_on_its_batch(setup, tokenizer):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=1234,
                            repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={5: 3.0}, logprobs=2,
                            ignore_eos=True)  # ten tokens on any device, whichever it samples

    def run(crowd: bool):
        engine = setup.engine(tokenizer=tokenizer, max_running=8)
        if crowd:
            for adapter, prompt in GREEDY_ROWS[:4]:
                engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=7), adapter)
            engine.step()
        rid = engine.add_request("The quick", params, "lora-a")
        output = run_to_completion(engine)[rid]
        engine.close()
        return output

    alone, crowded = run(crowd=False), run(crowd=True)
    assert alone.token_ids == crowded.token_ids and len(alone.token_ids) == 10
    assert len(alone.logprobs) == 10
    for token, entry in zip(alone.token_ids, alone.logprobs):
        assert entry.token_id == token and math.isfinite(entry.logprob) and entry.logprob <= 0, entry
        assert len(entry.top) == 2 and entry.top[0][1] >= entry.top[1][1] and entry.top[0][1] >= entry.logprob
    other_seed = SamplingParams(**{**vars(params), "seed": 4321})
    engine = setup.engine(tokenizer=tokenizer)
    rid = engine.add_request("The quick", other_seed, "lora-a")
    assert run_to_completion(engine)[rid].token_ids != alone.token_ids, "another seed gives the same tokens"
    engine.close()
