"""The application on a real local Ray cluster, called over real HTTP with the openai client.

Every answer is compared with the engine run alone in this process for that adapter.
"""

from __future__ import annotations

import asyncio
import re
import shutil

import httpx
import openai
import pytest
import ray
import torch
from ray import serve
from transformers import AutoTokenizer

from deploy.app import build_app
from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from flora_core.structured_output import StructuredOutput
from router.handle_api import GenerateRequest
from tests.reference import grammar_greedy, penalized_greedy
from tests.serving_fixtures import (
    MAX_MODEL_LEN, PROMPTS, TEST_ADAPTERS, app_args, engine_alone_texts, merged_logprobs, merged_model,
    write_test_adapters,
)

BASE_URL = "http://127.0.0.1:8000"
TOKEN = {"Authorization": "Bearer test-token"}
CONFIG_MERGE = {"name": "mix-lora", "adapters": ["lora-r2", "lora-r4"], "weights": [0.8, -0.5]}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_test_adapters(root)
    return root


@pytest.fixture(scope="module")
def app(adapter_root):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(app_args(adapter_root, merged_adapters=[CONFIG_MERGE])), name="flora", route_prefix="/")
    serve.run(build_app(app_args(adapter_root, max_queued_requests=1)), name="small", route_prefix="/small")
    serve.run(build_app(app_args(adapter_root, stream_interval_ms=1000)), name="merged", route_prefix="/merged")
    yield BASE_URL
    serve.shutdown()
    ray.shutdown()


def with_client(scenario):
    """Run scenario(client) in a fresh event loop with its own openai client."""

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_concurrent_completions_across_adapters_match_the_engine_alone(app, adapter_root):
    models = [None, *TEST_ADAPTERS]
    cases = [(m, p) for m in models for p in PROMPTS[:3]]

    async def ask(client, model, prompt):
        reply = await client.completions.create(model=model or DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=10,
                                                temperature=0)
        return reply.choices[0].text

    async def ask_all(client):
        return await asyncio.gather(*(ask(client, m, p) for m, p in cases))

    got = with_client(ask_all)
    expected = engine_alone_texts(adapter_root, [(m, p, 10) for m, p in cases])
    assert got == expected
    base = {p: t for (m, p), t in zip(cases, got) if m is None}
    changed = sum(t != base[p] for (m, p), t in zip(cases, got) if m is not None)
    assert changed >= len(TEST_ADAPTERS), "adapters barely change the answers: the comparison would be vacuous"


def test_streamed_text_equals_the_whole_answer(app):
    async def both(client, model):
        whole = await client.completions.create(model=model, prompt="stream=", max_tokens=12, temperature=0)
        parts = []
        async for chunk in await client.completions.create(model=model, prompt="stream=", max_tokens=12,
                                                           temperature=0, stream=True):
            parts.append(chunk.choices[0].text)
        return whole.choices[0].text, "".join(parts), len(parts)

    async def each(client):
        return await asyncio.gather(*(both(client, m) for m in ["lora-r8", "flora-r1", "ia3-a", DEFAULT_MODEL_NAME]))

    for whole, streamed, chunks in with_client(each):
        assert streamed == whole
        assert chunks > 1


def test_merged_stream_carries_every_token_and_logprob(app):
    """stream_interval_ms=1000: tokens made within a second travel in one chunk, and nothing is lost."""

    async def both(whole_client, merged_client, model):
        kwargs = dict(model=model, prompt="merge=", max_tokens=24, temperature=0, logprobs=2,
                      extra_body={"ignore_eos": True})
        whole = (await whole_client.completions.create(**kwargs)).choices[0]
        parts, tokens, logprobs = [], [], []
        async for chunk in await merged_client.completions.create(**kwargs, stream=True):
            parts.append(chunk.choices[0].text)
            tokens += chunk.choices[0].logprobs.tokens
            logprobs += chunk.choices[0].logprobs.token_logprobs
        return whole, "".join(parts), tokens, logprobs, len(parts)

    async def each(client):
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/merged/v1", api_key="unused", max_retries=0,
                                      timeout=60) as merged_client:
            return await asyncio.gather(*(both(client, merged_client, m)
                                          for m in ["lora-r8", "flora-r2", "ia3-b", DEFAULT_MODEL_NAME]))

    for whole, streamed, tokens, logprobs, chunks in with_client(each):
        assert streamed == whole.text
        assert tokens == whole.logprobs.tokens and len(tokens) == 24
        assert logprobs == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
        assert chunks < len(tokens)  # merged: 24 chunks would need a second per engine step


SCORED = [DEFAULT_MODEL_NAME, "lora-r8", "flora-r4", "ia3-a"]


def test_echo_with_logprobs_scores_the_prompt_under_each_adapter(app, adapter_root):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs=1, max_tokens=1, token ids) and
    prompt scoring (echo, max_tokens=0), for several adapters at once, against each merged alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tokenizer("serving=")["input_ids"]

    async def score(client, model):
        harness = await client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                                  temperature=0)
        scored = await client.completions.create(model=model, prompt="serving=", echo=True, logprobs=3,
                                                 max_tokens=0)
        return harness, scored

    async def each(client):
        return await asyncio.gather(*(score(client, m) for m in SCORED))

    references = {}
    for model, (harness, scored) in zip(SCORED, with_client(each)):
        adapter = None if model == DEFAULT_MODEL_NAME else model
        expected = references[model] = merged_logprobs(adapter_root, adapter, ids)
        prompt_expected = [expected[i - 1, ids[i]].item() for i in range(1, len(ids))]
        choice = scored.choices[0]
        assert choice.text == "serving=" and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(prompt_expected, abs=1e-4), model
        for i, top in enumerate(choice.logprobs.top_logprobs[1:]):
            best = expected[i].topk(3)
            assert list(top) == [tokenizer.decode([t]) for t in best.indices.tolist()]
            assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        lm_eval = harness.choices[0].logprobs
        generated = expected[-1].argmax().item()
        assert len(lm_eval.token_logprobs) == len(ids) + 1 and lm_eval.token_logprobs[0] is None
        assert lm_eval.token_logprobs[1:len(ids)] == pytest.approx(prompt_expected, abs=1e-4)
        assert lm_eval.token_logprobs[-1] == pytest.approx(expected[-1, generated].item(), abs=1e-4)
        generated_text = "" if generated == tokenizer.eos_token_id else tokenizer.decode([generated])  # EOS adds none
        assert harness.choices[0].text == tokenizer.decode(ids) + generated_text
    base = references[DEFAULT_MODEL_NAME]
    for model in SCORED[1:]:
        assert (references[model] - base).abs().max() > 0.05, f"{model} barely changes the scores: a vacuous check"


