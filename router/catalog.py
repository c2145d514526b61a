"""The adapter catalog: which adapters the application serves, shared by every ingress replica.

At start it lists the adapter root (each subfolder one adapter, its name the folder's name,
reading only adapter_config.json). The management API loads more by name from under the same
root (fully validated: safetensors only, sizes bounded, and checked against the replicas' slot
capacity and the base model's layer shapes) and unloads them; every load gives the adapter a
version it never had before (an unload does not reset it), so replicas re-read the files
instead of serving a stale copy. Versions restart at 1 when the catalog itself restarts, so each
entry also carries the catalog's incarnation (its start time): a replica that outlives the catalog
never mistakes a new start's `x@1` for the `x@1` it read before.

Serve runs a deployment's plain methods in a thread pool, so one lock orders them: two merges of a
name, or an unload beside a merge of that component, cannot interleave.

Merged adapters (flora_core.adapter_merge) are entries with a recipe: served adapter folders and
their weights. Each replica merges the components' files itself, when a request first names the
merge. Reloading a component re-merges (a new version) every merge built from it; unloading a
component unloads them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flora_core.adapter_config import read_adapter_config
from flora_core.adapter_io import load_adapter
from flora_core.adapter_merge import merge_adapters
from flora_core.adapter_pool import check_servable
from flora_core.adapter_root import NAME_PATTERN, AdapterRoot
from flora_core.adapter_weights import AdapterWeights
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.patching import ALL_LINEAR, target_layer_shapes
from router.messages import AdapterRef, Recipe

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: int
    kind: str  # "lora" | "flora" | "ia3"
    rank: int
    merged_from: Recipe = ()  # a merge: (component name, weight) pairs; () for an adapter folder
    incarnation: str = ""  # the catalog start that gave this version (AdapterRef.incarnation)

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.version, self.merged_from, self.incarnation)


@dataclass(frozen=True)
class CatalogSnapshot:
    generation: int  # bumped by every change
    entries: dict[str, CatalogEntry]
    incarnation: str = ""  # the catalog start it came from (AdapterRef.incarnation)

    @property
    def order(self) -> tuple[str, int]:
        """Sorts snapshots oldest first: a later catalog start after an earlier one, then by generation."""
        return self.incarnation, self.generation


def newest_snapshot(held: Optional[CatalogSnapshot], fetched: CatalogSnapshot) -> CatalogSnapshot:
    """The newer of the two: snapshot calls in flight together may answer out of order, and an older answer
    must not undo a newer one (an unload, or a load a management call just made)."""
    return fetched if held is None or fetched.order >= held.order else held


class AdapterCatalog:
    """A one-replica deployment; see the module docstring."""

    def __init__(self, adapter_dir: Optional[str], model_path: str, capacity: SlotCapacity,
                 max_adapter_bytes: Optional[int], merges: tuple[tuple[str, Recipe], ...] = (), *,
                 base_model_name: str) -> None:
        """base_model_name: the name requests use for no adapter, which no adapter may take (it would never
        be applied)."""
        self.root = AdapterRoot(adapter_dir) if adapter_dir else None
        self.base_model_name = base_model_name
        self.incarnation = f"{time.time_ns():016x}"  # a later start sorts after an earlier one
        self._lock = threading.Lock()  # Serve calls these methods from several threads at once
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
        for name, recipe in merges:  # from the deploy config: a merge that cannot be served stops the start
            refused = self.merge(name, recipe)
            if isinstance(refused, str):
                raise ValueError(f"merged_adapters: {refused}")
        self._generation = 1
        logger.info("adapter catalog: %d adapters under %s", len(self._entries), adapter_dir)

    def snapshot(self) -> CatalogSnapshot:
        with self._lock:
            return CatalogSnapshot(self._generation, dict(self._entries), self.incarnation)

    def load(self, name: str, path: Optional[str] = None) -> CatalogEntry | str:
        """Validate the folder `name` under the root fully and serve it (again, with a new version).

        path: the folder as vLLM's load_lora_adapter names it (absolute, or relative to the root); it must be
        the folder `name` directly under the root. Returns the new entry, or the reason it was refused (a
        message naming the fix).
        """
        with self._lock:
            return self._load_folder(name, path)

    def _load_folder(self, name: str, path: Optional[str]) -> CatalogEntry | str:
        if self.root is None:
            return "this application has no adapter_dir; set adapter_dir to load adapters by name"
        try:
            if path is not None and (folder := self.root.name_of(path)) != name:
                raise ValueError(f"lora_name {name!r} differs from the folder lora_path names, {folder!r}; adapters "
                                 "are served under their folder's name: pass that as lora_name")
            entry = self._describe(name, version=self._last_version.get(name, 0) + 1, validate=True)
        except ValueError as error:
            return self.root.relative(str(error))
        self._put(entry)
        for merge in [e for e in self._entries.values() if name in dict(e.merged_from)]:
            self._remerge(merge)
        return entry

    def served_at(self, path: str) -> CatalogEntry | str:
        """The served adapter in the folder at `path` (absolute, or relative to the root), as LoRAX's
        `adapter_source: "local"` names adapters; or the reason there is none, a message naming the fix
        that opens with "adapter_id"."""
        with self._lock:
            return self._served_at(path)

    def _served_at(self, path: str) -> CatalogEntry | str:
        if self.root is None:
            return "adapter_id names a local folder, but this application has no adapter_dir; set adapter_dir"
        try:
            name = self.root.name_of(path, field="adapter_id")
        except ValueError as error:
            return self.root.relative(str(error))
        entry = self._entries.get(name)
        if entry is None or entry.merged_from:  # a merge of that name is not this folder's adapter
            return (f"adapter_id {path!r}: the adapter folder {name!r} is not served; load it first "
                    "(POST /v1/adapters/load, with enable_adapter_management: true)")
        return entry

    def merge(self, name: str, recipe: Recipe) -> CatalogEntry | str:
        """Serve `name` as the weighted merge of served adapter folders (recipe: (name, weight) pairs).

        Returns the new entry, or the reason it was refused: a message naming the fix, whose first word
        is the field at fault ("name", "adapters", "weights"; merge_adapters' messages start so too).
        """
        with self._lock:
            return self._merge(name, recipe)

    def _merge(self, name: str, recipe: Recipe) -> CatalogEntry | str:
        if self.root is None:
            return "adapters cannot be merged: this application has no adapter_dir; set adapter_dir"
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None or ".." in name:
            return (f"name {name!r} is not valid: 1-128 characters of letters, digits, '.', '_' and '-', starting "
                    "with a letter or digit, no '..'")
        if name == self.base_model_name:
            return f"name {name!r} is the base model's name, which requests use for no adapter; choose another name"
        if name in self._entries:
            return f"name {name!r} is already served; unload it first or choose another name"
        try:
            entry = self._merged_entry(name, tuple(recipe), version=self._last_version.get(name, 0) + 1)
        except ValueError as error:
            return self.root.relative(str(error))
        self._put(entry)
        return entry

    def unload(self, name: str) -> list[str]:
        """Stop serving `name` and every merge built from it; the names removed, [] if it was not served."""
        with self._lock:
            return self._unload(name)

    def _unload(self, name: str) -> list[str]:
        if self._entries.pop(name, None) is None:
            return []
        merges = sorted(e.name for e in self._entries.values() if name in dict(e.merged_from))
        for merge in merges:
            del self._entries[merge]
        self._generation += 1
        return [name, *merges]

    def _put(self, entry: CatalogEntry) -> None:
        self._entries[entry.name] = entry
        self._last_version[entry.name] = entry.version
        self._generation += 1

    def _remerge(self, merge: CatalogEntry) -> None:
        """A component changed: merge again under a new version, or stop serving a merge that no longer fits."""
        try:
            self._put(self._merged_entry(merge.name, merge.merged_from, version=merge.version + 1))
        except ValueError as error:
            del self._entries[merge.name]
            self._generation += 1
            logger.warning("adapter catalog: unloaded the merge %r: %s", merge.name, self.root.relative(str(error)))

    def _merged_entry(self, name: str, recipe: Recipe, version: int) -> CatalogEntry:
        names = [component for component, _ in recipe]
        for i, component in enumerate(names):
            entry = self._entries.get(component)
            if entry is None:
                raise ValueError(f"adapters[{i}]={component!r} is not served; load it first, or add its folder under "
                                 "adapter_dir (GET /v1/adapters lists what is served)")
            if entry.merged_from:
                raise ValueError(f"adapters[{i}]={component!r} is itself a merge; merge its components instead")
            if names.index(component) != i:
                raise ValueError(f"adapters lists {component!r} twice; give it once, with the sum of its weights")
        components = [self._load(component) for component in names]
        merged = merge_adapters(components, [weight for _, weight in recipe])
        check_servable(name, merged, self.capacity, self.layer_shapes, self.max_adapter_bytes)
        return CatalogEntry(name, version, merged.kind.value, merged.rank, tuple(recipe), self.incarnation)

    def _load(self, name: str) -> AdapterWeights:
        return load_adapter(self.root.resolve(name), max_bytes=self.max_adapter_bytes,
                            max_rank=self.capacity.largest_rank)

    def _describe(self, name: str, version: int, validate: bool) -> CatalogEntry:
        if name == self.base_model_name:
            raise ValueError(f"the adapter folder {name!r} has the base model's name, which requests use for no "
                             "adapter, so it would never be applied; rename the folder (or set served_model_name)")
        directory = self.root.resolve(name)
        if validate:
            weights = self._load(name)
            check_servable(name, weights, self.capacity, self.layer_shapes, self.max_adapter_bytes)
            return CatalogEntry(name, version, weights.kind.value, weights.rank, incarnation=self.incarnation)
        config = read_adapter_config(directory)
        rank = config.r if config.r is not None else 1
        return CatalogEntry(name, version, config.kind.value, rank, incarnation=self.incarnation)


def _layer_shapes(model_path: str) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every layer the replicas adapt, from a weightless (meta-device) copy of the model."""
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return target_layer_shapes(model, ALL_LINEAR)
