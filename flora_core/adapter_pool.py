"""Which adapters live in the device slots of every wrapped layer.

Three tiers: a host registry of every known adapter (name -> a directory on disk, a weighted
merge of directories, or weights given in memory), an LRU host cache of weights read from disk
(disk stays the source of truth, so a dropped copy is read, or merged, again), and per kind the
device slots of the `MultiAdapterLinear` layers, evicted least recently used (released) first.
An adapter is resident in one slot of its kind, at the same index in every layer; a layer it
does not target holds the neutral value there.
Acquire pins (reference-counted) so a slot in use by a request is never rewritten.
"""

from __future__ import annotations

import os
import pathlib
import threading
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, Union

from flora_core.adapter_batch import AdapterSlot
from flora_core.adapter_io import check_adapter_fits, load_adapter
from flora_core.adapter_merge import MergedSource, merge_adapters
from flora_core.adapter_weights import AdapterKind, AdapterWeights
from flora_core.multi_adapter_linear import MultiAdapterLinear, SlotCapacity
from flora_core.pool_stats import AdapterInfo, PoolStats

AdapterSource = Union[pathlib.Path, MergedSource, AdapterWeights]
_COUNTERS = ("hits", "loads", "evictions", "disk_reads", "host_cache_evictions")


class UnknownAdapterError(KeyError):
    """A name that was never registered (or was unregistered); serving maps it to 404."""

    def __init__(self, name: object) -> None:
        super().__init__(name)
        self.name = name
        self.message = f"unknown adapter {name!r}: register it with AdapterPool.register(name, path) first"

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.message


class PoolExhaustedError(RuntimeError):
    """Every device slot of one kind is pinned by in-flight requests."""

    def __init__(self, message: str, kind: AdapterKind) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # pickled with its kind (Ray ships exceptions so); args holds the message alone
        return type(self), (str(self), self.kind)


@dataclass(frozen=True)
class PoolLimits:
    """Host-side bounds of an `AdapterPool`.

    max_registered: adapters the registry may hold.
    max_host_bytes: bytes of disk-read weights the host cache keeps (None: no bound).
    max_adapter_bytes: largest adapter accepted, passed to load_adapter as max_bytes (None: no bound).
    """

    max_registered: int = 10_000
    max_host_bytes: int | None = None
    max_adapter_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_registered, int) or self.max_registered < 1:
            raise ValueError(f"PoolLimits.max_registered={self.max_registered!r}; pass an int >= 1")
        for field_name in ("max_host_bytes", "max_adapter_bytes"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"PoolLimits.{field_name}={value!r}; pass an int >= 0, or None for no bound")


class _Entry:
    """One registry row. kind and rank are filled once its weights have been seen and validated."""

    def __init__(self, source: AdapterSource) -> None:
        self.source = source
        self.kind: AdapterKind | None = None
        self.rank: int | None = None


