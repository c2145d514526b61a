"""The shipped demo adapters: the README's Table 1 holds, one mixed batch equals one adapter at a
time, every adapter changes the base model's answer, and the training script trains what it says.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftConfig
from transformers import AutoTokenizer

from flora_core import AdapterKind, load_adapter
from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from flora_core.demo_adapters import DEMO_KINDS, KIND_LABELS, demo_adapter_names, demo_adapters_dir, load_demo_model
from flora_core.demo_eval import BASE, accuracy_table, decode_mixed, decode_one_at_a_time, eval_rows, greedy_decode
from flora_core.demo_tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
README_SECTION = "## Embedded default: flora-tiny-llama and its demo adapters"
EVAL_N, EVAL_SEED = 100, 1234  # the README table's held-out words; a 40-word slice of them is too
# noisy to check it (reverse-flora-r1 gets 17.5% on the first 40, 33% on all 100)
MARGIN = 0.03  # 3 of 100 answers, for float differences on other machines
PARITY_N = 40  # words per task also decoded one adapter at a time
BASE_FAILS_BELOW = 0.10  # sort: a few held-out words are already sorted
MAX_SHIPPED_BYTES = 8 * 1024 * 1024


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo_adapters", ROOT / "scripts" / "train_demo_adapters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_SECTION in text, f"README.md lacks the section {README_SECTION!r}"
    return text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]


def readme_table() -> dict[str, dict[str, float]]:
    """The first accuracy table of the README section: task -> column -> accuracy in [0, 1]."""
    header = ["task", "base", *(KIND_LABELS[k] for k in DEMO_KINDS)]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in readme_section().splitlines()]
    start = rows.index(header) + 2  # after the header and its |---| line
    table = {cells[0]: {c: float(v) / 100 for c, v in zip((BASE, *DEMO_KINDS), cells[1:])}
             for cells in rows[start : start + len(TASKS)]}
    assert list(table) == [t.name for t in TASKS], f"the README table's rows are {list(table)}"
    return table


@pytest.fixture(scope="module")
def served():
    torch.set_num_threads(1)
    return load_demo_model()


@pytest.fixture(scope="module")
def held_out(served):
    """The README's held-out words, every forward pass mixing all 16 adapters and base rows."""
    model, tok = served
    rows = eval_rows(EVAL_N, EVAL_SEED)
    return rows, decode_mixed(model, tok, rows)


def test_mixed_batch_reaches_the_readme_accuracies_and_the_base_fails(held_out):
    rows, mixed = held_out
    measured, claimed = accuracy_table(rows, mixed), readme_table()
    for task, columns in claimed.items():
        assert measured[task][BASE] < BASE_FAILS_BELOW, f"the base model solves {task}: {measured[task][BASE]:.2f}"
        for kind in DEMO_KINDS:
            got, want = measured[task][kind], columns[kind]
            assert got >= want - MARGIN, f"{task}-{kind}: {got:.2f} on {EVAL_N} held-out words, README says {want:.2f}"


def test_mixed_batch_predictions_equal_one_adapter_at_a_time(served, held_out):
    model, tok = served
    rows, mixed = held_out
    rows, mixed = rows[: PARITY_N * len(rows) // EVAL_N], mixed[: PARITY_N * len(rows) // EVAL_N]  # example-major
    assert {r.adapter for r in rows} == {None, *demo_adapter_names()}
    alone = decode_one_at_a_time(model, tok, rows)
    diff = [(r.adapter, r.prompt, m, a) for r, m, a in zip(rows, mixed, alone) if m != a]
    assert not diff, f"{len(diff)} of {len(rows)} predictions differ, e.g. {diff[:5]}"


def test_every_adapter_changes_the_base_answer(held_out):
    rows, mixed = held_out
    base = {(r.task, r.prompt): p for r, p in zip(rows, mixed) if r.adapter is None}
    changed = {r.adapter for r, p in zip(rows, mixed) if r.adapter and p != base[(r.task, r.prompt)]}
    assert changed == set(demo_adapter_names())


def test_readme_example_answers_are_the_models(served):
    """Each `| adapter | answer |` line of the README's example table is what greedy decoding gives."""
    model, tok = served
    prompt = re.search(r"same prompt `([^`]+)`", readme_section()).group(1)
    lines = re.findall(r"^\| `(base|[a-z0-9-]+)` \| `([^`]*)` \|$", readme_section(), flags=re.M)
    assert len(lines) == 1 + len(demo_adapter_names()), "the README's example table lists base and 16 adapters"
    adapters = [None if name == "base" else name for name, _ in lines]
    got = greedy_decode(model, tok, [prompt] * len(adapters), adapters)
    assert got == [answer for _, answer in lines]


def test_shipped_adapters_name_the_base_model_and_stay_small():
    total = 0
    for name in demo_adapter_names():
        directory = demo_adapters_dir() / name
        adapter = load_adapter(directory)
        assert adapter.config["base_model_name_or_path"] == DEFAULT_MODEL_NAME
        if adapter.kind is not AdapterKind.FLORA:  # PEFT reads its own formats
            assert PeftConfig.from_pretrained(directory).peft_type.value == adapter.kind.value.upper()
        total += sum(f.stat().st_size for f in directory.iterdir())
    assert total < MAX_SHIPPED_BYTES
    record = json.loads((demo_adapters_dir() / "training.json").read_text())
    assert "scripts/train_demo_adapters.py" in record["command"]


# --- the training script -----------------------------------------------------------------------

TRAINED = ["reverse-lora-r8", "uppercase-flora-r1", "caesar-flora-r4", "sort-ia3"]  # one of each kind


def slot_state(trainer) -> dict[str, torch.Tensor]:
    state = {f"base.{k}": v.detach().clone() for k, v in trainer.model.model.state_dict().items()}
    for name, layer in trainer.model.layers.items():
        for buffer in ["lora_a", "lora_b", "flora_in", "flora_out", "ia3_in", "ia3_out"]:
            for slot, tensor in enumerate(getattr(layer, buffer)):
                state[f"{name}.{buffer}.{slot}"] = tensor.detach().clone()
    return state


def test_training_script_lowers_own_losses_and_leaves_the_rest(tmp_path):
    script = _load_script()
    settings = script.DemoTrainingSettings(steps=8, rows_per_adapter=4, warmup_steps=1, log_every=100)
    trainer = script.build_trainer(settings, script.demo_specs(), default_model_dir())
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    probe = script.make_minibatch(random.Random(99), tok, TRAINED, 8)
    before_losses, before = script.adapter_losses(trainer, *probe), slot_state(trainer)
    script.train(trainer, tok, settings, names=TRAINED, log=lambda line: None)
    after_losses, after = script.adapter_losses(trainer, *probe), slot_state(trainer)
    for name in TRAINED:
        drop = f"{name}: {before_losses[name]:.3f} -> {after_losses[name]:.3f}"
        assert after_losses[name] < before_losses[name] - 0.1, drop
    own = {(trainer.slots[n].kind.value, trainer.slots[n].slot) for n in TRAINED}
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed, "training changed nothing"
    for key in changed:
        assert not key.startswith("base."), f"training changed the frozen base: {key}"
        buffer, slot = key.rsplit(".", 2)[1:]
        assert (buffer.split("_")[0], int(slot)) in own, f"{key} changed though no trained adapter uses it"
    script.save_adapters(trainer, tmp_path, names=TRAINED)
    assert {p.name for p in tmp_path.iterdir()} == set(TRAINED)
    for name in TRAINED:
        assert load_adapter(tmp_path / name).config["base_model_name_or_path"] == DEFAULT_MODEL_NAME
