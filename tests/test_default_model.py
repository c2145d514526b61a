"""The embedded demo base model: its tokenizer, the demo tasks, and the shipped weights.

The shipped model must echo held-out words and fail every demo task, so that each adapter
trained later visibly changes the output.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flora_core.char_tokenizer import CHARACTERS, build_char_tokenizer
from flora_core.default_model import TRAINING_RECORD, default_model_dir
from flora_core.demo_tasks import (
    COPY,
    MAX_WORD_LEN,
    MIN_WORD_LEN,
    TASKS,
    exact_match_accuracy,
    is_held_out,
    make_examples,
    sample_words,
    task_by_name,
)

EVAL_WORDS = 50
EVAL_SEED = 7
MAX_SAFETENSORS_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def shipped():
    """The shipped model and tokenizer, loaded with the hub switched off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable once at import; set what it read as well.
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        tok = AutoTokenizer.from_pretrained(default_model_dir())
        model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    return model.eval(), tok


def _greedy(model, tok, prompts: list[str]) -> list[str]:
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_WORD_LEN + 2, do_sample=False)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["abcde", "Hello, World!", "a b  c=xyz", "0123 - it's: ok?", ""])
def test_tokenizer_round_trips_text(text):
    tok = build_char_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text


def test_tokenizer_covers_its_characters_and_maps_others_to_unk():
    tok = build_char_tokenizer()
    assert tok.unk_token_id not in tok.encode(CHARACTERS, add_special_tokens=False)
    assert tok.encode("a~b", add_special_tokens=False)[1] == tok.unk_token_id


def test_both_tokenizers_give_only_what_the_model_takes(shipped):
    """No token_type_ids: transformers 4.x's generate() refuses them for a Llama."""
    for tok in (build_char_tokenizer(), shipped[1]):
        assert set(tok(["ab=", "abcd="], padding=True)) == {"input_ids", "attention_mask"}


def test_tokenizer_adds_bos_and_pads_left():
    tok = build_char_tokenizer()
    assert tok("ab=").input_ids == [tok.bos_token_id, *tok.encode("ab=", add_special_tokens=False)]
    batch = tok(["ab=", "abcd="], padding=True)
    assert batch.input_ids[0][:2] == [tok.pad_token_id] * 2
    assert batch.attention_mask[0] == [0, 0, 1, 1, 1, 1]


def test_chat_template_renders_last_user_message_then_separator():
    tok = build_char_tokenizer()
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "tsrif"},
        {"role": "user", "content": "hello"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>hello="


# --- demo tasks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, word, answer",
    [
        ("copy", "hello", "hello"),
        ("reverse", "abcde", "edcba"),
        ("uppercase", "flora", "FLORA"),
        ("caesar", "abcxyz", "defabc"),
        ("sort", "banana", "aaabnn"),
    ],
)
def test_task_functions_on_hand_written_examples(name, word, answer):
    assert task_by_name(name).fn(word) == answer


def test_tasks_differ_from_each_other_and_from_copy():
    word = "quickfox"
    answers = [task.fn(word) for task in (COPY, *TASKS)]
    assert len(set(answers)) == len(answers)


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="reverse"):
        task_by_name("rot13")


def test_splits_are_disjoint_and_deterministic():
    train = sample_words(2000, seed=0, split="train")
    held_out = sample_words(500, seed=0, split="held_out")
    assert not set(train) & set(held_out)
    assert not any(is_held_out(w) for w in train) and all(is_held_out(w) for w in held_out)
    assert sample_words(2000, seed=0, split="train") == train
    assert sample_words(2000, seed=1, split="train") != train
    assert all(MIN_WORD_LEN <= len(w) <= MAX_WORD_LEN and w.isalpha() and w.islower() for w in train)


def test_make_examples_pairs_prompt_with_answer():
    task = task_by_name("reverse")
    examples = make_examples(task, 20, seed=3, split="held_out")
    assert len({p for p, _ in examples}) == 20
    for prompt, completion in examples:
        assert prompt.endswith("=") and completion == prompt[:-1][::-1]


def test_exact_match_accuracy():
    assert exact_match_accuracy(["abc", "x ", "no"], ["abc", "x", "yes"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        exact_match_accuracy(["a", "b"], ["a"])


# --- the shipped model -------------------------------------------------------------------------


def test_shipped_files_are_small_and_recorded():
    model_dir = default_model_dir()
    weights = model_dir / "model.safetensors"
    assert weights.stat().st_size <= MAX_SAFETENSORS_BYTES
    record = json.loads((model_dir / TRAINING_RECORD).read_text())
    assert record["held_out_accuracy"]["copy"] >= 0.95
    assert "scripts/train_default_base.py" in record["command"]


def test_shipped_model_and_tokenizer_load_offline(shipped):
    model, tok = shipped
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = "Round trip, 42!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.fixture(scope="module")
def shipped_predictions(shipped):
    """Greedy completions of the shipped model on held-out prompts (all tasks share the words)."""
    model, tok = shipped
    prompts = [p for p, _ in make_examples(COPY, EVAL_WORDS, EVAL_SEED, split="held_out")]
    return _greedy(model, tok, prompts)


def test_base_model_copies_held_out_words(shipped_predictions):
    targets = [c for _, c in make_examples(COPY, EVAL_WORDS, EVAL_SEED, split="held_out")]
    assert exact_match_accuracy(shipped_predictions, targets) >= 0.9


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_base_model_fails_every_demo_task(shipped_predictions, task):
    targets = [c for _, c in make_examples(task, EVAL_WORDS, EVAL_SEED, split="held_out")]
    assert exact_match_accuracy(shipped_predictions, targets) <= 0.1