def test_streamed_echo_carries_the_prompt_logprobs_once(app):
    async def both(client):
        kwargs = dict(model="lora-r2", prompt="zebra=", echo=True, logprobs=2, max_tokens=6, temperature=0)
        whole = await client.completions.create(**kwargs)
        chunks = [c.choices[0] async for c in await client.completions.create(**kwargs, stream=True)]
        return whole.choices[0], chunks

    whole, chunks = with_client(both)
    assert chunks[0].text.startswith("zebra=") and "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens
    streamed = [lp for c in chunks for lp in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


LORAX_MODELS = [None, "lora-r8", "flora-r4", "ia3-a"]


def test_lorax_clients_generate_with_each_adapter_in_one_batch(app, adapter_root):
    """LoRAX's own client on /generate (POST / for it), four adapters at once: each text is the engine alone's,
    and each token's logprob, top alternatives and the prompt's scores are the adapter merged into the weights."""
    import lorax

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompt_ids = tokenizer("hello=")["input_ids"]

    async def each():
        client = lorax.AsyncClient(BASE_URL, timeout=60)
        return await asyncio.gather(*(client.generate("hello=", adapter_id=m, max_new_tokens=8, details=True,
                                                      decoder_input_details=True, return_k_alternatives=2)
                                      for m in LORAX_MODELS))

    answers = asyncio.run(each())
    expected = engine_alone_texts(adapter_root, [(m, "hello=", 8) for m in LORAX_MODELS])
    assert [a.generated_text for a in answers] == expected
    assert len(set(expected)) >= 3, "adapters barely change the answers: the comparison would be vacuous"
    for model, answer in zip(LORAX_MODELS, answers):
        details, generated = answer.details, [t.id for t in answer.details.tokens]
        assert details.prompt_tokens == len(prompt_ids) and details.generated_tokens == len(generated)
        ended_on_eos = generated[-1] == tokenizer.eos_token_id
        assert details.finish_reason.value == ("eos_token" if ended_on_eos else "length")
        assert "".join(t.text for t in details.tokens if not t.special) == answer.generated_text
        reference = merged_logprobs(adapter_root, model, prompt_ids + generated)  # row i predicts token i + 1
        for i, token in enumerate(details.tokens):
            row = reference[len(prompt_ids) - 1 + i]
            assert token.logprob == pytest.approx(row[token.id].item(), abs=1e-4), (model, i)
            best = row.topk(2)
            assert [a.id for a in token.alternative_tokens] == best.indices.tolist(), (model, i)
            assert [a.logprob for a in token.alternative_tokens] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t.id for t in details.prefill] == prompt_ids and details.prefill[0].logprob is None
        assert [t.logprob for t in details.prefill[1:]] == pytest.approx(
            [reference[i - 1, prompt_ids[i]].item() for i in range(1, len(prompt_ids))], abs=1e-4)


def test_lorax_stream_sampling_and_errors(app):
    """generate_stream's tokens add up to the whole answer; do_sample with a seed samples as the OpenAI route does;
    what has no counterpart here is a 422 naming the field, in LoRAX's error shape, and the server keeps serving."""
    import lorax

    client = lorax.Client(BASE_URL, timeout=60)
    whole = client.generate("zebra=", adapter_id="flora-r2", max_new_tokens=10, return_full_text=True)
    events = list(client.generate_stream("zebra=", adapter_id="flora-r2", max_new_tokens=10, return_full_text=True))
    assert whole.generated_text.startswith("zebra=") and events[-1].generated_text == whole.generated_text
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert "zebra=" + "".join(e.token.text for e in events if not e.token.special) == whole.generated_text
    assert events[-1].details.generated_tokens == len(events)
    raw = httpx.post(f"{BASE_URL}/generate_stream", timeout=60, json={"inputs": "zebra=", "parameters": {
        "adapter_id": "flora-r2", "max_new_tokens": 10}})
    assert raw.status_code == 200 and "[DONE]" not in raw.text  # LoRAX's stream has no OpenAI terminator

    sampled = [client.generate("hello=", adapter_id="lora-r2", do_sample=True, seed=11, max_new_tokens=8).generated_text
               for _ in range(2)]
    openai_sampled = httpx.post(f"{BASE_URL}/v1/completions", timeout=60, json={
        "model": "lora-r2", "prompt": "hello=", "temperature": 1.0, "seed": 11, "max_tokens": 8}).json()
    assert sampled[0] == sampled[1] == openai_sampled["choices"][0]["text"]

    with pytest.raises(lorax.errors.NotFoundError):
        client.generate("x=", adapter_id="no-such-adapter")
    with pytest.raises(lorax.errors.ValidationError, match="max_new_tokens"):
        client.generate("x=", adapter_id="lora-r2", max_new_tokens=500)
    for parameters, field in [({"typical_p": 0.5}, "typical_p"), ({"adapter_source": "hub"}, "adapter_source"),
                              ({"merged_adapters": {"ids": ["lora-r2"], "weights": [1.0]}}, "merged_adapters"),
                              ({"max_new_tokenz": 3}, "max_new_tokenz"), ({"truncate": 0}, "truncate")]:
        refused = httpx.post(f"{BASE_URL}/generate", json={"inputs": "x=", "parameters": parameters}, timeout=30)
        assert refused.status_code == 422 and refused.json()["error_type"] == "validation", refused.text
        assert field in refused.json()["error"]
    assert client.generate("x=", adapter_id="lora-r2", max_new_tokens=2).details.generated_tokens == 2
    assert httpx.post(f"{BASE_URL}/generate", json={"inputs": "x=", "parameters": {"max_new_tokens": 2}},
                      timeout=30).json()["details"] is None  # details only when asked for


