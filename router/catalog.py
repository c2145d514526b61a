"""The adapter catalog: which adapters the application serves, shared by every ingress replica.

At start it lists the adapter root (each subfolder one adapter, its name the folder's name,
reading only adapter_config.json). The management API loads more by name from under the same
root (fully validated: safetensors only, sizes bounded, and checked against the replicas' slot
capacity and the base model's layer shapes) and unloads them; every load gives the adapter a
version it never had before (an unload does not reset it), so replicas re-read the files
instead of serving a stale copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flora_core.adapter_config import read_adapter_config
from flora_core.adapter_io import load_adapter
from flora_core.adapter_pool import check_servable
from flora_core.adapter_root import AdapterRoot
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.patching import ALL_LINEAR, target_layer_shapes
from router.messages import AdapterRef

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: int
    kind: str  # "lora" | "flora" | "ia3"
    rank: int

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.version)


@dataclass(frozen=True)
class CatalogSnapshot:
    generation: int  # bumped by every change
    entries: dict[str, CatalogEntry]


class AdapterCatalog:
    """A one-replica deployment; see the module docstring."""

    def __init__(self, adapter_dir: Optional[str], model_path: str, capacity: SlotCapacity,
                 max_adapter_bytes: Optional[int]) -> None:
        self.root = AdapterRoot(adapter_dir) if adapter_dir else None
        self.capacity, self.max_adapter_bytes = capacity, max_adapter_bytes
        self.layer_shapes = _layer_shapes(model_path)
        self._entries: dict[str, CatalogEntry] = {}
        self._last_version: dict[str, int] = {}  # kept after an unload: a reload never reuses a version
        self._generation = 0
        for name in self.root.list_names() if self.root else []:
            try:
                self._entries[name] = self._describe(name, version=1, validate=False)
                self._last_version[name] = 1
            except ValueError as error:
                logger.warning("adapter catalog: skipping %r: %s", name, error)
        self._generation = 1
        logger.info("adapter catalog: %d adapters under %s", len(self._entries), adapter_dir)

    def snapshot(self) -> CatalogSnapshot:
        return CatalogSnapshot(self._generation, dict(self._entries))

    def load(self, name: str) -> CatalogEntry | str:
        """Validate the folder `name` under the root fully and serve it (again, with a new version).

        Returns the new entry, or the reason it was refused (a message naming the fix).
        """
        if self.root is None:
            return "this application has no adapter_dir; set adapter_dir to load adapters by name"
        try:
            entry = self._describe(name, version=self._last_version.get(name, 0) + 1, validate=True)
        except ValueError as error:
            return self.root.relative(str(error))
        self._entries[name] = entry
        self._last_version[name] = entry.version
        self._generation += 1
        return entry

    def unload(self, name: str) -> bool:
        removed = self._entries.pop(name, None) is not None
        if removed:
            self._generation += 1
        return removed

    def _describe(self, name: str, version: int, validate: bool) -> CatalogEntry:
        directory = self.root.resolve(name)
        if validate:
            max_rank = max(self.capacity.lora_max_rank, self.capacity.flora_max_rank)
            weights = load_adapter(directory, max_bytes=self.max_adapter_bytes, max_rank=max_rank)
            check_servable(name, weights, self.capacity, self.layer_shapes, self.max_adapter_bytes)
            return CatalogEntry(name, version, weights.kind.value, weights.rank)
        config = read_adapter_config(directory)
        rank = config.r if config.r is not None else 1
        return CatalogEntry(name, version, config.kind.value, rank)


def _layer_shapes(model_path: str) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every layer the replicas adapt, from a weightless (meta-device) copy of the model."""
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return target_layer_shapes(model, ALL_LINEAR)
