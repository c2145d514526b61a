"""Prometheus metrics through Ray Serve's metrics API (scraped from every Ray node's metrics port).

flora_requests_total{adapter, status}, flora_generated_tokens_total{adapter}, flora_batch_size,
flora_batch_distinct_adapters, flora_time_to_first_token_seconds, flora_queue_length on the
ingress; flora_pool_{hits,loads,evictions,disk_reads}, flora_engine_{running,waiting,kv_tokens,pinned_adapters}
on replicas. Ray exports each as ray_<name>. The adapter tag is a served name, the base model's, or
UNKNOWN_ADAPTER for a name nobody serves (so clients cannot grow the tag's values without bound).
"""

from __future__ import annotations

from typing import Iterable

from ray.serve import metrics

from flora_core.pool_stats import PoolStats
from flora_core.request_output import EngineStats, RequestOutput

UNKNOWN_ADAPTER = "(unknown)"
CLIENT_CLOSED = 499  # the status a stream gets when its client goes away first (nginx's convention)

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    """Counters and histograms recorded by the ingress for every request and dispatched batch."""

    def __init__(self) -> None:
        self.requests = metrics.Counter("flora_requests_total", description="HTTP requests by adapter and status "
                                        "(499: the client left mid-stream).", tag_keys=("adapter", "status"))
        self.tokens = metrics.Counter("flora_generated_tokens_total", description="Generated tokens by adapter.",
                                      tag_keys=("adapter",))
        self.batch_size = metrics.Histogram("flora_batch_size", description="Requests per dispatched batch.",
                                            boundaries=BATCH_BUCKETS)
        self.distinct = metrics.Histogram("flora_batch_distinct_adapters",
                                          description="Distinct adapters (base included) per dispatched batch.",
                                          boundaries=BATCH_BUCKETS)
        self.ttft = metrics.Histogram("flora_time_to_first_token_seconds", description="Time to first token.",
                                      boundaries=LATENCY_BUCKETS_S, tag_keys=("adapter",))
        self.queue = metrics.Gauge("flora_queue_length", description="Requests in the ingress, waiting or running.")

    def record_batch(self, adapters: list[str]) -> None:
        self.batch_size.observe(len(adapters))
        self.distinct.observe(len(set(adapters)))

    def record_request(self, adapter: str, status: int, outputs: Iterable[RequestOutput] = ()) -> None:
        """One HTTP request's outcome, with the last output of each of its choices that finished."""
        self.requests.inc(tags={"adapter": adapter, "status": str(status)})
        outputs = list(outputs)
        if tokens := sum(output.usage.completion_tokens for output in outputs):
            self.tokens.inc(tokens, tags={"adapter": adapter})
        for output in outputs:
            if output.timings.time_to_first_token is not None:
                self.ttft.observe(output.timings.time_to_first_token, tags={"adapter": adapter})


class ReplicaMetrics:
    """Gauges of a replica's pool and engine, refreshed with its routing stats and after each batch."""

    def __init__(self) -> None:
        names = ["hits", "loads", "evictions", "disk_reads"]
        self.pool = {n: metrics.Gauge(f"flora_pool_{n}", description=f"Adapter pool {n} since start.") for n in names}
        self.engine = {n: metrics.Gauge(f"flora_engine_{n}", description=f"Engine {n} now.")
                       for n in ["running", "waiting", "kv_tokens", "pinned_adapters"]}

    def record_pool(self, stats: PoolStats) -> None:
        for name, gauge in self.pool.items():
            gauge.set(getattr(stats, name))

    def record_engine(self, stats: EngineStats) -> None:
        for name, gauge in self.engine.items():
            gauge.set(getattr(stats, name))
