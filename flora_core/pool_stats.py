"""What `AdapterPool` reports: its counters and the state of one adapter.

Snapshots, taken under the pool's lock; they do not change after they are returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from flora_core.adapter_batch import AdapterSlot
from flora_core.adapter_weights import AdapterKind


@dataclass(frozen=True)
class PoolStats:
    """Counters since the pool was built, and its occupancy now."""

    hits: int  # acquires of an adapter already resident in a device slot
    loads: int  # adapters written into device slots
    evictions: int  # adapters taken out of device slots (to make room, or by evict/unregister)
    disk_reads: int  # adapter files read from disk
    host_cache_evictions: int  # host copies dropped to stay under PoolLimits.max_host_bytes
    resident: Mapping[AdapterKind, int]  # resident adapters per kind
    pinned: int  # distinct adapters pinned by at least one acquire
    registered: int  # adapters in the host registry
    host_cached: int  # adapters read from disk whose weights the host cache holds
    host_bytes: int  # bytes of those weights


@dataclass(frozen=True)
class AdapterInfo:
    """One registered adapter: what it is and where it lives."""

    name: str
    kind: AdapterKind
    rank: int  # the largest rank over its modules (1 for IA3)
    slot: AdapterSlot | None  # its device slot, None when not resident
    pins: int  # acquires not yet released

    @property
    def resident(self) -> bool:
        return self.slot is not None

    @property
    def pinned(self) -> bool:
        return self.pins > 0
