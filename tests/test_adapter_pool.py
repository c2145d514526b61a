"""AdapterPool: registry, host cache, device slots, LRU eviction, pinning, counters, threads."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

from flora_core import adapter_pool as adapter_pool_module
from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_io import save_adapter
from flora_core.adapter_pool import AdapterPool, PoolExhaustedError, PoolLimits, UnknownAdapterError
from flora_core.adapter_weights import AdapterKind, AdapterWeights, Ia3Module, LoraModule
from flora_core.multi_adapter_linear import MultiAdapterLinear, SlotCapacity
from flora_core.patching import adapter_batch_scope, patch_model
from tests.factories import random_adapter, tiny_llama
from tests.reference import per_row_logits

LORA, FLORA, IA3 = AdapterKind.LORA, AdapterKind.FLORA, AdapterKind.IA3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CAPACITY = SlotCapacity(lora_slots=2, lora_max_rank=8, flora_slots=2, flora_max_rank=4, ia3_slots=2)


# ---------------------------------------------------------------- helpers


def shapes_of(layers, names=None) -> dict[str, tuple[int, int]]:
    names = layers if names is None else names
    return {name: (layers[name].d_in, layers[name].d_out) for name in names}


def expected_slot(layer: MultiAdapterLinear, kind: AdapterKind, module) -> dict[str, torch.Tensor]:
    """The slot tensors of `layer` for one module's weights (None: neutral), built by hand."""
    d_in, d_out, cap = layer.d_in, layer.d_out, layer.capacity
    if kind is LORA:
        a, b = torch.zeros(cap.lora_max_rank, d_in), torch.zeros(cap.lora_max_rank, d_out)  # B stored transposed
        if module is not None:
            a[: module.rank], b[: module.rank] = module.a, (module.b * module.scale).t()
        return {"lora_a": a, "lora_b": b}
    if kind is FLORA:
        f_in, f_out = torch.zeros(cap.flora_max_rank, d_in), torch.zeros(cap.flora_max_rank, d_out)
        if module is None:
            f_in[0], f_out[0] = 1.0, 1.0
        else:
            f_in[: module.rank], f_out[: module.rank] = module.flora_in, module.flora_out / module.rank
        return {"flora_in": f_in, "flora_out": f_out}
    scale_in, scale_out = torch.ones(d_in), torch.ones(d_out)
    if module is not None:
        (scale_in if module.on_input else scale_out).copy_(module.scale)
    return {"ia3_in": scale_in, "ia3_out": scale_out}


