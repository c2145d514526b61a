"""A local two-node Ray cluster (ray.cluster_utils.Cluster): two model replicas, one per node.

Requests for 8 adapters, sent concurrently over HTTP, all get the engine-alone answer, whichever
replica runs them.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from deploy.app import build_app
from tests.serving_fixtures import PROMPTS, TEST_ADAPTERS, app_args, engine_alone_texts, write_test_adapters

PORT = 8011


@pytest.fixture(scope="module")
def two_node_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_test_adapters(root)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(app_args(root, num_replicas=2, replica_num_cpus=1)), name="flora", route_prefix="/")
    yield root, f"http://127.0.0.1:{PORT}"
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_two_replicas_on_two_nodes_serve_every_adapter_correctly(two_node_app):
    root, url = two_node_app
    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "FloraReplica" in a.class_name]
    assert len(replicas) == 2 and len({a.node_id for a in replicas}) == 2, "expected one replica on each node"

    adapters = list(TEST_ADAPTERS)[:8]
    cases = [(a, p) for a in adapters for p in PROMPTS[:3]]

    async def ask_all():
        async with httpx.AsyncClient(timeout=120) as http:
            replies = await asyncio.gather(*(
                http.post(f"{url}/v1/completions", json={"model": a, "prompt": p, "max_tokens": 8, "temperature": 0})
                for a, p in cases))
        return [r.json()["choices"][0]["text"] for r in replies]

    assert asyncio.run(ask_all()) == engine_alone_texts(root, [(a, p, 8) for a, p in cases])
