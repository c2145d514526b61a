"""Adapter-aware replica choice for dispatched batches (Ray Serve's custom request router API).

We do not tag requests with a multiplexed model id: Ray Serve splits `@serve.batch` batches by
that id, which would make every batch single-adapter. Instead each replica reports, through
`record_routing_stats`, which adapters are resident and how busy it is, and this router ranks
replicas for a batch by how many of its adapters they hold, among replicas whose load is within
`imbalance_threshold` of the least loaded one (so an adapter's home cannot become a hot spot).
Between stats refreshes it also remembers which adapters it just sent where.

A call with the keyword `target_replica` (a replica's unique id) goes to that replica: the
ingress uses it to abort a request on the replica that runs it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router.messages import ReplicaRequest



def batch_adapters(pending_request: Optional[PendingRequest]) -> set[str]:
    """Adapter names of a generate_batch call's requests (empty for other calls)."""
    if pending_request is None or not pending_request.args:
        return set()
    first = pending_request.args[0]
    if not isinstance(first, list):
        return set()
    return {r.adapter.name for r in first if isinstance(r, ReplicaRequest) and r.adapter is not None}


def rank_replicas(replicas: list, adapters: set[str], held: dict, load: dict, imbalance_threshold: int) -> list[list]:
    """Replicas grouped best first: balanced ones by how many of `adapters` they hold, then the rest.

    held / load: per replica, the adapters it holds and its outstanding requests. A replica more
    than imbalance_threshold requests busier than the least busy one goes to the last group.
    """
    if not replicas:
        return []
    floor = min(load[r] for r in replicas)
    balanced = [r for r in replicas if load[r] <= floor + imbalance_threshold]
    overloaded = sorted((r for r in replicas if r not in balanced), key=lambda r: load[r])
    groups: dict[int, list] = defaultdict(list)
    for replica in balanced:
        groups[len(adapters & held[replica])].append(replica)
    ranked = [sorted(groups[score], key=lambda r: load[r]) for score in sorted(groups, reverse=True)]
    return ranked + ([overloaded] if overloaded else [])


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    """See the module docstring."""

    def initialize_state(self, imbalance_threshold: int = 8, **kwargs) -> None:
        self.imbalance_threshold = imbalance_threshold
        self._in_flight: dict[ReplicaID, int] = defaultdict(int)
        self._recent: dict[ReplicaID, set[str]] = defaultdict(set)  # routed here since its last stats report
        self._stats_seen: dict[ReplicaID, int] = {}  # id() of the stats dict the recent set was built on

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("target_replica") if pending_request else None
        if target is not None:
            matches = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [matches] if matches else [candidate_replicas]
        return self.rank(candidate_replicas, batch_adapters(pending_request))

    def rank(self, replicas: list[RunningReplica], adapters: set[str]) -> list[list[RunningReplica]]:
        held = {r: self._held(r) for r in replicas}
        load = {r: self._load(r) for r in replicas}
        return rank_replicas(replicas, adapters, held, load, self.imbalance_threshold)

    def _held(self, replica: RunningReplica) -> set[str]:
        stats = replica.routing_stats or {}
        if self._stats_seen.get(replica.replica_id) != id(stats):  # a fresh report supersedes our guesses
            self._stats_seen[replica.replica_id] = id(stats)
            self._recent[replica.replica_id].clear()
        return set(stats.get("resident_adapters", ())) | self._recent[replica.replica_id]

    def _load(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        return int(stats.get("load", 0)) + self._in_flight[replica.replica_id]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._in_flight[replica_id] += 1
        self._recent[replica_id] |= batch_adapters(pending_request)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id, None)
        self._recent.pop(replica_id, None)
        self._stats_seen.pop(replica_id, None)
