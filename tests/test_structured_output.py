"""Structured output: every row of a mixed batch held to its own grammar (JSON schema, regex, choice,
any JSON) or to none, each equal to its merged model run alone under xgrammar's own mask, and
each valid by an independent check (re.fullmatch, json + jsonschema).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from flora_core.sampling_params import SamplingParams
from flora_core.structured_output import StructuredOutput
from tests.engine_fixtures import (  # noqa: F401
    byte_level_tokenizer, make_setup, one_torch_thread, run_to_completion, tiny_llama_for,
)
from tests.reference import grammar_greedy

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["ok", "color", "tags"], "additionalProperties": False}
REGEX = r"[a-z]{2,5}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe not"]
MAX_TOKENS = 56  # + the prompt (<= 8 tokens) fits the tiny model's 64 positions


@pytest.fixture(scope="module")
def setup_and_tokenizer():
    tokenizer = byte_level_tokenizer()
    return make_setup(base=tiny_llama_for(tokenizer)), tokenizer


def valid(spec: StructuredOutput, text: str) -> bool:
    """An independent check of the finished text against its spec."""
    if spec.kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if spec.kind == "choice":
        return text in CHOICES
    value = json.loads(text)
    if spec.kind == "json_schema":
        jsonschema.validate(value, SCHEMA)
    return True


def alone_under_xgrammar(setup, tokenizer, adapter, prompt_ids, spec) -> list[int]:
    return grammar_greedy(setup.merged(adapter), tokenizer, prompt_ids, spec, MAX_TOKENS)


ROWS = [  # (adapter, prompt, spec)
    ("lora-a", "The quick", StructuredOutput.json_schema(SCHEMA)),
    ("flora", "Adapters for", StructuredOutput.regex(REGEX)),
    ("ia3", "Emoji time", StructuredOutput.choice(CHOICES)),
    (None, "The lazy dog", StructuredOutput.json_schema(SCHEMA)),
    ("lora-b", "friends", StructuredOutput.json_object()),
    ("lora-a", "The quick", None),
    ("flora", "café", StructuredOutput.choice(CHOICES)),
]


def test_every_row_follows_its_own_grammar_in_one_batch(setup_and_tokenizer):
    setup, tokenizer = setup_and_tokenizer
    engine = setup.engine(tokenizer=tokenizer, max_running=16)
    ids = []
    for i, (adapter, prompt, spec) in enumerate(ROWS):
        ids.append(engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                             structured_output=spec), adapter))
        if i == 3:
            engine.step(), engine.step()  # the rest join mid-decode
    final = run_to_completion(engine)
    engine.close()
    for (adapter, prompt, spec), rid in zip(ROWS, ids):
        out = final[rid]
        expected = alone_under_xgrammar(setup, tokenizer, adapter, tokenizer(prompt)["input_ids"], spec)
        assert list(out.token_ids) == expected, (adapter, spec)
        if spec is None:
            assert out.finish_reason == "length" and not valid(StructuredOutput.choice(CHOICES), out.text)
            continue
        assert out.finish_reason == "stop" and valid(spec, out.text), (spec.kind, out.text)
        free = alone_under_xgrammar(setup, tokenizer, adapter, tokenizer(prompt)["input_ids"], None)
        assert expected != free, f"the {spec.kind} grammar leaves {adapter}'s tokens unchanged"


def test_sampled_rows_stay_in_their_grammar_and_do_not_depend_on_their_batch(setup_and_tokenizer):
    setup, tokenizer = setup_and_tokenizer
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5,
                            structured_output=StructuredOutput.json_schema(SCHEMA))

    def run(crowd: bool) -> str:
        engine = setup.engine(tokenizer=tokenizer, max_running=8)
        if crowd:
            for adapter, prompt, spec in ROWS[1:5]:
                engine.add_request(prompt, SamplingParams(max_tokens=20, temperature=0.8, seed=1,
                                                          structured_output=spec), adapter)
            engine.step()
        rid = engine.add_request("The quick", params, "flora")
        final = run_to_completion(engine)
        engine.close()
        assert final[rid].finish_reason == "stop"
        return final[rid].text

    texts = {run(crowd=False), run(crowd=True)}
    assert len(texts) == 1
    jsonschema.validate(json.loads(texts.pop()), SCHEMA)


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos(setup_and_tokenizer):
    setup, tokenizer = setup_and_tokenizer
    engine = setup.engine(tokenizer=tokenizer)
    rid = engine.add_request("The", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                   structured_output=StructuredOutput.choice(CHOICES)), "lora-b")
    out = run_to_completion(engine)[rid]
    engine.close()
    assert out.finish_reason == "stop" and out.text in CHOICES and out.token_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("make, message", [
    (lambda: StructuredOutput.regex("[a-"), "Unclosed"),
    (lambda: StructuredOutput.json_schema("{not json"), "JSON"),
    (lambda: StructuredOutput.json_schema({"type": "frob"}), "frob"),
    (lambda: StructuredOutput.choice([]), "non-empty"),
    (lambda: StructuredOutput.regex("a" * 100_001), "at most"),
    (lambda: SamplingParams(min_tokens=2, structured_output=StructuredOutput.json_object()), "min_tokens"),
    (lambda: SamplingParams(structured_output={"type": "json_object"}), "StructuredOutput"),
])
def test_bad_specs_name_the_field(make, message):
    with pytest.raises(ValueError, match=f"structured_output.*{message}|{message}.*structured_output"):
        make()


def test_an_engine_without_a_tokenizer_refuses_structured_output():
    engine = make_setup("llama").engine()
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(structured_output=StructuredOutput.json_object()))
    engine.close()


def test_a_grammar_the_vocabulary_cannot_spell_fails_that_request_alone():
    """The embedded model's characters have no '{': a JSON request ends with an error, its batch goes on."""
    from transformers import AutoTokenizer

    from flora_core import Engine, EngineConfig, MultiAdapterModel
    from flora_core.default_model import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    engine = Engine(MultiAdapterModel.from_pretrained(default_model_dir()), EngineConfig(max_model_len=64), tokenizer)
    specs = [StructuredOutput.json_object(), StructuredOutput.regex(REGEX), None]
    ids = [engine.add_request("hello=", SamplingParams(max_tokens=12, temperature=temperature, seed=3,
                                                      structured_output=spec))
           for temperature in (0.0, 1.0) for spec in specs]
    final = run_to_completion(engine)
    engine.close()
    for rid, spec in zip(ids, specs * 2):
        out = final[rid]
        if spec is not None and spec.kind == "json":
            assert out.finish_reason == "error" and "'{'" in str(out.error) and out.token_ids == ()
        else:
            assert out.finish_reason == "stop" and out.error is None
    assert re.fullmatch(REGEX, final[ids[1]].text) and final[ids[2]].text == "hello"
