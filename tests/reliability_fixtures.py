"""Pieces the reliability tests share: a local cluster running the app, broken adapters, probes.

Every app runs on a fresh local Ray cluster (`address="local"`, never someone else's) with its
HTTP proxy on 127.0.0.1; `serving_cluster` always shuts Serve and Ray down. Broken adapters
are written next to good ones under one adapter root, so they reach the server both through
the load API and lazily, when a request first names an adapter listed at start.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx
import psutil
import ray
import torch
from ray import serve
from safetensors.torch import load_file, save_file

from deploy.app import build_app
from flora_core import AdapterKind, save_adapter
from flora_core.default_model import DEFAULT_MODEL_NAME
from tests.factories import random_adapter
from tests.serving_fixtures import TEST_ADAPTERS, engine_alone_texts, linear_shapes, write_test_adapters

TOKEN = {"Authorization": "Bearer test-token"}
ERROR_FIELDS = {"message", "type", "param", "code"}
# More LoRA adapters than the quick app's two LoRA slots hold, so requests keep evicting each other.
EXTRA_LORAS = {"lora-x1": (4, 21), "lora-x2": (2, 22), "lora-x3": (8, 23)}  # name -> (rank, seed)
LORAS = [n for n, (kind, *_) in TEST_ADAPTERS.items() if kind is AdapterKind.LORA] + list(EXTRA_LORAS)
GOOD_MODELS = [DEFAULT_MODEL_NAME, *TEST_ADAPTERS, *EXTRA_LORAS]


def write_adapter_root(root: Path) -> Path:
    """The test adapters, the extra LoRAs, and one folder per broken-adapter case."""
    write_test_adapters(root)
    shapes = linear_shapes()
    for name, (rank, seed) in EXTRA_LORAS.items():
        save_adapter(random_adapter(AdapterKind.LORA, shapes, rank=rank, seed=seed, strength=0.3), root / name)
    write_cycled(root)
    for name, write in BAD_ADAPTERS.items():
        write(root / name, root)
    return root


# ---------------------------------------------------------------------------- broken adapters


def _copy_good(directory: Path, root: Path, source: str = "lora-r2") -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text((root / source / "adapter_config.json").read_text())
    return load_file(str(root / source / "adapter_model.safetensors"))


def _pickle_marker(root: Path) -> Path:
    return root.parent / f"{root.name}-pickle-ran"


class _RunsCode:
    """Unpickling this touches a marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled(directory: Path, root: Path) -> None:
    _copy_good(directory, root)
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(_RunsCode(_pickle_marker(root))))