PENALIZED = [  # (model, penalties): each changes that model's greedy answer to "aaaa="
    ("lora-r8", {"frequency_penalty": 1.5}),
    ("flora-r1", {"presence_penalty": 1.0, "repetition_penalty": 1.5}),
    ("ia3-a", {"repetition_penalty": 2.0}),
    (DEFAULT_MODEL_NAME, {"frequency_penalty": 0.8, "presence_penalty": -0.5}),
]


def test_lorax_generated_text_ends_with_its_stop_string_as_in_tgi(app):
    """A stop string ends the answer with finish_reason stop_sequence, and generated_text keeps it, as TGI and
    LoRAX do: the OpenAI route's text (which leaves it out) plus the stop string, streamed or whole."""
    import lorax

    client = lorax.Client(BASE_URL, timeout=60)
    free = client.generate("zebra=", adapter_id="lora-r2", max_new_tokens=10).generated_text
    stop = free[len(free) // 2]  # a character from the middle of the answer
    cut = httpx.post(f"{BASE_URL}/v1/completions", timeout=60, json={
        "model": "lora-r2", "prompt": "zebra=", "max_tokens": 10, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop" and stop not in cut["choices"][0]["text"]
    answer = client.generate("zebra=", adapter_id="lora-r2", max_new_tokens=10, stop_sequences=[stop], details=True)
    assert answer.generated_text == cut["choices"][0]["text"] + stop
    assert answer.details.finish_reason.value == "stop_sequence"
    events = list(client.generate_stream("zebra=", adapter_id="lora-r2", max_new_tokens=10, stop_sequences=[stop]))
    assert events[-1].generated_text == answer.generated_text
    assert "".join(e.token.text for e in events).startswith(answer.generated_text)


def test_lorax_local_adapter_source_names_a_folder_under_adapter_dir(app, adapter_root, tmp_path):
    """adapter_source 'local' with adapter_id a folder (absolute, or relative to adapter_dir) serves that folder's
    adapter, the same answer as its name; a folder outside adapter_dir is a 422 naming adapter_id."""
    import lorax

    client = lorax.Client(BASE_URL, timeout=60)
    by_name = client.generate("hello=", adapter_id="lora-r2", max_new_tokens=8).generated_text
    by_base = client.generate("hello=", max_new_tokens=8).generated_text
    assert by_name != by_base  # not vacuous: the adapter changes the answer
    for path in [str(adapter_root / "lora-r2"), "lora-r2", str(adapter_root / "x" / ".." / "lora-r2")]:
        assert client.generate("hello=", adapter_id=path, adapter_source="local",
                               max_new_tokens=8).generated_text == by_name, path
    outside = tmp_path / "lora-r2"
    outside.mkdir()
    for path in [str(outside), str(adapter_root / ".." / "lora-r2"), "no-such-folder"]:
        refused = httpx.post(f"{BASE_URL}/generate", timeout=30, json={"inputs": "x=", "parameters": {
            "adapter_id": path, "adapter_source": "local"}})
        assert refused.status_code == 422 and refused.json()["error_type"] == "validation", refused.text
        assert refused.json()["error"].startswith("adapter_id") and str(adapter_root) not in refused.json()["error"]
    assert client.generate("hello=", adapter_id="lora-r2", max_new_tokens=8).generated_text == by_name


def test_penalties_in_one_batch_match_each_request_alone(app, adapter_root):
    """The openai client's presence/frequency_penalty and vLLM's repetition_penalty, four requests at once."""

    async def ask(client, model, penalties):
        repetition = ({"repetition_penalty": penalties["repetition_penalty"]} if "repetition_penalty" in penalties
                      else {})
        reply = await client.completions.create(
            model=model, prompt="aaaa=", max_tokens=16, temperature=0, logprobs=0,
            presence_penalty=penalties.get("presence_penalty"), frequency_penalty=penalties.get("frequency_penalty"),
            extra_body={"ignore_eos": True, **repetition})
        return reply.choices[0].logprobs.tokens

    async def ask_all(client):
        return await asyncio.gather(*(ask(client, m, p) for m, p in PENALIZED))

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompt = tokenizer("aaaa=")["input_ids"]
    for (model, penalties), tokens in zip(PENALIZED, with_client(ask_all)):
        adapter = None if model == DEFAULT_MODEL_NAME else model
        reference = merged_model(adapter_root, adapter)
        expected = penalized_greedy(reference, prompt, 16, presence=penalties.get("presence_penalty", 0.0),
                                    frequency=penalties.get("frequency_penalty", 0.0),
                                    repetition=penalties.get("repetition_penalty", 1.0))
        assert tokens == [tokenizer.decode([t]) for t in expected], (model, penalties)
        assert expected != penalized_greedy(reference, prompt, 16), f"{penalties} leave {model} unchanged"


def test_logit_bias_and_min_tokens_in_one_batch_match_generate_alone(app, adapter_root):
    """OpenAI's logit_bias and vLLM's min_tokens, three requests at once, against generate() on each merged model."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompt = tokenizer("hello=")["input_ids"]
    eos = tokenizer.eos_token_id

    def generate(model, **kwargs):
        merged = merged_model(adapter_root, None if model == DEFAULT_MODEL_NAME else model)
        out = merged.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos, **kwargs)
        return out[0, len(prompt):].tolist()

    first = generate("lora-r8")[0]
    letter_a = tokenizer.convert_tokens_to_ids("a")
    cases = [  # (model, request fields, generate()'s for the same)
        ("lora-r8", {"logit_bias": {str(first): -100, str(letter_a): 5}},
         {"sequence_bias": {(first,): -100.0, (letter_a,): 5.0}}),
        ("flora-r2", {"extra_body": {"min_tokens": 14}}, {"min_new_tokens": 14}),
        (DEFAULT_MODEL_NAME, {"logit_bias": {str(eos): 100}, "extra_body": {"min_tokens": 2}},
         {"sequence_bias": {(eos,): 100.0}, "min_new_tokens": 2}),
    ]

    async def ask(client, model, fields):
        reply = await client.completions.create(model=model, prompt="hello=", max_tokens=16, temperature=0,
                                                logprobs=0, **fields)
        return reply.choices[0].logprobs.tokens

    async def ask_all(client):
        return await asyncio.gather(*(ask(client, m, f) for m, f, _ in cases))

    for (model, fields, theirs), tokens in zip(cases, with_client(ask_all)):
        with torch.no_grad():
            expected, plain = generate(model, **theirs), generate(model)
        assert tokens == [tokenizer.decode([t]) for t in expected], (model, fields)
        assert expected != plain, f"{fields} leave {model} unchanged"


GUIDED = [  # (model, request fields, the same as a StructuredOutput)
    ("lora-r8", {"guided_regex": "[a-z]{2,4}-[0-9]{2}"}, StructuredOutput.regex("[a-z]{2,4}-[0-9]{2}")),
    ("flora-r1", {"guided_choice": ["yes", "no", "maybe"]}, StructuredOutput.choice(["yes", "no", "maybe"])),
    ("ia3-a", {"guided_regex": "[A-Z][a-z]{1,4} [0-9]"}, StructuredOutput.regex("[A-Z][a-z]{1,4} [0-9]")),
    (DEFAULT_MODEL_NAME, {}, None),
]


def test_structured_outputs_in_one_batch_match_each_request_alone(app, adapter_root):
    """vLLM's guided_regex / guided_choice on completions and chat, with free text, at once; each answer equals
    its merged model alone under xgrammar's mask. OpenAI's response_format asks for JSON, which the embedded
    model's characters cannot spell (no '{'): that request alone gets a 400 saying so."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    messages = [{"role": "user", "content": "hello"}]

    async def complete(client, model, fields):
        reply = await client.completions.create(model=model, prompt="hello=", max_tokens=16, temperature=0,
                                                extra_body=fields)
        return reply.choices[0].text

    async def chat(client, model, fields):
        reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                     extra_body=fields)
        return reply.choices[0].message.content

    async def json_request(client):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="lora-r4", messages=messages, max_tokens=16,
                                                 response_format={"type": "json_object"})
        return info.value

    async def ask_all(client):
        return await asyncio.gather(*(complete(client, m, f) for m, f, _ in GUIDED),
                                    *(chat(client, m, f) for m, f, _ in GUIDED[:2]), json_request(client))

    *texts, refused = with_client(ask_all)
    prompts = [tokenizer("hello=")["input_ids"]] * len(GUIDED) + [
        tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]] * 2
    for (model, fields, spec), prompt, text in zip(GUIDED + GUIDED[:2], prompts, texts):
        reference = merged_model(adapter_root, None if model == DEFAULT_MODEL_NAME else model)
        expected = tokenizer.decode(grammar_greedy(reference, tokenizer, prompt, spec, 16), skip_special_tokens=True)
        assert text == expected, (model, fields)
        if spec is not None:
            assert expected != tokenizer.decode(grammar_greedy(reference, tokenizer, prompt, None, 16),
                                                skip_special_tokens=True), f"{fields} leave {model} unchanged"
        if spec is not None and spec.kind == "regex":
            assert re.fullmatch(fields["guided_regex"], text), text
    assert texts[1] in GUIDED[1][1]["guided_choice"]
    assert refused.status_code == 400 and "'{'" in refused.body["message"]


def test_chat_completions_use_the_chat_template(app):
    async def ask(client):
        chat = await client.chat.completions.create(model="flora-r4", messages=[{"role": "user", "content": "hello"}],
                                                    max_tokens=10, temperature=0)
        plain = await client.completions.create(model="flora-r4", prompt="hello=", max_tokens=10, temperature=0)
        return chat.choices[0].message.content, plain.choices[0].text

    chat, plain = with_client(ask)
    assert chat == plain  # the template renders the last user message followed by "="


def test_ray_serve_llm_model_ids_name_the_same_adapters(app):
    """Ray Serve LLM's multi-LoRA ids, "<base model>:<adapter>", reach the same adapters as their plain names."""
    async def ask(client):
        answers = []
        for model in ["lora-r8", f"{DEFAULT_MODEL_NAME}:lora-r8", "ia3-b", f"{DEFAULT_MODEL_NAME}:ia3-b"]:
            reply = await client.completions.create(model=model, prompt="hello=", max_tokens=8, temperature=0)
            answers.append(reply.choices[0].text)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model=f"{DEFAULT_MODEL_NAME}:no-such-adapter", prompt="x=", max_tokens=2)
        return answers, missing.value

    (lora, lora_id, ia3, ia3_id), missing = with_client(ask)
    assert lora == lora_id and ia3 == ia3_id and lora != ia3
    assert missing.body["param"] == "model"


