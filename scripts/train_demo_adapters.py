"""Train the 16 demo adapters of the embedded model together: 4 tasks x (FLoRA r1, FLoRA r4, LoRA r8, IA3).

One `MultiAdapterTrainer` holds all 16 adapters, and every minibatch mixes rows of all of them
(shuffled), each row training only its own adapter while the base model stays frozen: batched
multi-adapter training. A row is `"<s>word=" + answer + "</s>"` with the loss on the answer and
its eos only. Words come from the train split of `flora_core.demo_tasks` (held-out words are never
trained on). Adapters are saved as `<out>/<task>-<kind>/` (PEFT format for LoRA / IA3, ours for
FLoRA), with `training.json` beside them.

Reproduce the shipped adapters (10 to 13 minutes on one CPU core of a shared 2-core machine):

    .venv/bin/python scripts/train_demo_adapters.py --steps 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from flora_core.adapter_config import FLORA_FORMAT_VERSION  # noqa: E402
from flora_core.adapter_io import save_adapter  # noqa: E402
from flora_core.adapter_weights import AdapterKind, AdapterWeights  # noqa: E402
from flora_core.default_model import DEFAULT_MODEL_NAME, TRAINING_RECORD, default_model_dir  # noqa: E402
from flora_core.demo_adapters import DEMO_CAPACITY, DEMO_KINDS, demo_adapter_name, demo_adapters_dir  # noqa: E402
from flora_core.demo_eval import decode_mixed, eval_rows  # noqa: E402
from flora_core.demo_tasks import TASKS, Task, exact_match_accuracy, is_held_out, random_word  # noqa: E402
from flora_core.multi_adapter_model import MultiAdapterModel  # noqa: E402
from flora_core.training import AdapterSpec, MultiAdapterTrainer  # noqa: E402

IGNORE = -100  # label of a token the loss skips
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KIND_SPECS = {
    "flora-r1": AdapterSpec(AdapterKind.FLORA, rank=1, target_modules=ALL_LINEAR),
    "flora-r4": AdapterSpec(AdapterKind.FLORA, rank=4, target_modules=ALL_LINEAR),
    "lora-r8": AdapterSpec(AdapterKind.LORA, rank=8, lora_alpha=16.0, target_modules=ALL_LINEAR),
    "ia3": AdapterSpec(AdapterKind.IA3, target_modules=ALL_LINEAR, feedforward_modules=("down_proj",)),
}
assert set(KIND_SPECS) == set(DEMO_KINDS)


@dataclass(frozen=True)
class DemoTrainingSettings:
    """How the demo adapters are trained; the defaults build the shipped ones."""

    steps: int = 2000
    seed: int = 0
    rows_per_adapter: int = 1  # rows of EACH adapter in every minibatch (16 adapters: 16 rows)
    lr_lora: float = 2e-3
    lr_flora: float = 1.5e-2
    lr_ia3: float = 6e-2
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decay ends at lr * final_lr_ratio
    log_every: int = 100
    probe_rows: int = 16  # fixed train-split rows per adapter whose loss each log line shows
    eval_words: int = 50  # held-out words per task for the accuracies in training.json
    eval_seed: int = 1234


def demo_specs(tasks: Sequence[Task] = TASKS, kinds: Sequence[str] = DEMO_KINDS) -> dict[str, AdapterSpec]:
    """The adapters to train, `<task>-<kind>` -> its spec."""
    return {demo_adapter_name(task.name, kind): KIND_SPECS[kind] for task in tasks for kind in kinds}


def task_of(name: str) -> Task:
    """The task a demo adapter is trained on, read from its name."""
    return next(task for task in TASKS if name.startswith(f"{task.name}-"))


def train_word(rng: random.Random) -> str:
    while True:
        word = random_word(rng)
        if not is_held_out(word):
            return word


def encode_example(tok: PreTrainedTokenizerBase, word: str, task: Task) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one row: labels are IGNORE on the prompt, the answer and eos after it."""
    prompt = tok.encode(f"{word}=")  # <s> word =
    answer = tok.encode(task.fn(word), add_special_tokens=False) + [tok.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def make_minibatch(
    rng: random.Random, tok: PreTrainedTokenizerBase, names: Sequence[str], rows_per_adapter: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A right-padded minibatch mixing `rows_per_adapter` rows of each adapter in random order.

    Returns the model inputs (input_ids, attention_mask, labels, each [rows, longest]) and the
    adapter of each row.
    """
    row_names = [name for name in names for _ in range(rows_per_adapter)]
    rng.shuffle(row_names)
    rows = [encode_example(tok, train_word(rng), task_of(name)) for name in row_names]
    width = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, : len(labels)] = torch.tensor(labels)
    return batch, row_names


@torch.no_grad()
def adapter_losses(
    trainer: MultiAdapterTrainer, batch: dict[str, torch.Tensor], row_names: Sequence[str]
) -> dict[str, float]:
    """Mean answer-token loss of each adapter over its rows of `batch` (one mixed forward pass)."""
    logits = trainer.model(batch["input_ids"], row_names, attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )  # [rows, seq - 1]
    counted = (labels != IGNORE).float()
    losses = {}
    for name in dict.fromkeys(row_names):
        rows = torch.tensor([n == name for n in row_names])
        losses[name] = (token_loss[rows].sum() / counted[rows].sum()).item()
    return losses


def lr_factor(step: int, settings: DemoTrainingSettings) -> float:
    """Linear warmup, then cosine decay from 1 to final_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.final_lr_ratio + (1 - settings.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_trainer(
    settings: DemoTrainingSettings, specs: dict[str, AdapterSpec], model_dir: Path
) -> MultiAdapterTrainer:
    """The frozen embedded model with fresh adapters for `specs`, in one trainer, one lr per kind."""
    model = MultiAdapterModel.from_pretrained(model_dir, capacity=DEMO_CAPACITY)
    lrs = {AdapterKind.LORA: settings.lr_lora, AdapterKind.FLORA: settings.lr_flora, AdapterKind.IA3: settings.lr_ia3}
    return MultiAdapterTrainer(model, specs, lr=lrs, seed=settings.seed)  # LoRA wants ~10x less than FLoRA


def train(
    trainer: MultiAdapterTrainer,
    tok: PreTrainedTokenizerBase,
    settings: DemoTrainingSettings,
    names: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """`settings.steps` mixed steps over the adapters `names` (default: all of the trainer's).

    Returns each adapter's loss on its probe rows (fixed train-split examples) after training.
    """
    names = list(trainer.specs if names is None else names)
    rng = random.Random(settings.seed)
    probe = make_minibatch(random.Random(settings.seed + 1), tok, names, settings.probe_rows)
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: lr_factor(s, settings))
    start, window = time.perf_counter(), []
    for step in range(settings.steps):
        batch, row_names = make_minibatch(rng, tok, names, settings.rows_per_adapter)
        window.append(trainer.step(batch["input_ids"], batch["labels"], row_names, batch["attention_mask"]))
        scheduler.step()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            losses = adapter_losses(trainer, *probe)
            log(f"step {step + 1}/{settings.steps}  batch loss {sum(window) / len(window):.4f}  "
                f"lr x{lr_factor(step, settings):.3f}  elapsed {time.perf_counter() - start:.0f}s")
            log("  " + "  ".join(f"{name} {loss:.3f}" for name, loss in losses.items()))
            window = []
    return adapter_losses(trainer, *probe)


def adapter_config(spec: AdapterSpec) -> dict[str, object]:
    """adapter_config.json for an adapter trained from `spec`, naming the embedded base model."""
    common = {"target_modules": list(spec.target_modules), "base_model_name_or_path": DEFAULT_MODEL_NAME}
    if spec.kind is AdapterKind.FLORA:
        return {**common, "peft_type": "FLORA", "r": spec.rank, "flora_format_version": FLORA_FORMAT_VERSION}
    peft = {**common, "task_type": "CAUSAL_LM", "fan_in_fan_out": False}
    if spec.kind is AdapterKind.IA3:
        feedforward = [m for m in spec.feedforward_modules if m in spec.target_modules]
        return {**peft, "peft_type": "IA3", "feedforward_modules": feedforward}
    return {**peft, "peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.lora_scale * spec.rank,
            "use_rslora": False, "bias": "none"}


def save_adapters(trainer: MultiAdapterTrainer, out: Path, names: Sequence[str] | None = None) -> None:
    """Write each adapter to `out/<name>/` with a config naming the base model."""
    for name in trainer.specs if names is None else names:
        weights = trainer.export(name)
        save_adapter(AdapterWeights(kind=weights.kind, modules=weights.modules,
                                    config=adapter_config(trainer.specs[name])), out / name)


def held_out_accuracy(model: MultiAdapterModel, tok: PreTrainedTokenizerBase, settings: DemoTrainingSettings) -> dict:
    """Held-out exact match of every adapter and the base, decoded in one mixed batch."""
    rows = eval_rows(settings.eval_words, settings.eval_seed)
    predictions = decode_mixed(model, tok, rows)
    accuracies: dict[str, float] = {}
    for key in dict.fromkeys(r.adapter or f"{r.task}-base" for r in rows):
        picked = [(p, r.target) for r, p in zip(rows, predictions) if (r.adapter or f"{r.task}-base") == key]
        accuracies[key] = exact_match_accuracy([p for p, _ in picked], [t for _, t in picked])
    return accuracies


def main(argv: list[str] | None = None) -> None:
    defaults = DemoTrainingSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="adapter init and data seed")
    parser.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between progress lines")
    parser.add_argument("--out", type=Path, default=demo_adapters_dir(), help="output directory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest on a small shared machine")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        parser.error(f"--steps and --log-every must be >= 1, got {args.steps} and {args.log_every}")
    torch.set_num_threads(args.threads)
    settings = DemoTrainingSettings(steps=args.steps, seed=args.seed, log_every=args.log_every)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    trainer = build_trainer(settings, demo_specs(), default_model_dir())
    print(f"training {len(trainer.specs)} adapters together: {', '.join(trainer.specs)}", flush=True)
    start = time.perf_counter()
    final = train(trainer, tok, settings, log=lambda line: print(line, flush=True))
    train_seconds = time.perf_counter() - start
    accuracies = held_out_accuracy(trainer.model, tok, settings)
    print(f"held-out exact match ({settings.eval_words} words per task): {accuracies}", flush=True)
    save_adapters(trainer, args.out)
    record = {
        "command": f"python scripts/train_demo_adapters.py --steps {args.steps} --seed {args.seed} "
                   f"--threads {args.threads}",
        "settings": asdict(settings),
        "adapters": {name: {"kind": spec.kind.value, "rank": spec.rank, "target_modules": list(spec.target_modules)}
                     for name, spec in trainer.specs.items()},
        "train_seconds": round(train_seconds, 1),
        "final_probe_loss": {name: round(loss, 4) for name, loss in final.items()},
        "held_out_accuracy": accuracies,
        "torch": torch.__version__,
    }
    (args.out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {len(trainer.specs)} adapters and {TRAINING_RECORD} to {args.out}", flush=True)


if __name__ == "__main__":
    main()
