"""The adapter-affinity ranking, without a cluster: which replica a batch prefers, and when not."""

from __future__ import annotations

from router.adapter_router import batch_adapters, rank_replicas
from router.messages import AdapterRef, ReplicaRequest
from flora_core.sampling_params import SamplingParams

HELD = {"a": {"x", "y"}, "b": {"z"}, "c": set()}


def test_the_replica_holding_most_of_the_batch_comes_first():
    ranked = rank_replicas(["a", "b", "c"], {"x", "z", "y"}, HELD, {"a": 0, "b": 0, "c": 0}, 8)
    assert ranked == [["a"], ["b"], ["c"]]


def test_ties_go_to_the_less_busy_replica():
    ranked = rank_replicas(["a", "b", "c"], {"q"}, HELD, {"a": 3, "b": 1, "c": 2}, 8)
    assert ranked == [["b", "c", "a"]]


def test_affinity_yields_to_balance_past_the_threshold():
    ranked = rank_replicas(["a", "b"], {"x"}, HELD, {"a": 20, "b": 2}, 8)
    assert ranked == [["b"], ["a"]]  # a holds x but is 18 requests busier
    assert rank_replicas(["a", "b"], {"x"}, HELD, {"a": 10, "b": 2}, 8) == [["a"], ["b"]]


def test_no_replicas_no_ranks():
    assert rank_replicas([], {"x"}, {}, {}, 8) == []


class _Pending:
    def __init__(self, args):
        self.args, self.kwargs = args, {}


def test_batch_adapters_reads_the_requests_of_a_dispatched_batch():
    def request(name):
        return ReplicaRequest("id", (1, 2), SamplingParams(), AdapterRef(name, 1) if name else None)

    assert batch_adapters(_Pending([[request("x"), request(None), request("y"), request("x")]])) == {"x", "y"}
    assert batch_adapters(_Pending(["request-id"])) == set()
    assert batch_adapters(None) == set()
