"""The adapter catalog: which adapters the application serves, shared by every ingress replica.

At start it lists the adapter root (each subfolder one adapter, its name the folder's name,
reading only adapter_config.json). The management API loads more by name from under the same
root (fully validated: safetensors only, sizes bounded) and unloads them; every load bumps the
adapter's version, so replicas re-read the files instead of serving a stale copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from flora_core.adapter_config import read_adapter_config
from flora_core.adapter_io import load_adapter
from flora_core.adapter_root import AdapterRoot
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

    def __init__(self, adapter_dir: Optional[str], max_adapter_bytes: Optional[int], max_rank: int) -> None:
        self.root = AdapterRoot(adapter_dir) if adapter_dir else None
        self.max_adapter_bytes, self.max_rank = max_adapter_bytes, max_rank
        self._entries: dict[str, CatalogEntry] = {}
        self._generation = 0
        for name in self.root.list_names() if self.root else []:
            try:
                self._entries[name] = self._describe(name, version=1, validate=False)
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
        previous = self._entries.get(name)
        try:
            entry = self._describe(name, version=(previous.version + 1) if previous else 1, validate=True)
        except ValueError as error:
            return str(error)
        self._entries[name] = entry
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
            weights = load_adapter(directory, max_bytes=self.max_adapter_bytes, max_rank=self.max_rank)
            return CatalogEntry(name, version, weights.kind.value, weights.rank)
        config = read_adapter_config(directory)
        rank = config.r if config.r is not None else 1
        return CatalogEntry(name, version, config.kind.value, rank)
