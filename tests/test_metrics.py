"""The Prometheus metrics, scraped from a real local Ray cluster's metrics port after real traffic.

Counts must equal what the clients saw: requests per adapter and status (refusals and streams
included), generated tokens per adapter equal to the usage the answers reported, and the pool's
loads. Ray exports every metric as ray_<name>, a moment after it is recorded (a replica's gauges
after its next batch ends), so the test polls until every value is in.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from deploy.app import build_app
from flora_core.default_model import DEFAULT_MODEL_NAME
from router.metrics import UNKNOWN_ADAPTER
from tests.serving_fixtures import app_args, write_test_adapters

HTTP_PORT, METRICS_PORT = 8060, 8062
BASE_URL = f"http://127.0.0.1:{HTTP_PORT}"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_test_adapters(root, ["lora-r8", "flora-r1"])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT, _system_config={"metrics_report_interval_ms": 500})
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
    serve.run(build_app(app_args(root)), name="flora", route_prefix="/")
    yield BASE_URL
    serve.shutdown()
    ray.shutdown()


def scrape() -> dict[str, dict[tuple, float]]:
    """Every flora sample on the metrics port: name -> {sorted (label, value) pairs of interest: value}."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    samples: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_flora_"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in ("adapter", "status")))
                samples[sample.name][labels] += sample.value  # summed over replicas
    return samples


def poll_until(expected: dict[str, dict[tuple, float]], timeout_s: float = 60.0) -> dict:
    """Scrape until every expected sample has its value (or the time is up); the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape()
        if all(samples[name][labels] == value for name, want in expected.items() for labels, value in want.items()):
            return samples
        if time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_request_token_and_pool_metrics_match_the_traffic(app):
    async def traffic(client: openai.AsyncOpenAI) -> dict[str, int]:
        tokens: dict[str, int] = defaultdict(int)
        for _ in range(3):
            reply = await client.completions.create(model="lora-r8", prompt="hi=", max_tokens=5, temperature=0)
            tokens["lora-r8"] += reply.usage.completion_tokens
        for _ in range(2):
            stream = await client.completions.create(model="flora-r1", prompt="yo=", max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                tokens["flora-r1"] += chunk.usage.completion_tokens if chunk.usage else 0
        stream = await client.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=4, stream=True,
                                                      messages=[{"role": "user", "content": "abc"}],
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            tokens[DEFAULT_MODEL_NAME] += chunk.usage.completion_tokens if chunk.usage else 0
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nobody-serves-this", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="lora-r8", prompt="x", max_tokens=10_000)
        return tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            return await traffic(client)

    tokens = asyncio.run(main())
    assert all(tokens[name] > 0 for name in ("lora-r8", "flora-r1", DEFAULT_MODEL_NAME))

    def tag(adapter: str, status: int | None = None) -> tuple:
        return tuple(sorted([("adapter", adapter)] + ([("status", str(status))] if status else [])))

    expected = {
        "ray_flora_requests_total": {tag("lora-r8", 200): 3, tag("flora-r1", 200): 2, tag(DEFAULT_MODEL_NAME, 200): 1,
                                     tag(UNKNOWN_ADAPTER, 404): 1, tag("lora-r8", 400): 1},
        "ray_flora_generated_tokens_total": {tag(name): float(count) for name, count in tokens.items()},
        "ray_flora_time_to_first_token_seconds_count": {tag("lora-r8"): 3, tag("flora-r1"): 2},
        "ray_flora_pool_loads": {(): 2},  # lora-r8 and flora-r1 each went into a device slot once
    }
    samples = poll_until(expected)
    for name, want in expected.items():
        got = {labels: samples[name][labels] for labels in want}
        assert got == want, f"{name}: scraped {dict(samples[name])}"
    assert not any("nobody-serves-this" in str(labels) for labels in samples["ray_flora_requests_total"])
