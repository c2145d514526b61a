"""Where the embedded demo base model lives: a tiny Llama shipped inside the package.

The model is a character-level "echo" model: for every prompt `"<word>="` it answers `"<word>"`,
so it fails each demo task until an adapter re-purposes it (see `flora_core.demo_tasks`).
`scripts/train_default_base.py` rebuilds it from scratch on CPU; the command, seed and results
of the shipped build are in `training.json` next to the weights.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "flora-tiny-llama"
TRAINING_RECORD = "training.json"  # written by scripts/train_default_base.py


def default_model_dir() -> Path:
    """The directory `from_pretrained` loads the embedded model and tokenizer from."""
    return Path(__file__).resolve().parent / "assets" / DEFAULT_MODEL_NAME
