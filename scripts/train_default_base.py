"""Pretrain the embedded demo base model (a tiny character-level Llama) from scratch on CPU.

The model learns to echo: `"<s>abcde="` -> `"abcde</s>"` on train-split words, plus copies of
mixed-case strings and a little free next-character modelling, so every output character is
trained. It then fails every demo task (reverse, uppercase, ...) while holding the attention /
copy machinery that adapters re-purpose. Held-out words (see `flora_core.demo_tasks`) are never
trained on and measure the copy accuracy.

Reproduce the shipped model (7 to 10 minutes on one CPU core of a shared 2-core machine):

    .venv/bin/python scripts/train_default_base.py --steps 1000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from flora_core.char_tokenizer import MODEL_MAX_LENGTH, build_char_tokenizer  # noqa: E402
from flora_core.default_model import TRAINING_RECORD, default_model_dir  # noqa: E402
from flora_core.demo_tasks import (  # noqa: E402
    COPY,
    MAX_WORD_LEN,
    TASKS,
    Task,
    exact_match_accuracy,
    is_held_out,
    make_examples,
    random_word,
)

IGNORE = -100  # label of a token the loss skips
MIXED_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits
FREE_TEXT_MAX_CHARS = 20  # keeps free text no longer than the longest copy example


@dataclass(frozen=True)
class BaseTrainingSettings:
    """How the base model is trained; the defaults build the shipped model."""

    steps: int = 1000
    seed: int = 0
    batch_size: int = 64
    peak_lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.05  # cosine decay ends at peak_lr * final_lr_ratio
    weight_decay: float = 0.01
    mixed_copy_share: float = 0.15  # copies of mixed-case strings with digits, length 1..10
    free_text_share: float = 0.10  # random words, loss on every character
    log_every: int = 100
    progress_words: int = 32  # held-out copy accuracy printed with each log line
    eval_words: int = 200  # held-out words for the final accuracies
    eval_seed: int = 1234


def tiny_llama_config(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    """The shape of the shipped model: about 2.9M parameters, 12 MB in fp32."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _train_word(rng: random.Random) -> str:
    while True:
        word = random_word(rng)
        if not is_held_out(word):
            return word


def _mixed_string(rng: random.Random, min_len: int, max_len: int) -> str:
    """Letters of both cases and digits; never a held-out demo word."""
    while True:
        length = rng.randint(min_len, max_len)
        text = "".join(rng.choice(MIXED_ALPHABET) for _ in range(length))
        if not is_held_out(text):
            return text


def sample_sequence(
    rng: random.Random, tok: PreTrainedTokenizerFast, settings: BaseTrainingSettings
) -> tuple[list[int], list[int]]:
    """One training sequence as (input ids, labels); labels are IGNORE on the prompt."""
    kind = rng.random()
    if kind < settings.free_text_share:
        words = [_mixed_string(rng, 1, 8) for _ in range(4)]
        text = " ".join(words)[: rng.randint(3, FREE_TEXT_MAX_CHARS)].strip()
        ids = tok.encode(text) + [tok.eos_token_id]
        return ids, [IGNORE] + ids[1:]
    if kind < settings.free_text_share + settings.mixed_copy_share:
        text = _mixed_string(rng, 1, MAX_WORD_LEN)
    else:
        text = _train_word(rng)
    prompt = tok.encode(f"{text}=")  # <s> text =
    answer = tok.encode(COPY.fn(text), add_special_tokens=False) + [tok.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def make_batch(
    rng: random.Random, tok: PreTrainedTokenizerFast, settings: BaseTrainingSettings
) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask and labels, each [batch, longest]."""
    rows = [sample_sequence(rng, tok, settings) for _ in range(settings.batch_size)]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_factor(step: int, settings: BaseTrainingSettings) -> float:
    """Linear warmup, then cosine decay from 1 to final_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.final_lr_ratio + (1 - settings.final_lr_ratio) * cosine


@torch.no_grad()
def greedy_complete(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, prompts: list[str], max_new_tokens: int = 16
) -> list[str]:
    """Greedy completions of `prompts` (left-padded batch), special tokens dropped."""
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def task_accuracy(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, task: Task, n: int, seed: int
) -> float:
    """Exact-match accuracy of greedy decoding on `n` held-out words of `task`."""
    prompts, targets = zip(*make_examples(task, n, seed, split="held_out"))
    return exact_match_accuracy(greedy_complete(model, tok, list(prompts)), list(targets))


def train(settings: BaseTrainingSettings) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Pretrain from scratch; returns the model, its tokenizer and the training record."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    tok = build_char_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(tok))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters, vocabulary {len(tok)}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.peak_lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings))
    model.train()
    start, window = time.perf_counter(), []
    for step in range(settings.steps):
        loss = model(**make_batch(rng, tok, settings)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            final_loss = sum(window) / len(window)
            model.eval()
            copy_acc = task_accuracy(model, tok, COPY, settings.progress_words, settings.eval_seed)
            model.train()
            print(
                f"step {step + 1}/{settings.steps}  loss {final_loss:.4f}  "
                f"held-out copy {copy_acc:.2f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"elapsed {time.perf_counter() - start:.0f}s",
                flush=True,
            )
            window = []
    train_seconds = time.perf_counter() - start
    model.eval()
    accuracies = {
        task.name: task_accuracy(model, tok, task, settings.eval_words, settings.eval_seed)
        for task in (COPY, *TASKS)
    }
    print(f"held-out exact match: {accuracies}", flush=True)
    record = {
        "settings": asdict(settings),
        "parameters": params,
        "final_loss": round(final_loss, 4),
        "held_out_accuracy": accuracies,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
    }
    return model, tok, record


def save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, record: dict, out: Path) -> None:
    """Write safetensors weights, config, tokenizer and the training record to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors, fp32
    tok.save_pretrained(out)
    # Name the class that transformers 4.x knows too (5.x saves its own alias of it).
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    defaults = BaseTrainingSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="torch and data seed")
    parser.add_argument("--out", type=Path, default=default_model_dir(), help="output directory")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is fastest on a small shared machine, where 2 threads ran 8x slower",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    settings = BaseTrainingSettings(steps=args.steps, seed=args.seed)
    model, tok, record = train(settings)
    record["command"] = (
        f"python scripts/train_default_base.py --steps {args.steps} --seed {args.seed} "
        f"--threads {args.threads}"
    )
    save(model, tok, record, args.out)
    print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
