"""The application builder: `serve run deploy/serve_config.yaml`, or `serve run deploy.app:build_app model=...`.

    applications:
      - name: flora
        import_path: deploy.app:build_app
        args: {model: flora-tiny-llama}

Arguments are checked by `AppArgs` (unknown keys are refused). Defaults suit the machine the
replicas get: float32 on CPU, bfloat16 on GPU (replica_num_gpus > 0).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from router.catalog import AdapterCatalog
from router.ingress import FloraIngress
from router.protocol import AdapterMerge
from router.replica import FloraReplica
from router.settings import IngressSettings, ReplicaSettings

MAX_POSITIONS_DEFAULT_CAP = 4096
DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 4}


class AppArgs(BaseModel):
    """Everything `build_app` takes; see each field's description."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL_NAME, description=f"A local Hugging Face model directory, or "
                       f"{DEFAULT_MODEL_NAME!r} for the embedded default. Nothing is downloaded.")
    adapter_dir: Optional[str] = Field(None, description="Root folder of adapters: each subfolder one adapter, named "
                                       "by its folder. Default: the embedded model's demo adapters.")
    served_model_name: Optional[str] = Field(None, description="The base model's name in the API (default: "
                                             "the model directory's name).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: float32 on CPU, "
                                                                      "bfloat16 on GPU.")
    num_replicas: Union[int, Literal["auto"]] = Field(1, description="Model replicas; 'auto' with autoscaling.")
    autoscaling_config: Optional[dict] = Field(None, description="Ray Serve autoscaling for the model replicas.")
    replica_num_cpus: float = Field(1.0, description="CPUs per model replica (also its torch threads).")
    replica_num_gpus: float = Field(0.0, description="GPUs per model replica; > 0 puts the model on CUDA.")
    lora_slots: int = Field(16, description="LoRA adapters resident per replica at once.")
    lora_max_rank: int = Field(64, description="Largest LoRA rank served.")
    flora_slots: int = Field(16, description="FLoRA adapters resident per replica at once.")
    flora_max_rank: int = Field(16, description="Largest FLoRA rank served.")
    ia3_slots: int = Field(16, description="IA3 adapters resident per replica at once.")
    max_host_bytes: Optional[int] = Field(2 << 30, description="Host cache of adapter weights per replica, bytes.")
    max_adapter_bytes: Optional[int] = Field(1 << 30, description="Largest adapter file accepted, bytes.")
    max_model_len: Optional[int] = Field(None, description="Prompt + completion tokens at most (default: the "
                                         f"model's positions, at most {MAX_POSITIONS_DEFAULT_CAP}).")
    max_prompt_chars: Optional[int] = Field(None, description="Longest text prompt accepted (characters; for chat, "
                                            "all messages together), refused with 400 before tokenizing. Default: "
                                            "max_model_len x the tokenizer's longest token, which no prompt that "
                                            "fits the context exceeds.")
    max_running: int = Field(64, description="Sequences decoding at once per replica.")
    max_batched_tokens: Optional[int] = Field(None, description="Prefill tokens per engine step (default: 4 x "
                                              "max_model_len).")
    max_adapters_per_step: Optional[int] = Field(None, ge=1, description="Distinct adapters (the base model counts "
                                                 "as one) a replica's running batch may hold at once; None: "
                                                 "unlimited. 1 serves one adapter at a time, like multiplexing "
                                                 "adapters per batch: a baseline for benchmarks.")
    stream_interval_ms: float = Field(50.0, ge=0, description="Least time between two messages of a replica's "
                                      "stream: tokens made in between travel (and are streamed) together, so the "
                                      "ingress and the proxy do less work per token (as Ray Serve LLM's "
                                      "stream_batching_interval_ms). 0: a message per engine step.")
    keep_freed_host_memory: bool = Field(True, description="Replicas keep the host memory their tensors free for the "
                                         "next engine step (glibc malloc) instead of returning it to the system and "
                                         "faulting it in again: 15-20% faster steps on CPU; a replica's memory stays "
                                         "at its peak. No effect where the C library is not glibc.")
    default_max_tokens: int = Field(16, description="max_tokens when a request leaves it out (OpenAI: 16).")
    max_batch_size: int = Field(32, description="@serve.batch: requests per dispatched batch at most.")
    batch_wait_timeout_s: float = Field(0.005, description="@serve.batch: how long a batch waits to fill.")
    max_concurrent_batches: Optional[int] = Field(None, ge=1, description="@serve.batch: batches in flight at once "
                                                  "per ingress. A batch stays in flight until its last request ends, "
                                                  "so this caps the requests running at once; default max_running x "
                                                  "replicas (max_replicas with autoscaling), which never leaves an "
                                                  "engine short of requests.")
    max_queued_requests: int = Field(512, description="Requests in flight per ingress before 503.")
    merged_adapters: list[AdapterMerge] = Field([], description="Adapters served as weighted merges of adapter "
                                                "folders, made at start: [{name, adapters, weights}] (as POST "
                                                "/v1/adapters/merge). One that cannot be served stops the start.")
    enable_adapter_management: bool = Field(False, description="Enable POST /v1/adapters/load, /merge and /unload.")
    management_token: Optional[str] = Field(None, description="Bearer token the management API requires.")
    management_token_env: Optional[str] = Field(None, description="Name of an environment variable holding the "
                                                "management token (e.g. from a Kubernetes Secret), read where the app "
                                                "is built; use it instead of management_token.")
    adapter_aware_routing: bool = Field(True, description="Route batches to replicas holding their adapters "
                                        "(router.adapter_router); False: Ray Serve's power-of-two-choices.")
    routing_imbalance_threshold: int = Field(8, description="Adapter affinity yields once a replica is this many "
                                             "requests busier than the least busy one.")


