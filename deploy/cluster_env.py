"""Ray settings that a Serve config cannot carry: each Ray process reads them from its environment.

`RAY_SERVE_PROXY_USE_GRPC=1` (Ray >= 2.54): Serve's HTTP proxy sends each request to the ingress
over Serve's inter-deployment gRPC instead of a Ray actor call, as the ingress already does to the
model replicas (router/ingress.py). The proxy is started by Ray, not by this application, so the
variable must be in the environment of whatever starts the cluster: the image sets it (Dockerfile,
so every KubeRay pod has it), the README's `serve run` command sets it, and the tests and benchmarks
set it before they start Ray (`cluster_env()`), so they run what is served. Without it everything
works the same, a little slower (README, Performance).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

CLUSTER_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


@contextmanager
def cluster_env() -> Iterator[None]:
    """CLUSTER_ENV in os.environ for the block (where the caller has not set a variable itself), for Ray
    clusters started inside it; the environment as it was afterwards."""
    added = {name: value for name, value in CLUSTER_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
