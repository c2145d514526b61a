"""Weighted adapter merges: PEFT's add_weighted_adapter per format, the merged-weight reference, refusals.

A merged adapter is served like any other, so each check runs it in a mixed batch beside its own
components and base rows, and compares every row with its own reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel

from flora_core import (AdapterKind, AdapterWeights, FloraModule, Ia3Module, LoraModule, MergedSource,
                        MultiAdapterModel, SlotCapacity, load_adapter, merge_adapters, save_adapter)
from flora_core.patching import ALL_LINEAR, target_layer_shapes
from tests.factories import VOCAB, random_adapter, tiny_gpt2, tiny_llama
from tests.reference import merged_delta_weight, per_row_logits
from tests.test_peft_parity import TOLERANCE, save_peft_adapter, with_random_biases

CAPACITY = SlotCapacity(lora_slots=4, flora_slots=4, ia3_slots=4, lora_max_rank=16, flora_max_rank=16)
LORA_CONFIGS = {  # different ranks, scales, targets and patterns: "cat" must line each module up
    "llama": [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                         rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6}, init_lora_weights=False),
              LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False)],
    "gpt2": [LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False),
             LoraConfig(r=2, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                        init_lora_weights=False)],
}
BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
WEIGHTS = (0.7, -0.4)


def _input_ids(rows: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(3))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= TOLERANCE * max(1.0, expected.abs().max().item()), f"{what}: max error {err:.3g}"


def _assert_changes(output: torch.Tensor, other: torch.Tensor, what: str) -> None:
    effect = (output - other).abs().max().item()
    assert effect > 100 * TOLERANCE, f"{what} barely differs ({effect:.3g}): the test would be vacuous"


def _peft_merged_logits(base, directories, weights, input_ids, **merge_args) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directories[0], adapter_name="c0")
    for i, directory in enumerate(directories[1:], start=1):
        peft_model.load_adapter(directory, adapter_name=f"c{i}")
    names = [f"c{i}" for i in range(len(directories))]
    peft_model.add_weighted_adapter(names, list(weights), "merged", **merge_args)
    peft_model.set_adapter("merged")
    with torch.no_grad():
        return peft_model.eval()(input_ids=input_ids).logits


@pytest.mark.parametrize("arch", list(LORA_CONFIGS))
def test_lora_merge_equals_peft_cat_in_a_mixed_batch(arch, tmp_path):
    base = with_random_biases(BASES[arch]())
    directories = [tmp_path / f"c{i}" for i in range(2)]
    for seed, (config, directory) in enumerate(zip(LORA_CONFIGS[arch], directories)):
        save_peft_adapter(base, config, directory, seed)
    ours = MultiAdapterModel(copy.deepcopy(base), capacity=CAPACITY)
    ours.add_adapter("merged", MergedSource(tuple(directories), WEIGHTS))
    ours.add_adapter("c0", directories[0])
    rows = ["merged", "c0", None, "merged", "c0", "merged"]
    input_ids = _input_ids(len(rows))
    with torch.no_grad():
        logits = ours(input_ids, adapter_names=rows).logits

    merged_rows = [i for i, r in enumerate(rows) if r == "merged"]
    expected = _peft_merged_logits(base, directories, WEIGHTS, input_ids[merged_rows], combination_type="cat")
    _assert_close(logits[merged_rows], expected, "merged rows against PEFT's cat merge")
    c0_rows = [i for i, r in enumerate(rows) if r == "c0"]
    with torch.no_grad():
        c0_alone = PeftModel.from_pretrained(copy.deepcopy(base), directories[0]).eval()(
            input_ids=input_ids[c0_rows]).logits
        base_logits = base(input_ids=input_ids).logits
    _assert_close(logits[c0_rows], c0_alone, "component rows beside the merge")
    _assert_changes(logits[merged_rows], base_logits[merged_rows], "the merge against the base")
    _assert_changes(logits[merged_rows[0]], logits[c0_rows[0]], "the merge against its first component")

    saved = tmp_path / "saved"  # what we save loads in PEFT as the same adapter
    save_adapter(merge_adapters([load_adapter(d) for d in directories], WEIGHTS), saved)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), saved).eval()(input_ids=input_ids[merged_rows])
    _assert_close(reloaded.logits, expected, "our saved merge loaded by PEFT")


def test_rslora_merge_equals_peft_with_both_adapters_active(tmp_path):
    """rsLoRA: PEFT's own cat merge keeps use_rslora with lora_alpha = r, so it scales the merge by
    sqrt(sum r) (peft 0.21); the exact sum of deltas is PEFT running both adapters at once."""
    base = with_random_biases(tiny_llama())
    configs = [LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False),
               LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=["v_proj", "down_proj"],
                          init_lora_weights=False)]
    directories = [tmp_path / f"c{i}" for i in range(2)]
    for seed, (config, directory) in enumerate(zip(configs, directories)):
        save_peft_adapter(base, config, directory, seed)
    ours = MultiAdapterModel(copy.deepcopy(base), capacity=CAPACITY)
    ours.add_adapter("merged", MergedSource(tuple(directories), (1.0, 1.0)))
    input_ids = _input_ids(3)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directories[0], adapter_name="c0")
    peft_model.load_adapter(directories[1], adapter_name="c1")
    peft_model.base_model.set_adapter(["c0", "c1"])
    with torch.no_grad():
        logits = ours(input_ids, adapter_names=["merged", None, "merged"]).logits
        expected = peft_model.eval()(input_ids=input_ids[[0, 2]]).logits
    _assert_close(logits[[0, 2]], expected, "an rsLoRA merge against both adapters active in PEFT")
    _assert_changes(logits[[0, 2]], base(input_ids=input_ids[[0, 2]]).logits, "the merge against the base")


def test_ia3_merge_equals_peft_weighted_sum(tmp_path):
    base = with_random_biases(tiny_llama())
    configs = [IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False),
               IA3Config(target_modules=["v_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False)]
    directories = [tmp_path / f"c{i}" for i in range(2)]
    for seed, (config, directory) in enumerate(zip(configs, directories)):
        save_peft_adapter(base, config, directory, seed)
    weights = (0.6, 0.4)
    ours = MultiAdapterModel(copy.deepcopy(base), capacity=CAPACITY)
    ours.add_adapter("merged", MergedSource(tuple(directories), weights))
    ours.add_adapter("c1", directories[1])
    rows = [None, "merged", "c1", "merged"]
    input_ids = _input_ids(len(rows))
    with torch.no_grad():
        logits = ours(input_ids, adapter_names=rows).logits
        c1_alone = PeftModel.from_pretrained(copy.deepcopy(base), directories[1]).eval()(
            input_ids=input_ids[[2]]).logits
    expected = _peft_merged_logits(base, directories, weights, input_ids[[1, 3]])
    _assert_close(logits[[1, 3]], expected, "merged rows against PEFT's IA3 merge")
    _assert_close(logits[[2]], c1_alone, "the component row beside the merge")
    _assert_changes(logits[[1]], per_row_logits(base, [None], input_ids[[1]]), "the merge against the base")


def _expected_merged_weight(components, weights, name, weight):
    """W for one module from the formulas: LoRA deltas add, FLoRA and IA3 masks combine (float64)."""
    parts = [(a.modules[name], w) for a, w in zip(components, weights) if name in a.modules]
    merged = [merged_delta_weight(m, weight) for m, _ in parts]
    if components[0].kind is AdapterKind.LORA:
        return weight.double() + sum(w * (m - weight.double()) for m, (_, w) in zip(merged, parts))
    return sum(w * m for m, (_, w) in zip(merged, parts))


@pytest.mark.parametrize("kind", list(AdapterKind))
def test_merged_weights_follow_the_formula_for_every_kind(kind):
    shapes = target_layer_shapes(tiny_llama(), ALL_LINEAR)
    names = sorted(shapes)
    components = [random_adapter(kind, {n: shapes[n] for n in names[:9]}, rank=2, seed=1),
                  random_adapter(kind, {n: shapes[n] for n in names[4:]}, rank=4, seed=2),
                  random_adapter(kind, {n: shapes[n] for n in names[::3]}, rank=1, seed=3)]
    if kind is AdapterKind.LORA:  # an rsLoRA-like scale too: every component's own scale counts
        components[2] = AdapterWeights(kind, {n: LoraModule(m.a, m.b, scale=3.0) for n, m in
                                              components[2].modules.items()})
    weights = (0.5, -1.25, 2.0)
    merged = merge_adapters(components, weights)
    assert sorted(merged.modules) == names
    generator = torch.Generator().manual_seed(0)
    for name in names:
        d_in, d_out = shapes[name]
        weight = torch.randn(d_out, d_in, generator=generator)
        expected = _expected_merged_weight(components, weights, name, weight)
        got = merged_delta_weight(merged.modules[name], weight)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), f"{kind.value} {name}"


@pytest.mark.parametrize("kind", [AdapterKind.LORA, AdapterKind.FLORA])
def test_merge_in_a_mixed_batch_equals_the_per_row_reference(kind):
    base = tiny_llama()
    shapes = target_layer_shapes(base, ALL_LINEAR)
    components = [random_adapter(kind, shapes, rank=2, seed=5), random_adapter(kind, shapes, rank=3, seed=6)]
    merged = merge_adapters(components, (0.3, 0.7))
    ours = MultiAdapterModel(copy.deepcopy(base), capacity=CAPACITY)
    for name, adapter in {"merged": merged, "c0": components[0], "c1": components[1]}.items():
        ours.add_adapter(name, adapter)
    rows = ["c0", "merged", None, "c1", "merged"]
    input_ids = _input_ids(len(rows))
    with torch.no_grad():
        logits = ours(input_ids, adapter_names=rows).logits
    by_name = {"merged": merged, "c0": components[0], "c1": components[1], None: None}
    expected = per_row_logits(base, [by_name[r] for r in rows], input_ids)
    _assert_close(logits, expected, f"{kind.value} rows against the per-row reference")
    for other in (0, 2, 3):
        _assert_changes(logits[1], logits[other], f"the merged row against row {other}")


def test_merged_rank_over_the_slots_is_refused_with_the_fix(tmp_path):
    shapes = target_layer_shapes(tiny_llama(), ALL_LINEAR)
    for i, rank in enumerate((8, 12)):
        save_adapter(random_adapter(AdapterKind.LORA, shapes, rank=rank, seed=i), tmp_path / f"c{i}")
    ours = MultiAdapterModel(tiny_llama(), capacity=CAPACITY)
    ours.add_adapter("too-big", MergedSource((tmp_path / "c0", tmp_path / "c1"), (0.5, 0.5)))
    with pytest.raises(ValueError, match="rank 20 .* raise lora_max_rank"):
        ours(_input_ids(1), adapter_names=["too-big"])


def _lora(scale: float = 1.0, magnitude=None) -> AdapterWeights:
    return AdapterWeights(AdapterKind.LORA, {"m": LoraModule(torch.ones(1, 2), torch.ones(2, 1), scale, magnitude)})


@pytest.mark.parametrize("adapters, weights, message", [
    ([], [], "merge 1 to 16 adapters"),
    ([_lora()] * 17, [1.0] * 17, "merge 1 to 16 adapters"),
    ([_lora(), _lora()], [1.0], "weights has 1 entries for 2 adapters"),
    ([_lora()], [float("nan")], r"weights\[0\]=nan; pass a finite number"),
    ([_lora()], ["1"], r"weights\[0\]='1'"),
    ([_lora(), AdapterWeights(AdapterKind.IA3, {"m": Ia3Module(torch.ones(2), False)})], [1, 1], "mix kinds"),
    ([_lora(), _lora(magnitude=torch.ones(2))], [1, 1], r"adapters\[1\] is DoRA"),
    ([AdapterWeights(AdapterKind.IA3, {"m": Ia3Module(torch.ones(2), False)}),
      AdapterWeights(AdapterKind.IA3, {"m": Ia3Module(torch.ones(2), True)})], [1, 1], "agree on feedforward"),
    ([AdapterWeights(AdapterKind.FLORA, {})], [1.0], "has no modules"),
])
def test_bad_merges_name_the_field_and_the_fix(adapters, weights, message):
    with pytest.raises(ValueError, match=message):
        merge_adapters(adapters, weights)


def test_merged_source_checks_its_weights_and_compares_by_value(tmp_path):
    with pytest.raises(ValueError, match="weights has 1 entries for 2 adapters"):
        MergedSource((tmp_path, tmp_path), (1.0,))
    assert MergedSource((str(tmp_path),), [0.5]) == MergedSource((tmp_path,), (0.5,))


def test_flora_merge_keeps_the_base_where_weights_sum_to_one():
    """All-ones FLoRA factors are the base model; any weights summing to 1 keep it so."""
    ones = AdapterWeights(AdapterKind.FLORA, {"m": FloraModule(torch.ones(3, 4), torch.ones(3, 5))})
    merged = merge_adapters([ones, ones], (1.5, -0.5))
    weight = torch.randn(5, 4)
    assert torch.allclose(merged_delta_weight(merged.modules["m"], weight), weight.double())
