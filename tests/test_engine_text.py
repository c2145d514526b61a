"""Text out of the engine: incremental detokenization of multi-byte characters (a byte-level BPE
trained here on emoji, CJK, Hangul, Cyrillic and accented text), stop strings and stop token ids,
and streamed text equal to the non-streamed text.
"""

from __future__ import annotations

import asyncio

import pytest

from flora_core.async_engine import AsyncEngine
from flora_core.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher, TextCodec
from flora_core.sampling_params import SamplingParams
from tests.engine_fixtures import (  # noqa: F401
    SENTENCES, byte_level_tokenizer, make_setup, metaspace_tokenizer, one_torch_thread, run_to_completion,
    tiny_llama_for,
)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def setup(tokenizer):
    return make_setup(base=tiny_llama_for(tokenizer))


def stream_text(codec: TextCodec, prompt_ids: list[int], ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(codec, prompt_ids)
    deltas = [detokenizer.add(token_id) for token_id in ids]
    return deltas + [detokenizer.flush()]


@pytest.mark.parametrize("sentence", SENTENCES)
def test_incremental_detokenization_never_splits_a_character(tokenizer, sentence):
    codec = TextCodec(tokenizer)
    ids = codec.encode(sentence)
    deltas = stream_text(codec, [], ids)
    assert "".join(deltas) == sentence
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    if any(ord(char) > 0x2000 for char in sentence):  # not vacuous: some character spans several tokens
        assert any(REPLACEMENT_CHAR in codec.decode([token_id]) for token_id in ids)


@pytest.mark.parametrize("build", [byte_level_tokenizer, metaspace_tokenizer])
def test_incremental_detokenization_after_a_prompt(build):
    """Text generated after a prompt is what decoding prompt + generation adds to the prompt's text,
    leading spaces included (a SentencePiece-style decode of the generated ids alone drops them)."""
    codec = TextCodec(build())
    space_lost_alone = 0
    for sentence in SENTENCES:
        ids = codec.encode(sentence)
        assert codec.decode(ids) == sentence
        for cut in range(1, len(ids)):
            prefix = codec.decode(ids[:cut])
            if REPLACEMENT_CHAR in prefix:
                continue  # the prompt itself ends inside a character
            assert "".join(stream_text(codec, ids[:cut], ids[cut:])) == sentence[len(prefix):]
            space_lost_alone += codec.decode(ids[cut:]) != sentence[len(prefix):]
    if build is metaspace_tokenizer:
        assert space_lost_alone > 0  # not vacuous: the prompt context is needed


def test_invalid_bytes_are_released_at_the_end(tokenizer):
    """A generation that ends inside a character gives what decode gives (U+FFFD), once, at the end."""
    codec = TextCodec(tokenizer)
    ids = codec.encode("ok 🚀")
    for end in range(1, len(ids) + 1):
        assert "".join(stream_text(codec, [], ids[:end])) == codec.decode(ids[:end])


def test_stop_string_matcher_across_pieces():
    matcher = StopStringMatcher(["o w", "STOP"])
    released = []
    for piece in ["he", "llo", " ", "wor", "ld"]:
        text, stop = matcher.feed(piece)
        released.append(text)
        if stop:
            break
    assert "".join(released) == "hell" and stop == "o w"
    assert released == ["", "he", "l", "l"]  # the last 3 characters (longest stop - 1) are held back
    quiet = StopStringMatcher(["STOP"])
    assert quiet.feed("abcdef") == ("abc", None) and quiet.finish() == "def"
    assert StopStringMatcher([]).feed("abc") == ("abc", None)


# ----- the engine -----


def generate_once(setup, tokenizer, prompt, params, adapter=None):
    engine = setup.engine(tokenizer=tokenizer)
    rid = engine.add_request(prompt, params, adapter)
    output = run_to_completion(engine)[rid]
    engine.close()
    return output


def test_engine_text_is_the_decoded_tokens(setup, tokenizer):
    output = generate_once(setup, tokenizer, "Emoji time: 🚀", SamplingParams(max_tokens=24, temperature=0), "lora-a")
    assert output.finish_reason == "length" and len(output.token_ids) == 24
    assert output.text == tokenizer.decode(list(output.token_ids), skip_special_tokens=True)
    assert output.usage.prompt_tokens == len(tokenizer.encode("Emoji time: 🚀"))
    assert output.usage.completion_tokens == 24


@pytest.mark.parametrize("prompt, adapter", [("The quick brown", "flora"), ("Adapters for", "lora-a"),
                                             ("東京は", "ia3")])
def test_stop_string_ends_generation_before_it(setup, tokenizer, prompt, adapter):
    """The stop string is a clean 3-character piece of the greedy text (a random tiny model mostly
    writes split characters); the rerun with it must end right before its first occurrence."""
    full = generate_once(setup, tokenizer, prompt, SamplingParams(max_tokens=40, temperature=0), adapter)
    text = full.text
    starts = [i for i in range(1, len(text) - 3)
              if text[i : i + 3].isprintable() and REPLACEMENT_CHAR not in text[i : i + 3]]
    assert starts, f"no clean 3-character stop string in {text!r}"
    stop = text[starts[0] : starts[0] + 3]
    params = SamplingParams(max_tokens=40, temperature=0, stop=["zzzz", stop])
    stopped = generate_once(setup, tokenizer, prompt, params, adapter)
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == text[: text.index(stop)]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) < 40


def test_stop_token_id_ends_generation(setup, tokenizer):
    greedy = SamplingParams(max_tokens=24, temperature=0)
    full = generate_once(setup, tokenizer, "Adapters for", greedy, "ia3")
    stop_id = full.token_ids[4]
    end = full.token_ids.index(stop_id) + 1
    stopped = generate_once(setup, tokenizer, "Adapters for",
                            SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]), "ia3")
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    assert stopped.token_ids == full.token_ids[:end]  # the stop token is kept in token_ids ...
    assert stopped.text == tokenizer.decode(list(full.token_ids[: end - 1]))  # ... and adds no text


def test_streamed_text_equals_final_text(setup, tokenizer):
    requests = [
        ("東京は", SamplingParams(max_tokens=20, temperature=0), None),
        ("Emoji time: 🚀", SamplingParams(max_tokens=16, temperature=0.9, seed=3), "lora-a"),
        ("Привет", SamplingParams(max_tokens=20, temperature=0, stop=[" ", "e"]), "lora-b"),
        ("naïve café", SamplingParams(max_tokens=12, temperature=0), "flora"),
    ]
    expected = [generate_once(setup, tokenizer, *request) for request in requests]

    async def consume(served, prompt, params, adapter):
        outputs = [output async for output in served.generate(prompt, params, adapter)]
        return outputs

    async def main():
        async with AsyncEngine(setup.engine(tokenizer=tokenizer, max_running=3)) as served:
            return await asyncio.gather(*(consume(served, *request) for request in requests))

    for outputs, final in zip(asyncio.run(main()), expected):
        assert "".join(o.delta_text for o in outputs) == outputs[-1].text == final.text
        assert tuple(t for o in outputs for t in o.delta_token_ids) == outputs[-1].token_ids == final.token_ids
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert outputs[-1].finish_reason == final.finish_reason
