"""The benchmarks' models, the engine benchmark's plan and the CUDA-graph timer, as a GPU session runs them.

Where no GPU is, these check on the CPU what a GPU run relies on: `llama-7b` has Llama-2-7B's
shapes; the engine benchmark runs every point in every round in bfloat16 (random float32
adapters written into bfloat16 slots, as on a GPU) with each adapter kind's rows served, and
profiles its LoRA point; the adapter-overhead run hands over its rows after each layer shape and
model, so that a GPU command cut short by its time limit keeps them. On a GPU (`bench/gpu_session.sh
check`), the timer replays what it can capture and names what it times eagerly.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.engine_load import floor_lines, run_model
from bench.overhead_model import build_base
from bench.timing import NoHostCopies, Timer

LLAMA_2_7B_PARAMETERS = 6_738_415_616  # Llama-2-7b-hf's count, embeddings and output head included


def test_llama_7b_has_llama_2_7b_shapes_and_is_built_on_the_device_asked_for():
    model = build_base("llama-7b", torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == LLAMA_2_7B_PARAMETERS
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_engine_benchmark_runs_every_point_each_round_in_bfloat16():
    rounds = 2
    results, profile_text = run_model("flora-tiny-llama", adapters=3, rank=4, concurrency=4, duration_s=0.3, seed=0,
                                      rounds=rounds, dora=True, flora=True, dtype=torch.bfloat16, warmup_s=0.1,
                                      profile_s=0.3)
    points = {(r["app"], r["workload"]) for r in results}
    assert points == {("engine", "base"), ("engine", "uniform-3"), ("engine_one_adapter_per_step", "uniform-3"),
                      ("engine", "dora-uniform-3"), ("engine", "flora-uniform-3")}
    assert sorted(r["round"] for r in results) == sorted(list(range(rounds)) * len(points))
    for row in results:
        assert row["output_tokens_per_s"] > 0, row
    one_per_step = [r for r in results if r["app"] == "engine_one_adapter_per_step"]
    mixed = [r for r in results if (r["app"], r["workload"]) == ("engine", "uniform-3")]
    assert max(r["mean_rows_per_step"] for r in one_per_step) < min(r["mean_rows_per_step"] for r in mixed)
    assert max(r["mean_adapters_per_step"] for r in one_per_step) < min(r["mean_adapters_per_step"] for r in mixed)
    assert "aten::mm" in profile_text  # the profiled LoRA point ran the model's matmuls
    # each adapter point's mean step has a bytes floor over its base bytes; rank-1 FLoRA reads less than rank-4 LoRA
    assert all(("bytes_floor" in r) == (r["workload"] != "base") for r in results)
    assert all(r["bytes_floor"] > 1 for r in results if r["workload"] != "base")
    floor_of = {(r["round"], r["workload"]): r["bytes_floor"] for r in results if r["app"] == "engine"
                and r["workload"] != "base"}
    assert all(floor_of[k, "flora-uniform-3"] < floor_of[k, "uniform-3"] for k in range(rounds)), floor_of
    report = floor_lines(results)
    assert "| engine flora-uniform-3 |" in "\n".join(report) and len(report) == 4 + len(points) - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@torch.inference_mode()  # as the benchmarks time their calls
def test_cuda_graph_timer_replays_captured_calls_and_names_those_it_times_eagerly():
    device = torch.device("cuda")
    layer = torch.nn.Linear(512, 512, device=device)
    x = torch.randn(16, 512, device=device)
    outputs: dict[str, torch.Tensor] = {}
    captured = (lambda: outputs.__setitem__("captured", layer(x)), None)
    host = torch.randn(16, 512)
    timer = Timer(device, rounds=3, min_rounds=3, budget_s=0.0, cuda_graphs=True, never_capture=frozenset({"named"}))
    ms = timer.compare({
        "captured": captured,
        "syncs": (lambda: layer(x).sum().item(), None),  # reads a value back: CUDA refuses the capture
        "from_host": (lambda: layer(host.to(device)), None),  # NoHostCopies refuses it
        "has_setup": (lambda: layer(x), lambda: None),
        "named": (lambda: layer(x), None),
    })
    assert set(ms) == {"captured", "syncs", "from_host", "has_setup", "named"} and min(ms.values()) > 0
    why = dict(timer.timed_eagerly)
    assert set(why) == {"syncs", "from_host", "has_setup", "named"}
    assert why["syncs"].startswith("capture failed") and "copies from host memory" in why["from_host"]
    # the output kept is the graph's own; only replays fill it (capture runs no kernel), on the new input
    x.copy_(torch.randn_like(x))
    Timer(device, rounds=1, min_rounds=1, budget_s=0.0, cuda_graphs=True).compare({"captured": captured})
    torch.testing.assert_close(outputs["captured"], layer(x))
    assert torch.ones(1, device=device).item() == 1  # the failed capture left the device usable


def test_timer_rotates_the_calls_so_each_runs_after_every_other_one():
    """A call run always right after the same one (the base model, which evicts the adapters' factors
    from the caches) would be timed cold every round; rotated, each call leads one round in n."""
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name), lambda: None) for name in ("base", "ours", "bmm")}
    ms = Timer(torch.device("cpu"), rounds=3, min_rounds=3, warmup=0, budget_s=0.0).compare(calls)
    assert set(ms) == set(calls)
    assert order == ["base", "ours", "bmm", "ours", "bmm", "base", "bmm", "base", "ours"]


def test_capture_guard_refuses_copies_from_host_memory_and_lets_device_work_and_scalars_through():
    """NoHostCopies on the meta device (a stand-in for CUDA here): what it refuses, before anything runs."""
    device_tensor, host_tensor = torch.ones(4, 3, device="meta"), torch.ones(4, 3)
    with NoHostCopies("meta"):
        assert (device_tensor * 2 + device_tensor * torch.tensor(3.0)).shape == (4, 3)  # 0-dim host: a scalar
        assert device_tensor.index_select(0, torch.arange(2, device="meta")).shape == (2, 3)
        assert (host_tensor + 1).device.type == "cpu"  # host-only work is no copy
        for copies_from_host in (lambda: host_tensor.to("meta"), lambda: device_tensor.copy_(host_tensor),
                                 lambda: device_tensor.index_select(0, torch.tensor([0, 2]))):
            with pytest.raises(RuntimeError, match="copies from host memory"):
                copies_from_host()


def test_adapter_overhead_hands_over_its_rows_after_each_layer_shape_and_model(tmp_path):
    """A GPU command has a time limit: the run writes what it has after each layer shape and model."""
    pytest.importorskip("matplotlib")  # the report's module draws the plots too
    from bench.adapter_overhead import Grid, run  # noqa: PLC0415
    from bench.overhead_report import write_markdown  # noqa: PLC0415
    from bench.result_files import write_results_so_far  # noqa: PLC0415

    grid = Grid(name="tiny", layer_shapes=("tiny-llama mlp 256x688",), layer_decode_batches=(1,), layer_prefill={},
                rank_sweep=False, models=("flora-tiny-llama",), model_decode_batches={"flora-tiny-llama": (1,)},
                model_prefill={"flora-tiny-llama": ()}, timer={"rounds": 1, "min_rounds": 1, "warmup": 0})
    snapshots = []
    rows = run(grid, torch.device("cpu"), torch.float32, checkpoint=lambda so_far: snapshots.append(list(so_far)))
    assert len(snapshots) == 2 and snapshots[1] == rows
    assert snapshots[0] == rows[:len(snapshots[0])] and {row["level"] for row in snapshots[0]} == {"layer"}
    assert {row["level"] for row in rows[len(snapshots[0]):]} == {"model"}
    assert all(row["bytes_floor"] > 1 for row in rows), rows  # every case here is a decode case
    machine = {"cpu": "test", "cpu_count": 2, "device": "cpu", "torch": torch.__version__, "torch_threads": 1,
               "dtype": "float32", "load_average_1_5_15": None, "load_average_after": None, "seconds": 1}
    unfinished = {"machine": machine, "command": "test", "grid": {"name": "tiny"}, "ran": grid.describe(),
                  "rows": snapshots[0], "finished": False}
    write_results_so_far(unfinished, tmp_path, "overhead", write_markdown)
    assert json.loads((tmp_path / "overhead.json").read_text())["rows"] == snapshots[0]
    assert "**Unfinished**" in (tmp_path / "overhead.md").read_text()
    write_markdown({**unfinished, "rows": rows, "finished": True}, tmp_path / "finished.md")
    assert "Unfinished" not in (tmp_path / "finished.md").read_text()


@pytest.mark.parametrize("device, batch", [("cpu", 32), ("cuda", 64)])
def test_the_targets_grid_holds_each_models_headline_cells_and_nothing_else(device, batch):
    """`--targets`, what a short GPU call runs: decode with every row its own adapter at the machine's headline
    batch, LoRA r16 and FLoRA r1, against PEFT and the base model, beside the one padded-slots cell."""
    from bench.adapter_overhead import CPU_GRID, GPU_GRID, PADDED_POOL_RANK, model_cases, targets_grid  # noqa: PLC0415
    from bench.overhead_report import headline_for  # noqa: PLC0415

    full = GPU_GRID if device == "cuda" else CPU_GRID
    grid = targets_grid(full, headline_for(device).batch)
    assert headline_for(device).batch == batch and grid.layer_shapes == () and grid.timer == full.timer
    for model in grid.models:
        cells = {(c.phase, c.batch, c.distinct, c.kind.value, c.rank, c.pool_rank): c.impls
                 for c in model_cases(grid, model)}
        assert set(cells) == {("decode", batch, batch, "lora", 16, 16), ("decode", batch, batch, "flora", 1, 16),
                              ("decode", 32, 32, "lora", 16, PADDED_POOL_RANK)}
        assert {"ours", "peft", "ours_no_adapter"} <= set(cells["decode", batch, batch, "lora", 16, 16])
        assert "ours" in cells["decode", batch, batch, "flora", 1, 16]


def test_bytes_floor_counts_what_a_decode_step_reads():
    """Llama-2-7B's shapes in bf16, worked out by hand: its weights (the untied embedding only for the batch's
    rows), the KV cache, and r * (d_in + d_out) numbers a layer for each adapter."""
    from bench.bytes_floor import adapter_bytes, bytes_floor, decode_bytes  # noqa: PLC0415

    model = build_base("llama-7b", torch.device("meta"), torch.bfloat16)  # untied, 32 layers of 4096 / 11008
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q k v o, gate up down, two norms
    weights = 32 * layer + 4096 + 32000 * 4096 + 64 * 4096  # final norm, lm_head, 64 embedding rows
    kv_cache = 64 * 128 * 32 * 2 * 32 * 128  # rows x context x layers x (keys, values) x heads x head_dim
    assert decode_bytes(model, batch=64, context=128) == 2 * (weights + kv_cache)
    shapes = {"q": (4096, 4096), "down": (11008, 4096)}
    assert adapter_bytes(shapes, rank=16, element_size=2) == 2 * 16 * (8192 + 15104)
    assert bytes_floor(100, 25) == 1.25
    tied = build_base("flora-tiny-llama", torch.device("cpu"), torch.float32)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    unique = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    config = tied.config
    kv_row = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
    assert decode_bytes(tied, batch=3, context=5) == 4 * (unique + 3 * 5 * kv_row)  # the table read once, whole
