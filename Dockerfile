# syntax=docker/dockerfile:1
# The flora-serve image: a Ray base image with the project installed; every Ray pod (head and
# workers) runs it, and `deploy.app:build_app` is importable from any directory.
#
#   CPU (default):  docker build -t ghcr.io/flora-serve/flora-serve:0.1.0 .
#   GPU (CUDA):     docker build --build-arg VARIANT=gpu -t ghcr.io/flora-serve/flora-serve:0.1.0-gpu .
#
# VARIANT is the rayproject/ray platform tag: cpu, gpu (an alias of Ray's default CUDA image)
# or a specific cuXXX. RAY_VERSION must equal rayVersion in k8s/ (tests/test_k8s_manifests.py
# checks it), and TORCH_VERSION the pin in scripts/setup.sh.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# torch first, as scripts/setup.sh does, so installing the project pulls no second torch:
# the CPU wheel (no CUDA libraries) for the cpu variant, PyPI's CUDA build otherwise.
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

# The project, not editable; ray stays at the base image's version.
COPY --chown=ray:users pyproject.toml README.md /tmp/flora-serve/
COPY --chown=ray:users flora_core /tmp/flora-serve/flora_core
COPY --chown=ray:users router /tmp/flora-serve/router
COPY --chown=ray:users deploy /tmp/flora-serve/deploy
RUN pip install --no-cache-dir /tmp/flora-serve "ray[serve]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
    && rm -rf /tmp/flora-serve

# Ray settings a Serve config cannot carry (deploy/cluster_env.py; tests/test_k8s_manifests.py checks
# that every one is here): the proxy reaches the ingress over gRPC.
ENV RAY_SERVE_PROXY_USE_GRPC=1

# Fail the build, not the cluster: the embedded model ships in the package and the application
# builds from its import path (building starts no Ray and touches no GPU).
WORKDIR /home/ray
RUN python -c "from ray.serve import Application; from deploy.app import build_app; \
assert isinstance(build_app({}), Application)"
