"""The demo adapters shipped with the embedded model: one per demo task and adapter kind.

Each of the four tasks in `flora_core.demo_tasks.TASKS` has four adapters, named
`<task>-<kind>` with kind one of `DEMO_KINDS` (`reverse-flora-r1`, `reverse-flora-r4`,
`reverse-ia3`, `reverse-lora-r8`, ...): 16 adapters, all trained together by
`scripts/train_demo_adapters.py` and stored under `<model dir>/adapters/<name>/` (PEFT's format
for LoRA and IA3, ours for FLoRA). `load_demo_model` serves all of them from one pool.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flora_core.default_model import default_model_dir
from flora_core.demo_tasks import TASKS
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.multi_adapter_model import MultiAdapterModel

ADAPTERS_SUBDIR = "adapters"
DEMO_KINDS = ("flora-r1", "flora-r4", "ia3", "lora-r8")  # Table 1's column order
KIND_LABELS = {"flora-r1": "FLoRA r1", "flora-r4": "FLoRA r4", "ia3": "IA3", "lora-r8": "LoRA r8"}
# Room for every demo adapter at once: 8 FLoRA (ranks 1 and 4), 4 LoRA (rank 8), 4 IA3.
DEMO_CAPACITY = SlotCapacity(lora_slots=4, lora_max_rank=8, flora_slots=8, flora_max_rank=4, ia3_slots=4)


def demo_adapters_dir() -> Path:
    """Where the shipped demo adapters live: `adapters/` inside the embedded model's directory."""
    return default_model_dir() / ADAPTERS_SUBDIR


def demo_adapter_name(task: str, kind: str) -> str:
    """The adapter trained for `task` with adapter kind `kind`, e.g. `reverse-flora-r1`."""
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo adapter kind {kind!r}; choose one of {', '.join(DEMO_KINDS)}")
    return f"{task}-{kind}"


def demo_adapter_names() -> list[str]:
    """All 16 demo adapters, task-major: every kind of the first task, then of the next."""
    return [demo_adapter_name(task.name, kind) for task in TASKS for kind in DEMO_KINDS]


def load_demo_model(
    adapters_dir: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None
) -> tuple[MultiAdapterModel, PreTrainedTokenizerBase]:
    """The embedded model with every demo adapter registered, and its tokenizer.

    adapters_dir defaults to `demo_adapters_dir()`, model_dir to `default_model_dir()`.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    adapters_dir = Path(adapters_dir) if adapters_dir is not None else demo_adapters_dir()
    missing = [name for name in demo_adapter_names() if not (adapters_dir / name).is_dir()]
    if missing:
        raise ValueError(
            f"{adapters_dir} lacks the demo adapters {missing}; "
            "train them with `python scripts/train_demo_adapters.py --out <dir>`"
        )
    model = MultiAdapterModel.from_pretrained(model_dir, capacity=DEMO_CAPACITY)
    for name in demo_adapter_names():
        model.add_adapter(name, adapters_dir / name)
    return model, AutoTokenizer.from_pretrained(model_dir)