class AdapterPool:
    """Host registry + host LRU cache + device slots with LRU eviction and pinning. Thread-safe."""

    def __init__(
        self,
        layers: Mapping[str, MultiAdapterLinear],
        capacity: SlotCapacity,
        limits: PoolLimits = PoolLimits(),
    ) -> None:
        if not layers:
            raise ValueError("layers is empty; pass the dict patch_model returned (module name -> layer)")
        self._layers = dict(layers)
        self._shapes = {name: (layer.d_in, layer.d_out) for name, layer in self._layers.items()}
        self._capacity = capacity
        self._limits = limits
        self._lock = threading.Lock()
        self._registry: dict[str, _Entry] = {}
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()  # LRU: oldest first
        self._host_bytes = 0
        # Per kind: resident name -> slot index, least recently used first; and the free indices.
        self._resident = {kind: OrderedDict() for kind in AdapterKind}
        self._free = {kind: set(range(capacity.num_slots(kind))) for kind in AdapterKind}
        self._pins: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()  # keys: _COUNTERS

    # ----- registry -----

    def register(self, name: str, source: AdapterSource | str | os.PathLike, *, replace: bool = False) -> None:
        """Make `name` known. A path (or a MergedSource's paths) is not read until the adapter is first needed.

        Registering a name again with the same source does nothing, unless `replace`: then its host copy
        and device slot are dropped, so files rewritten in place are read anew.
        """
        _check_name(name)
        source = self._check_source(name, source)
        with self._lock:
            old = self._registry.get(name)
            if old is not None and not replace and _same_source(old.source, source):
                return
            if old is not None:
                self._check_replaceable(name, replace)
                self._forget(name)
            elif len(self._registry) >= self._limits.max_registered:
                raise ValueError(
                    f"cannot register {name!r}: the registry holds {len(self._registry)} adapters "
                    f"(PoolLimits.max_registered={self._limits.max_registered}); unregister some or raise it"
                )
            entry = _Entry(source)
            if isinstance(source, AdapterWeights):
                entry.kind, entry.rank = source.kind, source.rank
            self._registry[name] = entry

    def unregister(self, name: str) -> None:
        """Forget `name`: free its device slot and its host copy. ValueError if it is pinned."""
        with self._lock:
            self._entry(name)
            self._check_unpinned(name, "unregister")
            self._forget(name)
            del self._registry[name]

    def is_registered(self, name: str) -> bool:
        with self._lock:
            return name in self._registry

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        with self._lock:
            return list(self._registry)

    def info(self, name: str) -> AdapterInfo:
        """Kind, rank, slot and pins of `name`; reads it from disk if its kind is not known yet."""
        self.prefetch_to_host(name)
        with self._lock:
            entry = self._entry(name)
            if entry.kind is None:  # replaced by a path while we read: read the new one under the lock
                self._host_weights(name, entry, {})
            return AdapterInfo(name, entry.kind, entry.rank, self._slot_of(name, entry), self._pins[name])

    def in_host_memory(self, name: str) -> bool:
        """True when acquiring `name` reads no disk: resident, host-cached, or registered as weights."""
        with self._lock:
            return not self._needs_read(name, self._entry(name))

    def prefetch_to_host(self, name: str) -> bool:
        """Read `name` from disk into the host cache, outside the lock. True if it read the disk.

        A read that fails after `name` was registered anew is not the new source's error: it returns False.
        """
        with self._lock:
            entry = self._entry(name)
            if not self._needs_read(name, entry):
                return False
        try:
            weights = self._read(name, entry.source)
        except Exception:
            with self._lock:
                if self._registry.get(name) is not entry:
                    return False
            raise
        with self._lock:
            self._admit(name, entry, weights)
        return True

    # ----- device slots -----

    def acquire(self, names: Sequence[str | None]) -> list[AdapterSlot | None]:
        """Make every named adapter resident and pin it once per occurrence; None is a base-model row.

        All or nothing: on any error the pins taken by this call are released.
        """
        names = list(names)
        prefetched = self._read_missing(names)
        with self._lock:
            for name in names:
                if name is not None:
                    self._entry(name)  # unregistered while we read
            slots: list[AdapterSlot | None] = []
            try:
                for name in names:
                    slots.append(None if name is None else self._pin(name, prefetched))
            except BaseException:
                self._unpin([name for name in names[: len(slots)] if name is not None])
                raise
            return slots

    def release(self, names: Sequence[str | None]) -> None:
        """Undo one acquire of each name (None entries are skipped). All or nothing."""
        wanted = Counter(name for name in names if name is not None)
        with self._lock:
            for name, count in wanted.items():
                if self._pins[name] < count:
                    raise ValueError(
                        f"cannot release {name!r} {count} time(s): it is pinned {self._pins[name]} time(s); "
                        "release only what acquire returned"
                    )
            self._unpin(list(wanted.elements()))
            for name in wanted:  # the end of a use: the adapter becomes the most recently used
                entry = self._registry.get(name)
                if entry is not None and self._slot_of(name, entry) is not None:
                    self._resident[entry.kind].move_to_end(name)

    @contextmanager
    def pinned(self, names: Sequence[str | None]) -> Iterator[list[AdapterSlot | None]]:
        """Acquire `names` for the body of a with-block; always release them after."""
        slots = self.acquire(names)
        try:
            yield slots
        finally:
            self.release(names)

    def evict(self, name: str) -> bool:
        """Take `name` out of its device slot. False if it was not resident; ValueError if pinned."""
        with self._lock:
            entry = self._entry(name)
            if self._slot_of(name, entry) is None:
                return False
            self._check_unpinned(name, "evict")
            self._evict(name, entry.kind, clear=True)
            return True

    def resident(self) -> dict[str, AdapterSlot]:
        """Resident adapters and their slots, least recently used first within each kind."""
        with self._lock:
            return {
                name: AdapterSlot(kind, slot) for kind, names in self._resident.items() for name, slot in names.items()
            }

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                **{counter: self._counts[counter] for counter in _COUNTERS},
                resident={kind: len(names) for kind, names in self._resident.items()},
                pinned=sum(1 for count in self._pins.values() if count > 0),
                registered=len(self._registry),
                host_cached=len(self._host),
                host_bytes=self._host_bytes,
            )

    # ----- internals: registry and host cache (callers hold the lock unless noted) -----

    def _entry(self, name: str) -> _Entry:
        entry = self._registry.get(name) if isinstance(name, str) else None
        if entry is None:
            raise UnknownAdapterError(name)
        return entry

    def _check_source(self, name: str, source: object) -> AdapterSource:
        if isinstance(source, AdapterWeights):
            self._validate(name, source)
            return source
        if isinstance(source, (str, os.PathLike)):
            return pathlib.Path(source)
        if isinstance(source, MergedSource):
            return source
        raise ValueError(
            f"adapter {name!r} has source {type(source).__name__}; pass a pathlib.Path to an adapter "
            "directory, a MergedSource or an AdapterWeights"
        )

    def _check_replaceable(self, name: str, replace: bool) -> None:
        if not replace:
            raise ValueError(
                f"adapter {name!r} is already registered with another source; pass replace=True to swap it"
            )
        self._check_unpinned(name, "replace")

    def _check_unpinned(self, name: str, action: str) -> None:
        if self._pins[name]:
            raise ValueError(f"cannot {action} {name!r}: it is pinned {self._pins[name]} time(s); release it first")

    def _forget(self, name: str) -> None:
        """Drop the device slot and host copy of a registered, unpinned name."""
        entry = self._registry[name]
        if self._slot_of(name, entry) is not None:
            self._evict(name, entry.kind, clear=True)
        self._host_drop(name)
        self._pins.pop(name, None)

    def _needs_read(self, name: str, entry: _Entry) -> bool:
        if isinstance(entry.source, AdapterWeights) or name in self._host:
            return False
        return self._slot_of(name, entry) is None

    def _read(self, name: str, source: pathlib.Path | MergedSource) -> AdapterWeights:
        """Read (and merge) one adapter from disk, validated. Touches no pool state: call it without the lock."""
        def load(path: pathlib.Path) -> AdapterWeights:
            return load_adapter(path, max_bytes=self._limits.max_adapter_bytes, max_rank=self._capacity.largest_rank)

        if isinstance(source, MergedSource):
            weights = merge_adapters([load(path) for path in source.paths], source.weights)
        else:
            weights = load(source)
        self._validate(name, weights)
        return weights

    def _validate(self, name: str, weights: AdapterWeights) -> None:
        """Raise ValueError if `weights` cannot live in this pool. Touches no pool state."""
        check_servable(name, weights, self._capacity, self._shapes, self._limits.max_adapter_bytes)

    def _admit(self, name: str, entry: _Entry, weights: AdapterWeights) -> None:
        """Count a disk read of `entry` and cache it, unless the name was re-registered meanwhile."""
        self._counts["disk_reads"] += 1
        if self._registry.get(name) is not entry:
            return
        entry.kind, entry.rank = weights.kind, weights.rank
        self._host_put(name, weights)

    def _read_missing(self, names: Sequence[str | None]) -> dict[str, tuple[_Entry, AdapterWeights]]:
        """Read from disk, outside the lock, the adapters this acquire will need to load.

        PoolExhaustedError first, reading nothing, where their kinds (known from an earlier read) have too
        few slots that are free or unpinned: a request waiting for a slot must not read the disk every step.
        """
        with self._lock:
            entries = {name: self._entry(name) for name in names if name is not None}
            todo = {name: entry for name, entry in entries.items() if self._needs_read(name, entry)}
            self._check_slots_for(todo)
        read = {name: (entry, self._read(name, entry.source)) for name, entry in todo.items()}
        with self._lock:
            for name, (entry, weights) in read.items():
                self._admit(name, entry, weights)
        return read

    def _check_slots_for(self, todo: Mapping[str, _Entry]) -> None:
        """Raise PoolExhaustedError if the kinds of these non-resident adapters lack slots to load them into."""
        needed = Counter(entry.kind for entry in todo.values() if entry.kind is not None)
        for kind, count in needed.items():
            available = len(self._free[kind]) + sum(1 for name in self._resident[kind] if not self._pins[name])
            if available < count:
                self._raise_exhausted(kind)

    def _raise_exhausted(self, kind: AdapterKind) -> None:
        count = self._capacity.num_slots(kind)
        raise PoolExhaustedError(
            f"all {count} {kind.value} slots are pinned by in-flight requests; wait for some to finish, "
            f"or raise SlotCapacity.{kind.value}_slots (now {count})",
            kind,
        )

    def _host_weights(self, name: str, entry: _Entry, prefetched: Mapping) -> AdapterWeights:
        if isinstance(entry.source, AdapterWeights):
            return entry.source
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        got = prefetched.get(name)
        if got is not None and got[0] is entry:  # read by this call, not kept by the host cache
            return got[1]
        weights = self._read(name, entry.source)  # rare: registered or dropped while we read
        self._admit(name, entry, weights)
        return weights

    def _host_put(self, name: str, weights: AdapterWeights) -> None:
        self._host_drop(name)
        limit = self._limits.max_host_bytes
        if limit is not None and weights.num_bytes > limit:
            return
        self._host[name] = weights
        self._host_bytes += weights.num_bytes
        while limit is not None and self._host_bytes > limit:
            _, old = self._host.popitem(last=False)
            self._host_bytes -= old.num_bytes
            self._counts["host_cache_evictions"] += 1

    def _host_drop(self, name: str) -> None:
        old = self._host.pop(name, None)
        if old is not None:
            self._host_bytes -= old.num_bytes

    # ----- internals: device slots (callers hold the lock) -----

    def _slot_of(self, name: str, entry: _Entry) -> AdapterSlot | None:
        if entry.kind is None or name not in self._resident[entry.kind]:
            return None
        return AdapterSlot(entry.kind, self._resident[entry.kind][name])

    def _pin(self, name: str, prefetched: Mapping) -> AdapterSlot:
        entry = self._registry[name]
        slot = self._slot_of(name, entry)
        if slot is not None:
            self._counts["hits"] += 1  # its LRU place moves on release: unpinned means released
        else:
            slot = self._load(name, self._host_weights(name, entry, prefetched))
        self._pins[name] += 1
        return slot

    def _load(self, name: str, weights: AdapterWeights) -> AdapterSlot:
        """Write `weights` into a free (or freed) slot of every layer."""
        kind = weights.kind
        slot = self._take_slot(kind)
        try:
            for layer_name, layer in self._layers.items():
                layer.write_slot(kind, slot, weights.modules.get(layer_name))
        except BaseException:
            self._clear(kind, slot)
            self._free[kind].add(slot)
            raise
        self._resident[kind][name] = slot
        self._counts["loads"] += 1
        return AdapterSlot(kind, slot)

    def _take_slot(self, kind: AdapterKind) -> int:
        """A free slot index of `kind`, evicting the least recently used unpinned adapter if needed."""
        if self._free[kind]:
            slot = min(self._free[kind])
            self._free[kind].remove(slot)
            return slot
        for name in self._resident[kind]:  # oldest first
            if not self._pins[name]:
                slot = self._resident[kind][name]
                self._evict(name, kind, clear=False)  # the caller overwrites every layer's slot
                self._free[kind].remove(slot)
                return slot
        self._raise_exhausted(kind)

    def _evict(self, name: str, kind: AdapterKind, *, clear: bool) -> None:
        slot = self._resident[kind].pop(name)
        if clear:
            self._clear(kind, slot)
        self._free[kind].add(slot)
        self._counts["evictions"] += 1

    def _clear(self, kind: AdapterKind, slot: int) -> None:
        for layer in self._layers.values():
            layer.clear_slot(kind, slot)

    def _unpin(self, names: Sequence[str]) -> None:
        for name in names:
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]