def assert_slot_holds(layers, kind: AdapterKind, slot: int, adapter: AdapterWeights | None) -> None:
    """Every layer's slot holds exactly `adapter`'s module there (neutral where it has none)."""
    for name, layer in layers.items():
        module = None if adapter is None else adapter.modules.get(name)
        for buffer, expected in expected_slot(layer, kind, module).items():
            torch.testing.assert_close(getattr(layer, buffer)[slot], expected, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{name}.{buffer}[{slot}]: {m}")


def assert_all_neutral(layers) -> None:
    for kind in AdapterKind:
        for slot in range(CAPACITY.num_slots(kind)):
            assert_slot_holds(layers, kind, slot, None)


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama(seed=0)


@pytest.fixture
def patched(base_model):
    model = copy.deepcopy(base_model)
    layers = patch_model(model, TARGETS, CAPACITY)
    return model, layers


@pytest.fixture
def layers(patched):
    return patched[1]


@pytest.fixture
def pool(layers):
    return AdapterPool(layers, CAPACITY)


def lora(layers, seed: int, rank: int = 4, only=None) -> AdapterWeights:
    return random_adapter(LORA, shapes_of(layers, only), rank=rank, seed=seed)


# ---------------------------------------------------------------- counters and LRU


def test_hits_loads_evictions_are_counted(pool, layers):
    for i, name in enumerate("abc"):
        pool.register(name, lora(layers, seed=i))
    assert pool.acquire(["a"]) == [AdapterSlot(LORA, 0)]
    pool.release(["a"])
    assert pool.acquire(["a", None]) == [AdapterSlot(LORA, 0), None]
    pool.release(["a", None])
    with pool.pinned(["b"]) as slots:
        assert slots == [AdapterSlot(LORA, 1)]
    stats = pool.stats()
    assert (stats.hits, stats.loads, stats.evictions) == (1, 2, 0)
    with pool.pinned(["c"]) as slots:  # both slots taken: evicts a, the least recently used
        assert slots == [AdapterSlot(LORA, 0)]
    stats = pool.stats()
    assert (stats.hits, stats.loads, stats.evictions) == (1, 3, 1)
    assert stats.resident == {LORA: 2, FLORA: 0, IA3: 0}
    assert (stats.pinned, stats.registered, stats.disk_reads) == (0, 3, 0)
    assert set(pool.resident()) == {"b", "c"}


def test_lru_order_follows_last_use(pool, layers):
    for i, name in enumerate("abc"):
        pool.register(name, lora(layers, seed=i))
    pool.acquire(["a"])
    pool.acquire(["b"])
    pool.release(["b"])
    pool.release(["a"])  # a was used last (its release comes after b's)
    pool.acquire(["c"])
    assert set(pool.resident()) == {"a", "c"}
    pool.release(["c"])
    with pool.pinned(["a"]):  # a hit makes a the most recent again: c goes next
        pass
    pool.register("d", lora(layers, seed=3))
    pool.acquire(["d"])
    assert set(pool.resident()) == {"a", "d"}
    assert pool.resident()["d"] == AdapterSlot(LORA, 1)  # c's old slot


def test_same_name_twice_pins_twice(pool, layers):
    pool.register("a", lora(layers, seed=0))
    assert pool.acquire(["a", "a"]) == [AdapterSlot(LORA, 0)] * 2
    assert pool.info("a").pins == 2
    pool.release(["a"])
    with pytest.raises(ValueError, match="pinned 1"):
        pool.evict("a")
    pool.release(["a"])
    with pytest.raises(ValueError, match="cannot release 'a'"):
        pool.release(["a"])
    assert pool.evict("a") is True
    assert pool.evict("a") is False


def test_pinned_adapters_are_never_evicted(pool, layers):
    adapters = {name: lora(layers, seed=i) for i, name in enumerate("abc")}
    adapters["f"] = random_adapter(FLORA, shapes_of(layers), rank=2, seed=9)
    for name, adapter in adapters.items():
        pool.register(name, adapter)
    pool.acquire(["a", "b"])
    before = pool.resident()
    with pytest.raises(PoolExhaustedError, match=r"all 2 lora slots.*lora_slots"):
        pool.acquire(["f", "a", "c"])  # f loads and a is pinned again before c fails
    stats = pool.stats()
    assert stats.evictions == 0
    assert {n: s for n, s in pool.resident().items() if s.kind is LORA} == before
    assert pool.info("a").pins == 1 and pool.info("f").pins == 0  # this call's pins rolled back
    assert_slot_holds(layers, LORA, before["a"].slot, adapters["a"])
    pool.release(["a", "b"])
    assert pool.acquire(["c"]) == [before["a"]]  # once released, a (least recent) makes room


def test_one_call_needing_more_slots_than_exist_rolls_back(pool, layers):
    for i, name in enumerate("abc"):
        pool.register(name, lora(layers, seed=i))
    with pytest.raises(PoolExhaustedError):
        pool.acquire(["a", "b", "c"])
    assert pool.stats().pinned == 0
    assert all(pool.info(name).pins == 0 for name in "abc")


# ---------------------------------------------------------------- what the slots hold


@pytest.mark.parametrize("kind", list(AdapterKind))
def test_reused_slot_holds_only_the_new_adapter(layers, kind):
    capacity = CAPACITY
    pool = AdapterPool(layers, capacity)
    names = list(layers)
    max_rank = capacity.max_rank(kind)
    first = random_adapter(kind, shapes_of(layers), rank=max_rank, seed=1)  # every layer, full rank
    second = random_adapter(kind, shapes_of(layers, names[::3]), rank=1, seed=2)  # a third of them
    third = random_adapter(kind, shapes_of(layers, names[1::2]), rank=max(1, max_rank // 2), seed=3)
    for name, adapter in zip(("first", "second", "third"), (first, second, third)):
        pool.register(name, adapter)
    with pool.pinned(["first", "second"]) as slots:
        assert_slot_holds(layers, kind, slots[0].slot, first)
        assert_slot_holds(layers, kind, slots[1].slot, second)
    [slot] = pool.acquire(["third"])  # evicts first, the least recently used
    assert slot.slot == 0 and "first" not in pool.resident()
    assert_slot_holds(layers, kind, 0, third)
    assert_slot_holds(layers, kind, 1, second)


def test_after_every_eviction_slots_and_outputs_are_neutral(patched, base_model):
    model, layers = patched
    pool = AdapterPool(layers, CAPACITY)
    for i, kind in enumerate([LORA, LORA, FLORA, FLORA, IA3, IA3]):
        pool.register(f"{kind.value}{i}", random_adapter(kind, shapes_of(layers), rank=2, seed=i))
    slots = pool.acquire(pool.names())
    input_ids = torch.randint(0, 128, (len(slots), 5), generator=torch.Generator().manual_seed(0))
    base_logits = base_model(input_ids=input_ids).logits
    batch = AdapterBatch.from_rows(slots, tokens_per_row=5)
    with torch.no_grad(), adapter_batch_scope(layers.values(), batch):
        adapted = model(input_ids=input_ids).logits
    for row in range(len(slots)):  # every adapter really changes its row
        assert not torch.allclose(adapted[row], base_logits[row], atol=1e-3)
    pool.release(pool.names())
    assert all(pool.evict(name) for name in pool.names())
    assert_all_neutral(layers)
    for layer in layers.values():
        table = layer.slot_table
        assert table.lora_rank == (0, 0) and table.flora_rank == (0, 0)
        assert table.ia3_in == (False, False) and table.ia3_out == (False, False)
    with torch.no_grad(), adapter_batch_scope(layers.values(), batch):
        freed = model(input_ids=input_ids).logits
    torch.testing.assert_close(freed, base_logits, rtol=1e-5, atol=1e-5)


def test_churned_slots_match_the_per_row_reference(patched, base_model):
    model, layers = patched
    pool = AdapterPool(layers, CAPACITY)
    names = list(layers)
    adapters = {
        "l-all": random_adapter(LORA, shapes_of(layers), rank=8, seed=1),
        "l-some": random_adapter(LORA, shapes_of(layers, names[::2]), rank=3, seed=2),
        "l-new": random_adapter(LORA, shapes_of(layers, names[1::3]), rank=5, seed=3),
        "f-all": random_adapter(FLORA, shapes_of(layers), rank=4, seed=4),
        "f-new": random_adapter(FLORA, shapes_of(layers, names[:3]), rank=1, seed=5),
        "i-some": random_adapter(IA3, shapes_of(layers, names[2:]), seed=6),
    }
    for name, adapter in adapters.items():
        pool.register(name, adapter)
    with pool.pinned(["l-all", "l-some", "f-all"]):
        pass
    rows = ["l-new", None, "f-new", "l-some", "i-some", "l-new"]  # l-new reuses l-all's slot
    slots = pool.acquire(rows)
    assert slots[0] == AdapterSlot(LORA, 0) and slots[2] == AdapterSlot(FLORA, 1)
    input_ids = torch.randint(0, 128, (len(rows), 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapter_batch_scope(layers.values(), AdapterBatch.from_rows(slots, 6)):
        logits = model(input_ids=input_ids).logits
    expected = per_row_logits(base_model, [adapters.get(name) for name in rows], input_ids)
    torch.testing.assert_close(logits.double(), expected.double(), rtol=1e-4, atol=1e-4)
    pool.release(rows)


# ---------------------------------------------------------------- disk and host cache


@pytest.fixture
def on_disk(tmp_path, layers):
    """Three LoRA adapters saved as directories; name -> (path, weights)."""
    saved = {}
    for i, name in enumerate(("a", "b", "c")):
        adapter = lora(layers, seed=10 + i, rank=2 + i)
        save_adapter(adapter, tmp_path / name)
        saved[name] = (tmp_path / name, adapter)
    return saved


def test_registry_reads_disk_lazily_and_once(pool, layers, on_disk, tmp_path, monkeypatch):
    reads = []
    real_load = adapter_pool_module.load_adapter
    monkeypatch.setattr(adapter_pool_module, "load_adapter",
                        lambda path, **kw: reads.append(path) or real_load(path, **kw))
    for name, (path, _) in on_disk.items():
        pool.register(name, path)
    pool.register("missing", tmp_path / "not-there")  # registering never touches the disk
    pool.register("a", on_disk["a"][0])  # same source again: a no-op
    assert reads == [] and pool.stats().disk_reads == 0
    assert pool.names() == ["a", "b", "c", "missing"]
    pool.acquire(["a", "a"])
    assert reads == [on_disk["a"][0]] and pool.stats().disk_reads == 1
    assert_slot_holds(layers, LORA, 0, on_disk["a"][1])
    pool.release(["a", "a"])
    assert pool.evict("a")
    with pool.pinned(["a"]):  # read again from the host cache, not from disk
        assert_slot_holds(layers, LORA, 0, on_disk["a"][1])
    assert pool.stats().disk_reads == 1
    assert pool.prefetch_to_host("b") is True and pool.prefetch_to_host("b") is False
    info = pool.info("c")  # kind and rank need the weights: one read
    assert (info.kind, info.rank, info.resident, info.pinned) == (LORA, 4, False, False)
    with pool.pinned(["b", "c"]):
        pass
    assert pool.stats().disk_reads == 3 and len(reads) == 3
    with pytest.raises(ValueError, match="not a directory"):
        pool.acquire(["a", "missing"])
    assert pool.stats().pinned == 0


def test_host_cache_limit_drops_copies_that_load_again_from_disk(layers, on_disk):
    one_adapter = max(adapter.num_bytes for _, adapter in on_disk.values())
    capacity = SlotCapacity(lora_slots=1, lora_max_rank=8, flora_slots=1, flora_max_rank=4, ia3_slots=1)
    pool = AdapterPool(layers, capacity, PoolLimits(max_host_bytes=one_adapter))
    for name, (path, _) in on_disk.items():
        pool.register(name, path)
    with pool.pinned(["a"]):
        pass
    with pool.pinned(["b"]):  # evicts a from the device, its host copy from the host cache
        pass
    stats = pool.stats()
    assert (stats.disk_reads, stats.host_cache_evictions, stats.evictions, stats.host_cached) == (2, 1, 1, 1)
    assert stats.host_bytes <= one_adapter
    with pool.pinned(["a"]) as [slot]:
        assert_slot_holds(layers, LORA, slot.slot, on_disk["a"][1])
    assert pool.stats().disk_reads == 3


def test_adapter_over_max_bytes_is_refused(layers, on_disk):
    limits = PoolLimits(max_adapter_bytes=on_disk["a"][1].num_bytes)
    pool = AdapterPool(layers, CAPACITY, limits)
    pool.register("c", on_disk["c"][0])
    with pytest.raises(ValueError):
        pool.acquire(["c"])
    with pytest.raises(ValueError, match="max_adapter_bytes"):
        pool.register("c-mem", on_disk["c"][1])
    assert pool.resident() == {} and pool.stats().pinned == 0


# ---------------------------------------------------------------- validation


def test_rank_above_capacity_is_a_value_error(pool, layers, tmp_path):
    with pytest.raises(ValueError, match=r"'big'.*rank 16.*lora_max_rank"):
        pool.register("big", lora(layers, seed=0, rank=16))
    with pytest.raises(ValueError, match=r"'wide'.*rank 5.*flora_max_rank"):
        pool.register("wide", random_adapter(FLORA, shapes_of(layers), rank=5))
    save_adapter(lora(layers, seed=0, rank=16), tmp_path / "big")
    pool.register("big", tmp_path / "big")
    with pytest.raises(ValueError, match="16"):
        pool.acquire(["big"])
    assert pool.resident() == {} and pool.stats().loads == 0


def test_adapter_that_does_not_fit_the_model_is_refused(pool):
    q_proj = LoraModule(torch.zeros(2, 7), torch.zeros(32, 2), 1.0)  # d_in 7, the layer's is 32
    wrong = AdapterWeights(LORA, {"model.layers.0.self_attn.q_proj": q_proj})
    with pytest.raises(ValueError, match="does not fit"):
        pool.register("wrong", wrong)
    elsewhere = AdapterWeights(IA3, {"lm_head": Ia3Module(torch.ones(128), on_input=False)})
    with pytest.raises(ValueError, match="does not fit"):
        pool.register("elsewhere", elsewhere)


def test_unknown_names_raise_unknown_adapter_error(pool, layers):
    pool.register("a", lora(layers, seed=0))
    with pytest.raises(UnknownAdapterError, match="'nope'") as caught:
        pool.acquire(["a", "nope"])
    assert isinstance(caught.value, KeyError) and "register" in str(caught.value)
    assert pool.stats().pinned == 0 and pool.stats().loads == 0
    for call in (pool.info, pool.evict, pool.unregister, pool.prefetch_to_host):
        with pytest.raises(UnknownAdapterError):
            call("nope")


def test_register_validates_names_sources_and_limits(layers):
    pool = AdapterPool(layers, CAPACITY, PoolLimits(max_registered=2))
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="non-empty str"):
            pool.register(bad, lora(layers, seed=0))
    with pytest.raises(ValueError, match="pathlib.Path"):
        pool.register("a", 42)
    first, second = lora(layers, seed=0), lora(layers, seed=1, rank=2)
    pool.register("a", first)
    with pytest.raises(ValueError, match="replace=True"):
        pool.register("a", second)
    pool.acquire(["a"])
    with pytest.raises(ValueError, match="pinned"):
        pool.register("a", second, replace=True)
    with pytest.raises(ValueError, match="pinned"):
        pool.unregister("a")
    pool.release(["a"])
    pool.register("a", second, replace=True)  # frees the old weights' slot
    assert pool.resident() == {} and pool.info("a").rank == 2
    assert_slot_holds(layers, LORA, 0, None)
    pool.register("b", first)
    with pytest.raises(ValueError, match="max_registered=2"):
        pool.register("c", first)
    pool.unregister("b")
    assert not pool.is_registered("b") and pool.is_registered("a")
    with pytest.raises(ValueError, match="max_registered"):
        PoolLimits(max_registered=0)


def test_replacing_a_name_with_the_same_path_reads_its_files_again(pool, layers, on_disk, tmp_path):
    """A folder rewritten in place and registered again with replace=True: the new files, not the old copies."""
    folder = tmp_path / "retrained"
    save_adapter(on_disk["a"][1], folder)
    pool.register("x", folder)
    with pool.pinned(["x"]):
        pass
    save_adapter(on_disk["b"][1], folder)
    pool.register("x", folder)  # without replace: the same source, nothing to do
    with pool.pinned(["x"]) as [slot]:
        assert_slot_holds(layers, LORA, slot.slot, on_disk["a"][1])
    pool.register("x", folder, replace=True)
    assert pool.resident() == {}
    with pool.pinned(["x"]) as [slot]:
        assert_slot_holds(layers, LORA, slot.slot, on_disk["b"][1])


def test_an_acquire_that_must_wait_for_a_slot_reads_no_disk(layers, on_disk):
    """Every slot of the kind pinned: the adapter's kind is known from its first read, so a waiting
    request's acquire (once a step) fails before reading its files again."""
    capacity = SlotCapacity(lora_slots=1, lora_max_rank=8, flora_slots=1, flora_max_rank=4, ia3_slots=1)
    pool = AdapterPool(layers, capacity, PoolLimits(max_host_bytes=0))  # no host copies: every load reads
    for name, (path, _) in on_disk.items():
        pool.register(name, path)
    pool.info("b")  # its kind is known from here on
    reads = pool.stats().disk_reads
    with pool.pinned(["a"]):
        for _ in range(3):
            with pytest.raises(PoolExhaustedError) as raised:
                pool.acquire(["b"])
            assert raised.value.kind is LORA
    assert pool.stats().disk_reads == reads + 1  # a's load only
    copied = pickle.loads(pickle.dumps(raised.value))  # as Ray ships an exception
    assert (type(copied), str(copied), copied.kind) == (PoolExhaustedError, str(raised.value), LORA)
    assert pool.stats().pinned == 0
    with pool.pinned(["b"]) as [slot]:
        assert_slot_holds(layers, LORA, slot.slot, on_disk["b"][1])


def test_a_read_that_fails_after_its_name_is_registered_anew_raises_nothing(pool, on_disk, tmp_path, monkeypatch):
    """The old source's error is not the new one's: the loader thread's read reports False instead."""
    broken = tmp_path / "broken"
    broken.mkdir()
    pool.register("x", broken)
    real_read = pool._read

    def read_then_reregister(name, source):
        pool.register("x", on_disk["a"][0], replace=True)
        return real_read(name, source)

    monkeypatch.setattr(pool, "_read", read_then_reregister)
    assert pool.prefetch_to_host("x") is False
    monkeypatch.setattr(pool, "_read", real_read)
    with pytest.raises(ValueError):  # the old source does fail to read
        real_read("x", broken)
    assert pool.prefetch_to_host("x") is True


# ---------------------------------------------------------------- threads


def test_concurrent_acquire_release_and_prefetch(layers, on_disk):
    pool = AdapterPool(layers, CAPACITY, PoolLimits(max_host_bytes=on_disk["a"][1].num_bytes * 2))
    for name, (path, _) in on_disk.items():
        pool.register(name, path)
    weights = {name: adapter for name, (_, adapter) in on_disk.items()}
    for i in range(3):
        weights[f"f{i}"] = random_adapter(FLORA, shapes_of(layers), rank=1 + i, seed=20 + i)
        pool.register(f"f{i}", weights[f"f{i}"])
    names, errors = pool.names(), []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(40):
            picks = [names[int(i)] for i in torch.randint(0, len(names), (2,), generator=gen)]
            try:
                with pool.pinned(picks) as slots:
                    for name, slot in zip(picks, slots):
                        assert pool.resident()[name] == slot
            except PoolExhaustedError:
                pass
            except BaseException as err:  # noqa: BLE001 - surfaced by the main thread
                errors.append(err)

    def prefetcher() -> None:
        for _ in range(20):
            for name in on_disk:
                pool.prefetch_to_host(name)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)] + [threading.Thread(target=prefetcher)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pool.stats().pinned == 0
    for name, slot in pool.resident().items():
        assert_slot_holds(layers, slot.kind, slot.slot, weights[name])


# ---------------------------------------------------------------- random sequences


SMALL_CAPACITY = SlotCapacity(lora_slots=2, lora_max_rank=4, flora_slots=1, flora_max_rank=3, ia3_slots=2)


def small_layers() -> dict[str, MultiAdapterLinear]:
    torch.manual_seed(0)
    return {f"l{i}": MultiAdapterLinear(nn.Linear(6, 5), SMALL_CAPACITY) for i in range(3)}


# name -> (kind, rank, the layers it targets): mixed ranks, some layers left untouched
SMALL_SPECS = {
    "lora0": (LORA, 1, slice(None)), "lora1": (LORA, 4, slice(0, 1)), "lora2": (LORA, 2, slice(1, None)),
    "flora0": (FLORA, 3, slice(None)), "flora1": (FLORA, 1, slice(2, None)),
    "ia30": (IA3, 1, slice(0, 2)), "ia31": (IA3, 1, slice(None)), "ia32": (IA3, 1, slice(1, 2)),
}
SMALL_NAMES = sorted(SMALL_SPECS)


def small_adapters(layers) -> dict[str, AdapterWeights]:
    names = list(layers)
    return {name: random_adapter(kind, shapes_of(layers, names[only]), rank=rank, seed=i)
            for i, (name, (kind, rank, only)) in enumerate(SMALL_SPECS.items())}


class PoolMachine(RuleBasedStateMachine):
    """Random acquire/release/evict sequences against a model of the pins."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = small_layers()
        self.adapters = small_adapters(self.layers)
        self.pool = AdapterPool(self.layers, SMALL_CAPACITY)
        for name, adapter in self.adapters.items():
            self.pool.register(name, adapter)
        self.held: list[list[str | None]] = []  # one entry per successful acquire
        self.pinned_slot: dict[str, AdapterSlot] = {}

    def pins(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for names in self.held:
            for name in names:
                if name is not None:
                    counts[name] = counts.get(name, 0) + 1
        return counts

    def would_exhaust(self, names) -> bool:
        wanted = set(self.pins()) | {name for name in names if name is not None}
        return any(
            sum(1 for name in wanted if self.adapters[name].kind is kind) > SMALL_CAPACITY.num_slots(kind)
            for kind in AdapterKind
        )

    @rule(names=st.lists(st.sampled_from([None, *SMALL_NAMES]), max_size=4))
    def acquire(self, names):
        if self.would_exhaust(names):
            with pytest.raises(PoolExhaustedError):
                self.pool.acquire(names)
            return
        slots = self.pool.acquire(names)
        for name, slot in zip(names, slots):
            assert (slot is None) == (name is None)
            if name is not None:
                assert slot.kind is self.adapters[name].kind
                assert self.pinned_slot.setdefault(name, slot) == slot  # stable while pinned
        self.held.append(names)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(min_value=0))
    def release(self, index):
        names = self.held.pop(index % len(self.held))
        self.pool.release(names)
        for name in set(names) - set(self.pins()) - {None}:
            del self.pinned_slot[name]

    @rule(name=st.sampled_from(SMALL_NAMES))
    def release_unpinned(self, name):
        if name not in self.pins():
            with pytest.raises(ValueError):
                self.pool.release([name])

    @rule(name=st.sampled_from(SMALL_NAMES))
    def evict(self, name):
        was_resident = name in self.pool.resident()
        if name in self.pins():
            with pytest.raises(ValueError):
                self.pool.evict(name)
        else:
            assert self.pool.evict(name) is was_resident
            assert name not in self.pool.resident()

    @invariant()
    def pinned_adapters_stay_in_their_slot(self):
        resident = self.pool.resident()
        for name, slot in self.pinned_slot.items():
            assert resident[name] == slot
        assert self.pool.stats().pinned == len(self.pins())

    @invariant()
    def slots_are_within_capacity_and_unshared(self):
        resident = self.pool.resident()
        assert len(set(resident.values())) == len(resident)
        for kind in AdapterKind:
            of_kind = [slot for slot in resident.values() if slot.kind is kind]
            assert len(of_kind) <= SMALL_CAPACITY.num_slots(kind)
            assert all(0 <= slot.slot < SMALL_CAPACITY.num_slots(kind) for slot in of_kind)

    @invariant()
    def slot_tensors_hold_exactly_the_resident_adapters(self):
        by_slot = {slot: name for name, slot in self.pool.resident().items()}
        for kind in AdapterKind:
            for index in range(SMALL_CAPACITY.num_slots(kind)):
                name = by_slot.get(AdapterSlot(kind, index))
                assert_slot_holds(self.layers, kind, index, None if name is None else self.adapters[name])


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
