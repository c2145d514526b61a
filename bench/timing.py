"""Timing shared by the benchmarks: interleaved medians with a time budget, CUDA events on a GPU.

    timer = Timer(torch.device("cuda"), rounds=15, budget_s=1.0)
    ms = timer.compare({"base": (lambda: base(x), None), "ours": (lambda: layer(x, batch=batch), None)})

With `cuda_graphs=True` a GPU call is captured once into a CUDA graph and its replays are timed:
what the kernels cost without Python's and the launches' share, as in a server that captures its
decode step (vLLM does). A call that cannot be captured is timed eagerly and named, with why, in
`timed_eagerly`; so is a call with a setup to run before it, or one named in `never_capture`. A call
must not copy from host memory: its graph would re-read host memory freed since and compute on
garbage. `NoHostCopies` refuses such copies during capture where the dispatcher sees them (`.to`,
`copy_`); tensors made on the device from Python data (`torch.tensor(list, device=...)`, indexing
with a list, as PEFT's mixed batch does) are made before it can, so such calls go in never_capture.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


Call = tuple[Callable[[], object], Optional[Callable[[], object]]]  # (timed fn, untimed setup run before it)


@dataclass(frozen=True)
class Timer:
    """Median wall time of calls, in ms: CUDA events and a synchronize on a GPU, perf_counter on the CPU.

    `compare` interleaves the calls it is given, one of each per round, so that a burst of load
    from elsewhere on a shared machine lands on all of them alike, and rotates their order each
    round, so that no call always runs right after the same one (after the base model, say, whose
    pass leaves the adapters' factors out of the CPU's caches). After `warmup` untimed rounds
    it runs at least `min_rounds` timed rounds and at most `rounds`, stopping once the timed
    calls have taken `budget_s` per call on average (slow cases get fewer samples).
    """

    device: torch.device
    rounds: int = 15
    min_rounds: int = 3
    warmup: int = 1
    budget_s: float = 1.0
    cuda_graphs: bool = False  # on a GPU: time replays of each call (with no setup) captured after the warmup
    never_capture: frozenset[str] = frozenset()  # calls that copy from host memory where NoHostCopies cannot see
    timed_eagerly: list[tuple[str, str]] = field(default_factory=list)  # with cuda_graphs: (call, why) not captured

    def compare(self, calls: Mapping[str, Call]) -> dict[str, float]:
        """The median ms of each call; its setup (e.g. resetting a KV cache) runs untimed before it."""
        for _ in range(self.warmup):
            for fn, before in calls.values():
                self._once_ms(fn, before)
        if self.cuda_graphs and self.device.type == "cuda":
            calls = {name: (self._eager(name, fn, "copies from host memory") if name in self.never_capture
                            else self._eager(name, fn) if before is not None else self._captured(name, fn), before)
                     for name, (fn, before) in calls.items()}
        samples: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        spent_ms, rounds = 0.0, 0
        while rounds < self.rounds and (rounds < self.min_rounds or spent_ms < self.budget_s * 1e3 * len(calls)):
            for name in names[rounds % len(names):] + names[:rounds % len(names)]:
                samples[name].append(self._once_ms(*calls[name]))
                spent_ms += samples[name][-1]
            rounds += 1
        return {name: statistics.median(values) for name, values in samples.items()}

    def _captured(self, name: str, fn: Callable[[], object]) -> Callable[[], object]:
        """fn's CUDA graph's replay, or fn itself where it cannot be captured (noted in timed_eagerly)."""
        side = torch.cuda.Stream(self.device)  # warm up off the default stream, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), NoHostCopies():
                fn()
        except RuntimeError as error:
            torch.cuda.synchronize(self.device)
            return self._eager(name, fn, f"capture failed: {str(error).splitlines()[0] if str(error) else error!r}")
        return graph.replay

    def _eager(self, name: str, fn: Callable[[], object], why: str = "has an untimed setup") -> Callable[[], object]:
        self.timed_eagerly.append((name, why))
        return fn

    def _once_ms(self, fn: Callable[[], object], before: Optional[Callable[[], object]]) -> float:
        if before is not None:
            before()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end)
        start_s = time.perf_counter()
        fn()
        return (time.perf_counter() - start_s) * 1e3


class NoHostCopies(TorchDispatchMode):
    """Raises on an op that reads host memory into `device_type` (a copy from host memory), before it runs."""

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs or {}))
        on_host = any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0  # 0-dim: scalars
                      for t in leaves)
        on_device = any(isinstance(t, torch.Tensor) and t.device.type == self.device_type
                        or isinstance(t, torch.device) and t.type == self.device_type for t in leaves)
        if on_host and on_device:
            raise RuntimeError(f"{func} copies from host memory, which a CUDA graph would re-read after it is freed")
        return func(*args, **(kwargs or {}))


def interleaved(points: list, rounds: int) -> list[tuple[int, object]]:
    """(round, point) for `rounds` rounds over points, each round rotated by one, so none always runs first.

    For benchmarks whose points run for seconds each: a drift in the machine's load over minutes
    then lands on every point alike, and the median round of each point is compared.
    """
    order = []
    for k in range(rounds):
        shift = k % len(points)
        order += [(k, p) for p in points[shift:] + points[:shift]]
    return order


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return None


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device (a GPU where one is present) and --dtype (float32 on the CPU, bfloat16 on a GPU)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: float32 on the CPU, bfloat16 on a GPU")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype that add_device_arguments' options name."""
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def machine_info(device: torch.device) -> dict:
    """What the numbers ran on: CPU, cores, torch build and threads, GPU name, load averages."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_1_5_15": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