def check_servable(
    name: str,
    weights: AdapterWeights,
    capacity: SlotCapacity,
    layer_shapes: Mapping[str, tuple[int, int]],
    max_adapter_bytes: int | None = None,
) -> None:
    """Raise ValueError unless a pool of `capacity` over layers of `layer_shapes` can hold `weights`.

    layer_shapes: module name -> (d_in, d_out) of every layer the pool's model adapts
    (`patching.target_layer_shapes`); max_adapter_bytes: None for no bound.
    """
    kind = weights.kind
    if capacity.num_slots(kind) < 1:
        raise ValueError(
            f"adapter {name!r} is {kind.value} but the pool has no {kind.value} slots; raise {kind.value}_slots"
        )
    if kind is not AdapterKind.IA3 and weights.rank > capacity.max_rank(kind):
        raise ValueError(
            f"adapter {name!r} has rank {weights.rank} but the pool's {kind.value} slots hold rank "
            f"{capacity.max_rank(kind)}; raise {kind.value}_max_rank"
        )
    if max_adapter_bytes is not None and weights.num_bytes > max_adapter_bytes:
        raise ValueError(
            f"adapter {name!r} is {weights.num_bytes} bytes, over PoolLimits.max_adapter_bytes={max_adapter_bytes}; "
            "raise it"
        )
    try:
        check_adapter_fits(weights, layer_shapes)
    except ValueError as err:
        raise ValueError(f"adapter {name!r} does not fit the model: {err}") from err


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name {name!r} is not a non-empty str; pass a name such as 'customer-42'")


def _same_source(old: AdapterSource, new: AdapterSource) -> bool:
    if isinstance(old, AdapterWeights) or isinstance(new, AdapterWeights):
        return old is new
    return old == new
