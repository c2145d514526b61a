"""A real local Ray cluster running the app on the embedded default model with test adapters.

The adapters are random (so they visibly change greedy outputs) and saved as real adapter
directories under a temporary adapter root; the reference for every answer is the engine run
in this process, one request alone, and for log probabilities the adapter merged into the
model's weights, run alone.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import torch

from flora_core import AdapterKind, MultiAdapterModel, SlotCapacity, save_adapter
from flora_core.async_engine import AsyncEngine
from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from flora_core.engine import Engine, EngineConfig
from flora_core.patching import find_target_layers
from flora_core.sampling_params import SamplingParams
from tests.factories import random_adapter

MAX_MODEL_LEN = 64
TEST_ADAPTERS = {  # name -> (kind, rank, seed, strength)
    "lora-r8": (AdapterKind.LORA, 8, 1, 0.3),
    "lora-r2": (AdapterKind.LORA, 2, 2, 0.3),
    "lora-r1": (AdapterKind.LORA, 1, 3, 0.4),
    "flora-r1": (AdapterKind.FLORA, 1, 4, 0.3),
    "flora-r4": (AdapterKind.FLORA, 4, 5, 0.2),
    "flora-r2": (AdapterKind.FLORA, 2, 6, 0.3),
    "ia3-a": (AdapterKind.IA3, 1, 7, 0.5),
    "ia3-b": (AdapterKind.IA3, 1, 8, 0.5),
    "lora-r4": (AdapterKind.LORA, 4, 9, 0.3),
}
PROMPTS = ["hello=", "world=", "abcde=", "serving=", "zebra=", "flora="]


def linear_shapes() -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir())
    names = find_target_layers(model, "all-linear")
    return {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}


def write_test_adapters(root: Path, names=None) -> None:
    shapes = linear_shapes()
    for name, (kind, rank, seed, strength) in TEST_ADAPTERS.items():
        if names is None or name in names:
            save_adapter(random_adapter(kind, shapes, rank=rank, seed=seed, strength=strength), root / name)


def app_args(adapter_root: Path, **overrides) -> dict:
    return {"model": DEFAULT_MODEL_NAME, "adapter_dir": str(adapter_root), "max_model_len": MAX_MODEL_LEN,
            "lora_slots": 8, "flora_slots": 4, "ia3_slots": 2, "lora_max_rank": 8, "flora_max_rank": 4,
            "enable_adapter_management": True, "management_token": "test-token", **overrides}


def make_catalog(adapter_root: Path, merges=()):
    """The AdapterCatalog that app_args' application starts (a new start each call), outside Ray."""
    from deploy.app import AppArgs, resolve
    from router.catalog import AdapterCatalog

    replica, _ = resolve(AppArgs.model_validate(app_args(adapter_root)))
    return AdapterCatalog(str(adapter_root), replica.model_path, replica.capacity(), None, merges,
                          base_model_name=replica.served_model_name)


@functools.cache
def _embedded_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir()).eval()


def merged_model(adapter_root: Path, adapter: str | None):
    """The embedded model with the adapter merged into its weights (None: the base model): the per-row reference."""
    from flora_core import load_adapter
    from tests.reference import merge_adapter

    return merge_adapter(_embedded_base(), None if adapter is None else load_adapter(adapter_root / adapter))


@torch.no_grad()
def merged_logprobs(adapter_root: Path, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """[L, V]: row i is the log distribution after ids[:i + 1], with the adapter merged into the weights."""
    model = merged_model(adapter_root, adapter)
    return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def engine_alone_texts(adapter_root: Path, requests: list[tuple[str | None, str, int]]) -> list[str]:
    """Greedy text of each (adapter, prompt, max_tokens), each run alone through an in-process engine."""
    from transformers import AutoTokenizer

    model = MultiAdapterModel.from_pretrained(default_model_dir(), capacity=SlotCapacity(
        lora_slots=8, lora_max_rank=8, flora_slots=4, flora_max_rank=4, ia3_slots=2))
    for name in sorted({adapter for adapter, _, _ in requests if adapter is not None}):
        model.add_adapter(name, adapter_root / name)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())

    async def run_all() -> list[str]:
        async with AsyncEngine(Engine(model, EngineConfig(max_model_len=MAX_MODEL_LEN), tokenizer)) as engine:
            texts = []
            for adapter, prompt, max_tokens in requests:
                ids = tokenizer(prompt)["input_ids"]
                last = None
                async for output in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                                    adapter=adapter):
                    last = output
                texts.append(last.text)
            return texts

    with torch.no_grad():
        return asyncio.run(run_all())