def _truncated(directory: Path, root: Path) -> None:
    _copy_good(directory, root)
    data = (root / "lora-r2" / "adapter_model.safetensors").read_bytes()
    (directory / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _with_value(value: float) -> Callable[[Path, Path], None]:
    def write(directory: Path, root: Path) -> None:
        tensors = _copy_good(directory, root)
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        save_file(tensors, str(directory / "adapter_model.safetensors"))

    return write


def _saved(kind: AdapterKind, rank: int, shapes_of: Callable[[dict], dict]) -> Callable[[Path, Path], None]:
    def write(directory: Path, root: Path) -> None:
        save_adapter(random_adapter(kind, shapes_of(linear_shapes()), rank=rank, seed=99), directory)

    return write


def _wrong_width(shapes: dict) -> dict:
    name = sorted(shapes)[0]
    return {**shapes, name: (shapes[name][0] + 3, shapes[name][1])}


def _foreign_module(shapes: dict) -> dict:
    return {"model.layers.0.no_such_proj": (8, 8)}


def _config_text(text: str) -> Callable[[Path, Path], None]:
    def write(directory: Path, root: Path) -> None:
        save_file(_copy_good(directory, root), str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(text)

    return write


def _wrong_dtype(directory: Path, root: Path) -> None:
    tensors = _copy_good(directory, root)
    save_file({k: (v * 100).to(torch.int32) for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))


def _empty(directory: Path, root: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)


BAD_ADAPTERS: dict[str, Callable[[Path, Path], None]] = {
    "bad-pickle": _pickled,
    "bad-truncated": _truncated,
    "bad-nan": _with_value(float("nan")),
    "bad-inf": _with_value(float("inf")),
    "bad-lora-rank": _saved(AdapterKind.LORA, 16, lambda s: s),  # the pool's LoRA slots hold rank 8
    "bad-flora-rank": _saved(AdapterKind.FLORA, 8, lambda s: s),  # FLoRA slots hold rank 4
    "bad-shape": _saved(AdapterKind.LORA, 2, _wrong_width),
    "bad-module": _saved(AdapterKind.LORA, 2, _foreign_module),
    "bad-config-not-json": _config_text("{not json"),
    "bad-config-list": _config_text("[1, 2]"),
    "bad-config-huge-rank": _config_text(json.dumps({"peft_type": "LORA", "r": 10**40, "lora_alpha": 1})),
    "bad-dtype": _wrong_dtype,
    "bad-empty": _empty,
}


def pickle_ran(root: Path) -> bool:
    return _pickle_marker(root).exists()


# ---------------------------------------------------------------------------- bad requests

BAD_COMPLETIONS = [  # (case, fields over a good completion body, status, param)
    ("prompt of a wrong type", {"prompt": 5}, 400, "prompt"),
    ("max_tokens of a wrong type", {"max_tokens": "ten"}, 400, "max_tokens"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty list of prompts", {"prompt": []}, 400, "prompt"),
    ("empty token list", {"prompt": [[]]}, 400, "prompt"),
    ("token id past the vocabulary", {"prompt": [10_000_000]}, 400, "prompt"),
    ("negative token id", {"prompt": [3, -1]}, 400, "prompt"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens"),
    ("negative max_tokens", {"max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens past the context", {"max_tokens": 10_000}, 400, "max_tokens"),
    ("negative temperature", {"temperature": -0.5}, 400, "temperature"),
    ("top_p 0", {"top_p": 0}, 400, "top_p"),
    ("top_p above 1", {"top_p": 1.5}, 400, "top_p"),
    ("top_k past int64", {"top_k": 10**30, "temperature": 1.0}, 400, "top_k"),
    ("seed past int64", {"seed": 2**70}, 400, "seed"),
    ("n 0", {"n": 0}, 400, "n"),
    ("n too large", {"n": 1000}, 400, "n"),
    ("logprobs above 20", {"logprobs": 50}, 400, "logprobs"),
    ("stop token past the vocabulary", {"stop_token_ids": [10**6]}, 400, None),
    ("unknown field", {"max_tokenz": 3}, 400, None),
    ("unknown adapter", {"model": "no-such-adapter"}, 404, "model"),
    ("adapter name with ..", {"model": "../lora-r2"}, 404, "model"),
    ("absolute path as model", {"model": "/etc/passwd"}, 404, "model"),
    ("1 MB of text", {"prompt": "a" * 1_000_000}, 400, "prompt"),
    ("too many prompts", {"prompt": ["ab"] * 100}, 400, "n"),
]


# ---------------------------------------------------------------------------- the cluster


@contextmanager
def serving_cluster(port: int, apps: dict[str, tuple[str, dict]], num_cpus: int = 4) -> Iterator[str]:
    """A fresh local Ray cluster serving apps {name: (route_prefix, build_app args)}; yields the base URL."""
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([serve.RunTarget(build_app(args), name=name, route_prefix=prefix)
                        for name, (prefix, args) in apps.items()])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def assert_openai_error(response: httpx.Response, status: int | None = None, param: str | None = None) -> dict:
    """The response is a 4xx/5xx whose body is OpenAI's error object; returns that object."""
    assert 400 <= response.status_code < 600, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def replica_stats(app: str) -> list[dict]:
    return serve.get_app_handle(app).replica_stats.remote().result(timeout_s=30)


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.25) -> bool:
    """Poll condition until it holds (True) or timeout_s passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


def engines_idle(app: str) -> bool:
    stats = replica_stats(app)
    return bool(stats) and all(s["engine"]["running"] == 0 and s["engine"]["waiting"] == 0
                               and s["engine"]["kv_tokens"] == 0 and s["engine"]["pinned_adapters"] == 0
                               for s in stats)


def cluster_processes(title: str) -> list[psutil.Process]:
    """This driver's descendant processes whose title (Ray's `ray::...`) contains `title`."""
    found = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if title in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def rss_bytes(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def kill_process(process: psutil.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)


def completion(client: httpx.Client, base: str, model: str, prompt: str, max_tokens: int, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return client.post(f"{base}/v1/completions", json=body)


async def stream_then_disconnect(http: httpx.AsyncClient, url: str, body: dict) -> bool:
    """Open a streamed completion, read its first event, then drop the connection. True if one came."""
    async with http.stream("POST", url, json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return True
    return False


def run_async(coroutine, timeout_s: float):
    """asyncio.run with an overall bound, so no scenario can hang a test."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


# ---------------------------------------------------------------------------- traffic


CYCLED = {"lora-cycled": "lora-x2"}  # unloaded and loaded again in a loop; a copy of the adapter it names


def reference_name(model: str) -> str:
    return CYCLED.get(model, model)


def write_cycled(root: Path) -> None:
    for name, source in CYCLED.items():
        shutil.copytree(root / source, root / name)


def known_answers(adapter_root: Path, models: list[str], prompts: list[str], max_tokens: int) -> dict:
    """(model, prompt) -> the engine-alone greedy text (the base model under its served name)."""
    cases = [(m, p) for m in models for p in prompts]
    texts = engine_alone_texts(adapter_root, [(None if m == DEFAULT_MODEL_NAME else m, p, max_tokens)
                                              for m, p in cases])
    return dict(zip(cases, texts))


async def ask_all(base: str, cases: list[tuple[str, str]], max_tokens: int, concurrency: int,
                  timeout_s: float = 120) -> list[httpx.Response | Exception]:
    """One greedy completion per (model, prompt), at most `concurrency` at once."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8)

    async def ask(http: httpx.AsyncClient, model: str, prompt: str):
        async with gate:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            try:
                return await http.post(f"{base}/v1/completions", json=body)
            except httpx.HTTPError as error:
                return error

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        return await asyncio.gather(*(ask(http, m, p) for m, p in cases))


def tally(cases: list[tuple[str, str]], replies: list, references: dict, may_be_missing=frozenset()) -> Counter:
    """ok / mismatch / error counts; a 404 for a model in may_be_missing (unloaded just then) is 'refused'."""
    counts: Counter = Counter()
    for (model, prompt), reply in zip(cases, replies):
        if isinstance(reply, Exception):
            counts[f"error:{type(reply).__name__}"] += 1
        elif reply.status_code == 404 and model in may_be_missing:
            counts["refused"] += 1
        elif reply.status_code != 200:
            counts[f"error:{reply.status_code}"] += 1
        elif reply.json()["choices"][0]["text"] == references[(reference_name(model), prompt)]:
            counts["ok"] += 1
        else:
            counts["mismatch"] += 1
    return counts


class Churner(threading.Thread):
    """Until stopped: reload `reloaded` (each load is a new version, so replicas re-read it and drop
    the old one) and unload then load `cycled`, through the management API."""

    def __init__(self, base: str, reloaded: list[str], cycled: list[str], pause_s: float = 0.02,
                 max_cycles: int | None = None) -> None:
        super().__init__(daemon=True)
        self.base, self.reloaded, self.cycled, self.pause_s = base, reloaded, cycled, pause_s
        self.max_cycles = max_cycles
        self.cycles = 0
        self.statuses: Counter = Counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, headers=TOKEN, timeout=30) as http:
            while not self._stop_event.is_set() and (self.max_cycles is None or self.cycles < self.max_cycles):
                for name in self.reloaded:
                    self._post(http, "load", name)
                for name in self.cycled:
                    self._post(http, "unload", name)
                    self._post(http, "load", name)
                self.cycles += 1
                self._stop_event.wait(self.pause_s)

    def _post(self, http: httpx.Client, action: str, name: str) -> None:
        try:
            self.statuses[f"{action}:{http.post(f'/v1/adapters/{action}', json={'name': name}).status_code}"] += 1
        except httpx.HTTPError as error:
            self.statuses[f"{action}:{type(error).__name__}"] += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)