def test_chat_content_as_text_parts_is_the_joined_text(app):
    """OpenAI's list form of content (what many clients send): text parts joined with newlines, as vLLM joins them."""
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]

    async def ask(client):
        one_part = await client.chat.completions.create(
            model="flora-r4", messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            max_tokens=10, temperature=0)
        as_string = await client.chat.completions.create(
            model="flora-r4", messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0)
        picture = [{"type": "text", "text": "what is this"},
                   {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
        with pytest.raises(openai.BadRequestError) as image:
            await client.chat.completions.create(model="flora-r4", max_tokens=2,
                                                 messages=[{"role": "user", "content": picture}])
        plain = await client.completions.create(model="flora-r4", prompt="hello=", max_tokens=10, temperature=0)
        return one_part.choices[0].message.content, as_string.choices[0].message.content, plain, image.value

    one_part, as_string, plain, image = with_client(ask)
    assert one_part == as_string == plain.choices[0].text  # the template renders the user's text followed by "="
    assert image.body["param"] == "messages" and "text only" in image.body["message"]
    told = [httpx.post(f"{app}/tokenize", json={"model": "flora-r4", "messages": [{"role": "user", "content": c}]},
                       timeout=30).json()["tokens"] for c in (parts, "hel\nlo", "hello")]
    assert told[0] == told[1] != told[2]


def test_prompt_logprobs_in_vllms_format_score_each_adapter(app, adapter_root):
    """vLLM's prompt_logprobs on completions (beside echo's logprobs) and chat, for several adapters in one batch:
    each prompt token's logprob, rank and top alternatives against the adapter merged into the weights."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tokenizer("serving=")["input_ids"]
    messages = [{"role": "user", "content": "flora"}]
    chat_ids = httpx.post(f"{app}/tokenize", json={"model": "lora-r8", "messages": messages}, timeout=30).json()

    async def score(client, model):
        completion = await client.completions.create(model=model, prompt="serving=", max_tokens=1, temperature=0,
                                                     echo=True, logprobs=1, extra_body={"prompt_logprobs": 3})
        chat = await client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0,
                                                    extra_body={"prompt_logprobs": 0})
        return completion, chat

    async def each(client):
        return await asyncio.gather(*(score(client, m) for m in SCORED))

    def check(scored: list, prompt: list[int], expected: torch.Tensor, k: int, model: str) -> None:
        assert len(scored) == len(prompt) and scored[0] is None
        for i, entry in enumerate(scored[1:], start=1):
            reference, token = expected[i - 1], prompt[i]
            best = reference.topk(k).indices.tolist()
            assert set(entry) == {str(t) for t in [token, *best]} and next(iter(entry)) == str(token), (model, i)
            own = entry[str(token)]
            assert own["logprob"] == pytest.approx(reference[token].item(), abs=1e-4), (model, i)
            at_least = 1 + int((reference > reference[token] + 1e-4).sum())  # ranks of near-ties may swap
            assert at_least <= own["rank"] <= int((reference >= reference[token] - 1e-4).sum()), (model, i)
            assert own["decoded_token"] == tokenizer.decode([token])
            for rank, alternative in enumerate(best, start=1):
                got = entry[str(alternative)]
                assert got["rank"] == rank and got["decoded_token"] == tokenizer.decode([alternative])
                assert got["logprob"] == pytest.approx(reference[alternative].item(), abs=1e-4)

    for model, (completion, chat) in zip(SCORED, with_client(each)):
        adapter = None if model == DEFAULT_MODEL_NAME else model
        choice = completion.choices[0]
        check(choice.prompt_logprobs, ids, merged_logprobs(adapter_root, adapter, ids), 3, model)
        assert all(top is None or len(top) == 1 for top in choice.logprobs.top_logprobs), "echo keeps logprobs=1"
        check(chat.prompt_logprobs, chat_ids["tokens"], merged_logprobs(adapter_root, adapter, chat_ids["tokens"]),
              0, model)
        assert chat.usage.prompt_tokens == chat_ids["count"]

    plain = httpx.post(f"{app}/v1/completions", json={"model": "lora-r8", "prompt": "x=", "max_tokens": 1},
                       timeout=60).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
    for route, body in [("completions", {"prompt": "x=", "stream": True}),
                        ("chat/completions", {"messages": messages, "stream": True}),
                        ("completions", {"prompt": "x=", "prompt_logprobs": 21})]:
        refused = httpx.post(f"{app}/v1/{route}", json={"model": "lora-r8", "prompt_logprobs": 2, **body}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs", refused.text


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(app):
    async def expect(client, error_type, **kwargs):
        with pytest.raises(error_type) as info:
            await client.completions.create(**{"model": "lora-r2", "prompt": "x=", **kwargs})
        return info.value

    async def scenario(client):
        missing = await expect(client, openai.NotFoundError, model="no-such-adapter")
        assert missing.status_code == 404 and missing.body["param"] == "model"
        bad_top_p = await expect(client, openai.BadRequestError, top_p=1.5)
        assert bad_top_p.body["param"] == "top_p"
        too_long = await expect(client, openai.BadRequestError, max_tokens=500)
        assert too_long.body["param"] == "max_tokens"
        no_echo = await expect(client, openai.BadRequestError, max_tokens=0)
        assert no_echo.body["param"] == "max_tokens" and "echo" in no_echo.body["message"]
        for penalty, value in [("frequency_penalty", 2.5), ("presence_penalty", -3), ("repetition_penalty", 0)]:
            bad_penalty = await expect(client, openai.BadRequestError, extra_body={penalty: value})
            assert bad_penalty.body["param"] == penalty
        for fields, param in [({"logit_bias": {"100000": 5}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                              ({"logit_bias": {"five": 1}}, "logit_bias"), ({"extra_body": {"min_p": 2}}, "min_p"),
                              ({"extra_body": {"min_tokens": 17}, "max_tokens": 16}, "min_tokens")]:
            bad = await expect(client, openai.BadRequestError, **fields)
            assert bad.body["param"] == param, fields
        for fields, param in [({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
                              ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, "guided_choice"),
                              ({"extra_body": {"response_format": {"type": "json_schema"}}}, "response_format")]:
            bad = await expect(client, openai.BadRequestError, **fields)
            assert bad.body["param"] == param, fields
        await expect(client, openai.BadRequestError, temperature=-1)
        await expect(client, openai.BadRequestError, prompt="")
        await expect(client, openai.BadRequestError, prompt=[10_000_000])
        reply = await client.completions.create(model="lora-r2", prompt="x=", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")

    with_client(scenario)
    malformed = httpx.post(f"{BASE_URL}/v1/completions", content="{not json", timeout=30,
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and set(malformed.json()["error"]) == {"message", "type", "param", "code"}
    unknown_field = httpx.post(f"{BASE_URL}/v1/completions", timeout=30,
                               json={"model": "lora-r2", "prompt": "x=", "max_tokenz": 3})
    assert unknown_field.status_code == 400 and "max_tokenz" in unknown_field.json()["error"]["message"]


def test_models_lists_base_and_adapters_with_kind_and_rank(app):
    cards = {c["id"]: c for c in httpx.get(f"{app}/v1/models", timeout=30).json()["data"]}
    assert cards[DEFAULT_MODEL_NAME]["parent"] is None
    for name, (kind, rank, _, _) in TEST_ADAPTERS.items():
        assert cards[name]["kind"] == kind.value and cards[name]["rank"] == rank
        assert cards[name]["parent"] == DEFAULT_MODEL_NAME


def test_adapters_load_and_unload_at_runtime(app, adapter_root):
    shutil.copytree(adapter_root / "lora-r8", adapter_root / "late-lora")
    body = {"model": "late-lora", "prompt": "hello=", "max_tokens": 6, "temperature": 0}
    assert httpx.post(f"{app}/v1/completions", json=body, timeout=30).status_code == 404
    assert httpx.post(f"{app}/v1/adapters/load", json={"name": "late-lora"}, timeout=30).status_code == 401
    escape = httpx.post(f"{app}/v1/adapters/load", json={"name": "../etc"}, headers=TOKEN, timeout=30)
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "name"
    loaded = httpx.post(f"{app}/v1/adapters/load", json={"name": "late-lora"}, headers=TOKEN, timeout=30)
    assert loaded.status_code == 200 and loaded.json()["loaded"]["kind"] == "lora"
    late = httpx.post(f"{app}/v1/completions", json=body, timeout=60)
    same = httpx.post(f"{app}/v1/completions", json={**body, "model": "lora-r8"}, timeout=60)
    assert late.status_code == 200 and late.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]
    assert httpx.post(f"{app}/v1/adapters/unload", json={"name": "late-lora"}, headers=TOKEN,
                      timeout=30).status_code == 200
    assert httpx.post(f"{app}/v1/completions", json=body, timeout=30).status_code == 404


def test_vllms_load_and_unload_lora_adapter_routes(app, adapter_root, tmp_path):
    """vLLM's dynamic LoRA routes, for folders under adapter_dir: a path out of it is refused, links included."""
    shutil.copytree(adapter_root / "lora-r4", adapter_root / "vllm-lora")
    shutil.copytree(adapter_root / "lora-r4", tmp_path / "outside")
    (adapter_root / "linked-out").symlink_to(tmp_path / "outside")
    body = {"model": "vllm-lora", "prompt": "hello=", "max_tokens": 6, "temperature": 0}

    def post(route, payload, headers=TOKEN):
        return httpx.post(f"{app}/v1/{route}", json=payload, headers=headers, timeout=60)

    absolute = {"lora_name": "vllm-lora", "lora_path": str(adapter_root / "vllm-lora")}
    assert post("load_lora_adapter", absolute, headers={}).status_code == 401
    for payload, param in [({"lora_name": "outside", "lora_path": str(tmp_path / "outside")}, "lora_path"),
                           ({"lora_name": "outside", "lora_path": "../outside"}, "lora_path"),
                           ({"lora_name": "linked-out", "lora_path": "linked-out"}, "lora_path"),
                           ({"lora_name": "no-such", "lora_path": "no-such"}, "lora_path"),
                           ({"lora_name": "renamed", "lora_path": "vllm-lora"}, "lora_name")]:
        refused = post("load_lora_adapter", payload)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (payload, refused.text)
        assert str(adapter_root) not in refused.text  # no server paths but the client's own
    assert post("completions", body).status_code == 404

    loaded = post("load_lora_adapter", absolute)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'vllm-lora' added successfully."
    served = post("completions", body)
    same = post("completions", {**body, "model": "lora-r4"})
    assert served.status_code == 200 and served.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]
    again = post("load_lora_adapter", absolute)
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    inplace = post("load_lora_adapter", {"lora_name": "vllm-lora", "lora_path": "vllm-lora", "load_inplace": True})
    assert inplace.status_code == 200

    unloaded = post("unload_lora_adapter", {"lora_name": "vllm-lora", "lora_int_id": 7})
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'vllm-lora' removed successfully."
    assert post("unload_lora_adapter", {"lora_name": "vllm-lora"}).status_code == 404
    assert post("completions", body).status_code == 404


def test_a_peft_dora_adapter_answers_as_peft_generates(app, adapter_root):
    """A DoRA adapter made by peft for the embedded model, loaded at runtime, against PEFT's own generate()."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(merged_model(adapter_root, None), LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    peft_model.save_pretrained(adapter_root / "peft-dora")
    loaded = httpx.post(f"{app}/v1/adapters/load", json={"name": "peft-dora"}, headers=TOKEN, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["loaded"]["kind"] == "lora"
    body = {"prompt": "hello=", "max_tokens": 12, "temperature": 0}
    served = httpx.post(f"{app}/v1/completions", json={**body, "model": "peft-dora"}, timeout=60).json()
    base = httpx.post(f"{app}/v1/completions", json={**body, "model": DEFAULT_MODEL_NAME}, timeout=60).json()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = torch.tensor([tokenizer("hello=")["input_ids"]])
    with torch.no_grad():
        out = peft_model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                         pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert served["choices"][0]["text"] == expected and expected != base["choices"][0]["text"]
    assert httpx.post(f"{app}/v1/adapters/unload", json={"name": "peft-dora"}, headers=TOKEN,
                      timeout=30).status_code == 200


def merged_greedy_text(adapter_root, recipe: dict, prompt: str, max_tokens: int) -> str:
    """The reference: the components merged by weight, merged into the model's weights, generate() alone."""
    from flora_core import load_adapter, merge_adapters
    from tests.reference import merge_adapter

    adapter = merge_adapters([load_adapter(adapter_root / name) for name in recipe["adapters"]], recipe["weights"])
    model = merge_adapter(merged_model(adapter_root, None), adapter)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_merged_adapters_are_served_in_mixed_batches(app, adapter_root):
    """One merge from the deploy config, one made at runtime; both in one batch with their components."""
    runtime = {"name": "mix-flora", "adapters": ["flora-r1", "flora-r2"], "weights": [2.0, -1.0]}
    assert httpx.post(f"{app}/v1/adapters/merge", json=runtime, timeout=30).status_code == 401
    made = httpx.post(f"{app}/v1/adapters/merge", json=runtime, headers=TOKEN, timeout=60)
    assert made.status_code == 200, made.text
    assert made.json()["merged"] | {"version": 0} == {"name": "mix-flora", "version": 0, "kind": "flora", "rank": 3,
                                                     "merged_from": [{"adapter": "flora-r1", "weight": 2.0},
                                                                     {"adapter": "flora-r2", "weight": -1.0}]}
    requests = [("mix-lora", "hello=", 12), ("lora-r2", "hello=", 12), ("mix-flora", "world=", 12),
                ("flora-r1", "world=", 12), ("mix-lora", "zebra=", 10), ("mix-flora", "abcde=", 10)]

    async def scenario(client):
        return await asyncio.gather(*(client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)
                                      for m, p, n in requests))

    replies = [r.choices[0].text for r in with_client(scenario)]
    recipes = {"mix-lora": CONFIG_MERGE, "mix-flora": runtime}
    for (model, prompt, max_tokens), text in zip(requests, replies):
        expected = (merged_greedy_text(adapter_root, recipes[model], prompt, max_tokens) if model in recipes
                    else engine_alone_texts(adapter_root, [(model, prompt, max_tokens)])[0])
        assert text == expected, (model, prompt)
    assert replies[0] != replies[1] and replies[2] != replies[3]  # each merge differs from its component
    listed = {e["name"]: e for e in httpx.get(f"{app}/v1/adapters", timeout=30).json()["data"]}
    assert listed["mix-lora"]["merged_from"][1] == {"adapter": "lora-r4", "weight": -0.5}
    assert listed["lora-r2"]["merged_from"] == []

    version = listed["mix-lora"]["version"]  # reloading a component re-merges under a new version
    assert httpx.post(f"{app}/v1/adapters/load", json={"name": "lora-r2"}, headers=TOKEN, timeout=60).status_code == 200
    listed = {e["name"]: e for e in httpx.get(f"{app}/v1/adapters", timeout=30).json()["data"]}
    assert listed["mix-lora"]["version"] == version + 1
    unloaded = httpx.post(f"{app}/v1/adapters/unload", json={"name": "flora-r1"}, headers=TOKEN, timeout=30)
    assert unloaded.json() == {"unloaded": "flora-r1", "merges_unloaded": ["mix-flora"]}
    gone = httpx.post(f"{app}/v1/completions", json={"model": "mix-flora", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert gone.status_code == 404
    reloaded = httpx.post(f"{app}/v1/adapters/load", json={"name": "flora-r1"}, headers=TOKEN, timeout=60)
    assert reloaded.status_code == 200


@pytest.mark.parametrize("body, param, message", [
    ({"name": "m", "adapters": ["lora-r2", "flora-r1"], "weights": [1, 1]}, "adapters", "mix kinds"),
    ({"name": "m", "adapters": ["lora-r8", "lora-r4"], "weights": [1, 1]}, "adapters", "raise lora_max_rank"),
    ({"name": "m", "adapters": ["nope"], "weights": [1]}, "adapters", "is not served; load it first"),
    ({"name": "m", "adapters": ["mix-lora"], "weights": [1]}, "adapters", "is itself a merge"),
    ({"name": "lora-r8", "adapters": ["lora-r2"], "weights": [1]}, "name", "already served"),
    ({"name": "../m", "adapters": ["lora-r2"], "weights": [1]}, "name", "is not valid"),
    ({"name": "m", "adapters": ["lora-r2", "lora-r4"], "weights": [1]}, None, "weights has 1 entries for 2"),
])
def test_bad_merges_get_400_naming_the_field(app, body, param, message):
    refused = httpx.post(f"{app}/v1/adapters/merge", json=body, headers=TOKEN, timeout=60)
    assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
    assert refused.json()["error"]["param"] == param
    assert httpx.post(f"{app}/v1/completions", json={"model": "mix-lora", "prompt": "hello=", "max_tokens": 3},
                      timeout=30).status_code == 200


def test_tokenize_and_detokenize_give_the_ids_requests_run_on(app):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    told = httpx.post(f"{app}/tokenize", json={"model": "lora-r8", "prompt": "hello=", "return_token_strs": True},
                      timeout=30).json()
    ids = tokenizer("hello=")["input_ids"]
    assert told == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                    "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    plain = httpx.post(f"{app}/tokenize", json={"model": DEFAULT_MODEL_NAME, "prompt": "hello=",
                                                "add_special_tokens": False}, timeout=30).json()
    assert plain["tokens"] == tokenizer("hello=", add_special_tokens=False)["input_ids"] != ids
    back = httpx.post(f"{app}/detokenize", json={"model": "flora-r2", "tokens": plain["tokens"]}, timeout=30).json()
    assert back == {"prompt": "hello="}

    messages = [{"role": "user", "content": "flora"}]
    chat_ids = httpx.post(f"{app}/tokenize", json={"model": "lora-r8", "messages": messages}, timeout=30).json()
    chat = httpx.post(f"{app}/v1/chat/completions", json={"model": "lora-r8", "messages": messages, "max_tokens": 2},
                      timeout=60).json()
    assert chat_ids["count"] == chat["usage"]["prompt_tokens"]
    assert chat_ids["tokens"] == list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=True)["input_ids"])

    for route, body, status, param in [
        ("tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("tokenize", {"model": "lora-r8", "prompt": "x", "messages": messages}, 400, None),
        ("tokenize", {"model": "lora-r8", "prompt": "x" * 10**6}, 400, "prompt"),
        ("detokenize", {"model": "lora-r8", "tokens": [5, 10**9]}, 400, "tokens"),
    ]:
        refused = httpx.post(f"{app}/{route}", json=body, timeout=30)
        assert refused.status_code == status and refused.json()["error"]["param"] == param, refused.text
    assert httpx.post(f"{app}/tokenize", json={"model": "lora-r8", "prompt": "ok"}, timeout=30).status_code == 200


def test_python_handle_api(app, adapter_root):
    handle = serve.get_app_handle("flora")
    reply = handle.generate.remote(GenerateRequest(adapter="flora-r2", prompt="abcde=", max_tokens=10)).result()
    assert reply.text == engine_alone_texts(adapter_root, [("flora-r2", "abcde=", 10)])[0]
    assert reply.usage.completion_tokens == len(reply.token_ids)
    with pytest.raises(Exception, match="does not exist"):
        handle.generate.remote(GenerateRequest(adapter="nope", prompt="abcde=")).result()
    chunks = list(handle.options(stream=True).generate_stream.remote(
        GenerateRequest(adapter="flora-r2", prompt="abcde=", max_tokens=10)))
    assert "".join(c.delta_text for c in chunks) == reply.text
    penalized = handle.generate.remote(GenerateRequest(adapter="lora-r8", prompt=[5, 5, 5, 9], max_tokens=12,
                                                       frequency_penalty=1.5, repetition_penalty=1.3)).result()
    eos = AutoTokenizer.from_pretrained(default_model_dir()).eos_token_id
    assert penalized.token_ids == penalized_greedy(merged_model(adapter_root, "lora-r8"), [5, 5, 5, 9], 12,
                                                   frequency=1.5, repetition=1.3, eos_token_id=eos)
    ended = handle.generate.remote(GenerateRequest(adapter="lora-r8", prompt="hello=", max_tokens=12, min_tokens=3,
                                                   logit_bias={eos: 100.0})).result()
    assert len(ended.token_ids) == 4 and ended.token_ids[3] == eos and eos not in ended.token_ids[:3]
    chosen = handle.generate.remote(GenerateRequest(adapter="lora-r8", prompt="hello=", max_tokens=8,
                                                    guided_choice=["yes", "no way"])).result()
    assert chosen.text in ("yes", "no way") and chosen.finish_reason == "stop"
    with pytest.raises(Exception, match="lacks a character"):
        handle.generate.remote(GenerateRequest(adapter="lora-r8", prompt="hello=", max_tokens=8,
                                               response_format={"type": "json_object"})).result()
    scored = handle.generate.remote(GenerateRequest(adapter="flora-r2", prompt=[5, 9, 17, 4], max_tokens=1,
                                                    prompt_logprobs=2)).result()
    expected = merged_logprobs(adapter_root, "flora-r2", [5, 9, 17, 4])
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == 4
    for i, entry in enumerate(scored.prompt_logprobs[1:]):
        assert entry["logprob"] == pytest.approx(expected[i, entry["token_id"]].item(), abs=1e-4)
        assert [t for t, _ in entry["top"]] == expected[i].topk(2).indices.tolist()


def test_overload_answers_503_with_retry_after_then_recovers(app):
    """The "small" app admits one request at a time: 16 simultaneous long requests overload it."""
    body = {"model": "lora-r1", "prompt": "hello=", "max_tokens": 50, "temperature": 0, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{app}/small/v1/completions", json=body) for _ in range(16)))

    replies = asyncio.run(burst())
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    for reply in replies:
        if reply.status_code == 503:
            assert int(reply.headers["retry-after"]) >= 1
            assert reply.json()["error"]["type"] == "server_overloaded"
    again = httpx.post(f"{app}/small/v1/completions", json={**body, "max_tokens": 3}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3