def resolve_model_dir(model: str) -> Path:
    if model == DEFAULT_MODEL_NAME:
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model={model!r} is not a local Hugging Face model directory (no config.json); pass a "
                         f"directory, or {DEFAULT_MODEL_NAME!r} for the embedded default (nothing is downloaded)")
    return path.resolve()


def model_positions(model_dir: Path) -> int:
    from transformers import AutoConfig  # noqa: PLC0415 - keep import time light for `serve` CLIs

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return int(getattr(config, "max_position_embeddings", MAX_POSITIONS_DEFAULT_CAP))


def max_model_replicas(args: AppArgs) -> int:
    """The most model replicas the app may run: num_replicas, or autoscaling's max_replicas."""
    if args.num_replicas != "auto":
        return args.num_replicas
    return int((args.autoscaling_config or {}).get("max_replicas", DEFAULT_AUTOSCALING["max_replicas"]))


def management_token(args: AppArgs) -> Optional[str]:
    """The management API's bearer token: given in the args, or read from the variable they name."""
    if args.management_token_env is None:
        return args.management_token
    if args.management_token is not None:
        raise ValueError("set management_token or management_token_env, not both")
    token = os.environ.get(args.management_token_env, "")
    if not token:
        raise ValueError(f"management_token_env={args.management_token_env!r}: that environment variable is unset or "
                         "empty where the application is built; set it on every Ray pod (from a Secret) or pass "
                         "management_token")
    return token


def resolve(args: AppArgs) -> tuple[ReplicaSettings, IngressSettings]:
    """Settings for each deployment, with every 'auto' and default decided."""
    model_dir = resolve_model_dir(args.model)
    adapter_dir = args.adapter_dir
    if adapter_dir is None and args.model == DEFAULT_MODEL_NAME and (model_dir / "adapters").is_dir():
        adapter_dir = str(model_dir / "adapters")
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise ValueError(f"adapter_dir={adapter_dir!r} is not a directory; create it or leave adapter_dir unset")
    device = "cuda" if args.replica_num_gpus > 0 else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    max_model_len = args.max_model_len or min(model_positions(model_dir), MAX_POSITIONS_DEFAULT_CAP)
    name = args.served_model_name or (DEFAULT_MODEL_NAME if args.model == DEFAULT_MODEL_NAME else model_dir.name)
    replica = ReplicaSettings(
        model_path=str(model_dir), served_model_name=name, adapter_dir=adapter_dir, dtype=dtype, device=device,
        lora_slots=args.lora_slots, lora_max_rank=args.lora_max_rank, flora_slots=args.flora_slots,
        flora_max_rank=args.flora_max_rank, ia3_slots=args.ia3_slots, max_host_bytes=args.max_host_bytes,
        max_adapter_bytes=args.max_adapter_bytes, max_model_len=max_model_len, max_running=args.max_running,
        max_batched_tokens=args.max_batched_tokens or 4 * max_model_len,
        max_adapters_per_step=args.max_adapters_per_step,
        torch_threads=max(1, math.floor(args.replica_num_cpus)), stream_interval_ms=args.stream_interval_ms,
        keep_freed_host_memory=args.keep_freed_host_memory)
    ingress = IngressSettings(
        model_path=str(model_dir), served_model_name=name, adapter_dir=adapter_dir, max_model_len=max_model_len,
        default_max_tokens=args.default_max_tokens, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_concurrent_batches=args.max_concurrent_batches or args.max_running * max_model_replicas(args),
        max_queued_requests=args.max_queued_requests, enable_adapter_management=args.enable_adapter_management,
        management_token=management_token(args), max_adapter_bytes=args.max_adapter_bytes,
        max_prompt_chars=args.max_prompt_chars)
    return replica, ingress


def router_config(args: AppArgs) -> RequestRouterConfig:
    if not args.adapter_aware_routing:
        return RequestRouterConfig(request_routing_stats_period_s=1, request_routing_stats_timeout_s=5)
    return RequestRouterConfig(
        request_router_class="router.adapter_router:AdapterAffinityRouter",
        request_router_kwargs={"imbalance_threshold": args.routing_imbalance_threshold},
        request_routing_stats_period_s=1, request_routing_stats_timeout_s=5)


def config_merges(args: AppArgs) -> tuple:
    """The deploy config's merged adapters as the catalog takes them: (name, ((adapter, weight), ...))."""
    return tuple((merge.name, merge.recipe()) for merge in args.merged_adapters)


def build_app(args: dict) -> Application:
    """Build the flora-serve application from `args` (validated as AppArgs)."""
    app_args = AppArgs.model_validate(args or {})
    replica_settings, ingress_settings = resolve(app_args)
    if app_args.merged_adapters:  # a merge that cannot be served fails the build, not (retried) catalog starts
        AdapterCatalog(ingress_settings.adapter_dir, replica_settings.model_path, replica_settings.capacity(),
                       app_args.max_adapter_bytes, config_merges(app_args),
                       base_model_name=ingress_settings.served_model_name)
    scaling = ({"autoscaling_config": app_args.autoscaling_config or DEFAULT_AUTOSCALING}
               if app_args.num_replicas == "auto" else {"num_replicas": app_args.num_replicas})
    replica = serve.deployment(FloraReplica, name="FloraReplica").options(
        ray_actor_options={"num_cpus": app_args.replica_num_cpus, "num_gpus": app_args.replica_num_gpus},
        max_ongoing_requests=max(8, app_args.max_running),
        request_router_config=router_config(app_args),
        health_check_period_s=5, health_check_timeout_s=30, **scaling)
    catalog = serve.deployment(AdapterCatalog, name="AdapterCatalog").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0})
    # The ingress refuses work itself past max_queued_requests (503, OpenAI body, Retry-After);
    # Serve's own limits sit above that so its plain 503 is only a last resort.
    serve_limit = 4 * app_args.max_queued_requests + 64
    ingress = serve.deployment(FloraIngress, name="FloraIngress").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=serve_limit, max_queued_requests=4 * serve_limit)
    return ingress.bind(
        ingress_settings,
        replica.bind(replica_settings),
        catalog.bind(ingress_settings.adapter_dir, replica_settings.model_path, replica_settings.capacity(),
                     app_args.max_adapter_bytes, config_merges(app_args),
                     base_model_name=ingress_settings.served_model_name),
    )
