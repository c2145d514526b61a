"""Adapter directories: PEFT interop both ways, exact round trips, and every refusal path."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from flora_core.adapter_config import parse_adapter_config
from flora_core.adapter_io import check_adapter_fits, load_adapter, save_adapter
from flora_core.adapter_weights import AdapterKind, AdapterWeights, FloraModule, Ia3Module, LoraModule
from tests.factories import random_adapter, tiny_gpt2, tiny_llama
from tests.reference import merge_adapter

P = "base_model.model.model.layers.0.self_attn."
Q = "model.layers.0.self_attn.q_proj"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every Linear / Conv1D inside the transformer blocks."""
    shapes = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and name != "lm_head":
            shapes[name] = (layer.in_features, layer.out_features)
        elif isinstance(layer, Conv1D):
            shapes[name] = tuple(layer.weight.shape)
    return shapes


def peft_saved(tmp_path: Path, model: nn.Module, config) -> tuple[nn.Module, Path]:
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    return peft_model, tmp_path / "peft"


def assert_same(x: AdapterWeights, y: AdapterWeights) -> None:
    assert x.kind is y.kind and sorted(x.modules) == sorted(y.modules) and dict(x.config) == dict(y.config)
    for name, m in x.modules.items():
        for field_name, value in vars(m).items():
            other = getattr(y.modules[name], field_name)
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (name, field_name)
            else:
                assert value == other, (name, field_name)


def write_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


LORA_CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
GOOD_LORA = {P + "q_proj.lora_A.weight": torch.ones(2, 32), P + "q_proj.lora_B.weight": torch.ones(32, 2)}


# --- PEFT -> ours -----------------------------------------------------------------------------

LORA_VARIANTS = {
    "plain": dict(r=4, lora_alpha=8),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3},
                     alpha_pattern={"q_proj": 5}),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}),
}


@pytest.mark.parametrize("variant", sorted(LORA_VARIANTS))
def test_lora_from_peft_matches_peft_modules_and_logits(tmp_path, variant):
    base = tiny_llama()
    config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        **LORA_VARIANTS[variant])
    peft_model, path = peft_saved(tmp_path, tiny_llama(), config)
    adapter = load_adapter(path)
    assert adapter.kind is AdapterKind.LORA and adapter.config["peft_type"] == "LORA"
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                   if hasattr(m, "lora_A")}
    assert set(adapter.modules) == set(peft_layers) and set(adapter.modules) <= set(dict(base.named_modules()))
    for name, module in adapter.modules.items():
        layer = peft_layers[name]
        assert torch.equal(module.a, layer.lora_A["default"].weight)
        assert torch.equal(module.b, layer.lora_B["default"].weight)
        assert module.scale == layer.scaling["default"] and module.rank == layer.r["default"]
    check_adapter_fits(adapter, layer_shapes(base))
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        assert not torch.allclose(expected, base(input_ids=IDS).logits, atol=1e-3)  # the adapter does something
        torch.testing.assert_close(merge_adapter(base, adapter)(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_ia3_from_peft_feedforward_input_scaling(tmp_path):
    base = tiny_llama()
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False)
    peft_model, path = peft_saved(tmp_path, tiny_llama(), config)
    adapter = load_adapter(path)
    assert adapter.kind is AdapterKind.IA3 and len(adapter.modules) == 6
    for name, module in adapter.modules.items():
        layer = peft_model.get_submodule("base_model.model." + name)
        assert module.on_input == name.endswith("down_proj") == layer.is_feedforward
        assert torch.equal(module.scale, layer.ia3_l["default"].flatten())
    assert adapter.modules["model.layers.0.mlp.down_proj"].scale.shape == (64,)
    check_adapter_fits(adapter, layer_shapes(base))
    with torch.no_grad():
        torch.testing.assert_close(merge_adapter(base, adapter)(input_ids=IDS).logits,
                                   peft_model(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base = tiny_gpt2()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model, path = peft_saved(tmp_path, tiny_gpt2(), config)
    adapter = load_adapter(path)
    assert set(adapter.modules) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    shapes = layer_shapes(base)
    check_adapter_fits(adapter, shapes)
    for name, module in adapter.modules.items():
        assert (module.a.shape[1], module.b.shape[0]) == shapes[name] == (32, 96)
        peft_delta = peft_model.get_submodule("base_model.model." + name).get_delta_weight("default")  # [d_in, d_out]
        torch.testing.assert_close(module.scale * module.b @ module.a, peft_delta.t())
    with torch.no_grad():
        torch.testing.assert_close(merge_adapter(base, adapter)(input_ids=IDS).logits,
                                   peft_model(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module_name", [Q, "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                                         "x.q_proj"])
def test_pattern_lookup_is_peft_get_pattern_key(module_name):
    pattern = {"layers.0.self_attn.q_proj": 2, "q_proj": 3, "mlp\\..*_proj": 5}
    config = parse_adapter_config({**LORA_CFG, "r": 8, "rank_pattern": pattern, "alpha_pattern": {"proj": 1}})
    key = get_pattern_key(pattern.keys(), module_name)
    assert config.rank_for(module_name) == pattern.get(key, 8)
    assert config.scale_for(module_name) == 4 / config.rank_for(module_name)  # "proj" matches no whole leaf


# --- ours -> disk -> ours / PEFT --------------------------------------------------------------


@pytest.mark.parametrize("kind", list(AdapterKind))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, kind, dtype):
    shapes = layer_shapes(tiny_llama())
    adapter = random_adapter(kind, shapes, rank=3)
    cast = {n: dataclasses.replace(m, **{k: v.to(dtype) for k, v in vars(m).items() if isinstance(v, torch.Tensor)})
            for n, m in adapter.modules.items()}
    adapter = AdapterWeights(kind, cast)
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert_same(AdapterWeights(kind, adapter.modules, loaded.config), loaded)
    save_adapter(loaded, tmp_path / "b")  # with its config this time
    assert_same(loaded, load_adapter(tmp_path / "b"))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_peft_directory_round_trips_exactly(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                        use_rslora=True, init_lora_weights=False)
    _, path = peft_saved(tmp_path, tiny_llama(), config)
    adapter = load_adapter(path)
    save_adapter(adapter, tmp_path / "ours")
    assert_same(adapter, load_adapter(tmp_path / "ours"))


@settings(max_examples=30, deadline=None)
@given(scales=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=2),
       ranks=st.lists(st.integers(1, 16), min_size=2, max_size=2))
def test_built_config_reproduces_scales(tmp_path_factory, scales, ranks):
    """Exact wherever PEFT's alpha / r can express the scale (always for power-of-two ranks), else within an ulp."""
    modules = {f"model.layers.{i}.self_attn.q_proj": LoraModule(torch.ones(r, 32), torch.ones(32, r), s)
               for i, (s, r) in enumerate(zip(scales, ranks))}
    path = tmp_path_factory.mktemp("h")
    save_adapter(AdapterWeights(AdapterKind.LORA, modules), path)
    for name, module in load_adapter(path).modules.items():
        want = modules[name]
        assert module.rank == want.rank and module.scale == pytest.approx(want.scale, rel=2**-51, abs=0)
        if want.rank & (want.rank - 1) == 0:
            assert module.scale == want.scale


@pytest.mark.parametrize("kind", [AdapterKind.LORA, AdapterKind.IA3])
def test_peft_loads_what_we_save(tmp_path, kind):
    shapes = layer_shapes(tiny_llama())
    shapes = {n: s for n, s in shapes.items() if n.endswith(("q_proj", "v_proj", "down_proj"))}
    adapter = random_adapter(kind, shapes, rank=4)
    if kind is AdapterKind.LORA:  # mixed ranks and scales exercise rank_pattern / alpha_pattern
        low = random_adapter(kind, {n: s for n, s in shapes.items() if "q_proj" in n}, rank=2, seed=1)
        modules = {**adapter.modules, **{n: LoraModule(m.a, m.b, 0.3) for n, m in low.modules.items()}}
        adapter = AdapterWeights(kind, modules)
    save_adapter(adapter, tmp_path / "a")
    base = tiny_llama()
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    for name, module in adapter.modules.items():
        layer = peft_model.get_submodule("base_model.model." + name)
        if kind is AdapterKind.LORA:
            assert torch.equal(layer.lora_A["default"].weight, module.a) and layer.scaling["default"] == module.scale
        else:
            assert layer.is_feedforward == module.on_input
            assert torch.equal(layer.ia3_l["default"].flatten(), module.scale)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits,
                                   merge_adapter(base, adapter)(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_flora_format_on_disk(tmp_path):
    adapter = random_adapter(AdapterKind.FLORA, {Q: (32, 32), "model.layers.0.mlp.up_proj": (32, 64)}, rank=2)
    save_adapter(adapter, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FLORA" and config["flora_format_version"] == 1 and config["r"] == 2
    loaded = load_adapter(tmp_path)
    assert loaded.modules["model.layers.0.mlp.up_proj"].flora_out.shape == (2, 64)


def test_adapter_name_qualified_keys_are_accepted(tmp_path):
    tensors = {k.replace("lora_A.", "lora_A.default."): v for k, v in GOOD_LORA.items()}
    assert load_adapter(write_adapter(tmp_path, LORA_CFG, tensors)).modules[Q].scale == 2.0


# --- refusals: adapter_config.json ------------------------------------------------------------

_DROP = object()
FLORA_CFG = {"peft_type": "FLORA", "r": 2, "target_modules": ["q_proj"], "flora_format_version": 1}


def _config(**override: object) -> dict:
    return {k: v for k, v in {**LORA_CFG, **override}.items() if v is not _DROP}


CONFIG_ERRORS = [
    (_config(peft_type=_DROP), "field 'peft_type' is missing"),
    (_config(peft_type="PREFIX_TUNING"), "peft_type='PREFIX_TUNING' is not supported"),
    (_config(modules_to_save=["score"]), "modules_to_save"),
    (_config(bias="all"), "bias='all'"),
    (_config(target_modules=["q_proj", "lm_head"]), "target_modules includes \\['lm_head'\\]"),
    (_config(target_modules=["embed_tokens"]), "target_modules includes \\['embed_tokens'\\]"),
    (_config(target_modules=["c_attn", "wte"]), "target_modules includes \\['wte'\\]"),
    (_config(target_modules=".*(q_proj|wpe)"), "target_modules includes \\['wpe'\\]"),
    (_config(target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters"),
    (_config(layer_replication=[[0, 2]]), "layer_replication"),
    (_config(r=0), "r=0; it must be a positive integer"),
    (_config(r=-4), "r=-4"),
    (_config(r="8"), "r='8'"),
    (_config(rank_pattern={"q_proj": 0}), "rank_pattern\\['q_proj'\\]=0"),
    (_config(alpha_pattern={"q_proj": "x"}), "alpha_pattern"),
    (_config(rank_pattern={"(": 2}), "rank_pattern key '\\(' is not a valid regex"),
    (_config(use_qalora=True), "use_qalora"),
    (_config(lora_bias=True), "lora_bias"),
    (_config(trainable_token_indices=[1, 2]), "trainable_token_indices"),
    (_config(alora_invocation_tokens=[5]), "alora_invocation_tokens"),
    (_config(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'.*convert"),
    (_config(use_rslora="yes"), "use_rslora"),
    ({**FLORA_CFG, "flora_format_version": 2}, "flora_format_version=2"),
    ({**FLORA_CFG, "lora_alpha": 4}, "unknown field.*lora_alpha"),
]


@pytest.mark.parametrize(("config", "match"), CONFIG_ERRORS)
def test_config_refusals_name_the_field(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        load_adapter(write_adapter(tmp_path, config, GOOD_LORA))


def test_config_not_json_names_the_file(tmp_path):
    write_adapter(tmp_path, LORA_CFG, GOOD_LORA)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        load_adapter(tmp_path)


def test_missing_config_and_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        load_adapter(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        load_adapter(tmp_path / "nope")


# --- refusals: weights ------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("file_name", ["adapter_model.bin", "weights.pt", "w.pth", "w.pkl", "w.ckpt"])
def test_pickled_weights_are_refused_without_unpickling(tmp_path, file_name):
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the payload does fire when unpickled
    assert (tmp_path / "control").exists()
    directory = tmp_path / "a"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(LORA_CFG))
    (directory / file_name).write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    with pytest.raises(ValueError, match="pickled weights.*refused.*safe_serialization=True"):
        load_adapter(directory)
    assert not (tmp_path / "marker").exists()


def test_no_weights_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(LORA_CFG))
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_adapter(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    weights = write_adapter(tmp_path, LORA_CFG, GOOD_LORA) / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-7] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}")
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(tmp_path)


def _with(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = dict(GOOD_LORA)
    for suffix, value in changes.items():
        key = P + "q_proj." + suffix.replace("__", ".")
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


def _nan() -> torch.Tensor:
    t = torch.ones(2, 32)
    t[1, 3] = float("nan")
    return t


WEIGHT_ERRORS = [
    (_with(lora_A__weight=_nan()), LORA_CFG, f"'{P}q_proj.lora_A.weight' holds NaN"),
    (_with(lora_B__weight=torch.full((32, 2), float("inf"))), LORA_CFG, "lora_B.weight' holds NaN or Inf"),
    (_with(lora_B__weight=torch.ones(32, 3)), {**LORA_CFG, "rank_pattern": {}}, "ranks disagree"),
    (_with(lora_B__weight=None), LORA_CFG, "q_proj'.*no lora_B"),
    (_with(lora_A__weight=torch.ones(64)), LORA_CFG, "lora_A \\[r, d_in\\] has shape \\[64\\]; it must be 2-D"),
    ({**GOOD_LORA, P + "q_proj.lora_A.default.weight": torch.ones(2, 32)}, LORA_CFG, "lora_A twice"),
    ({**GOOD_LORA, P + "q_proj.weird": torch.ones(2)}, LORA_CFG, "key '.*q_proj.weird' is not of a known form"),
    ({"model.layers.0.q_proj.lora_A.weight": torch.ones(2, 32)}, LORA_CFG, "is not of a known form"),
    ({**GOOD_LORA, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 128)}, LORA_CFG,
     "lora_embedding_A.*embedding layer"),
    ({"base_model.model.lm_head.lora_A.weight": torch.ones(2, 32), "base_model.model.lm_head.lora_B.weight":
      torch.ones(128, 2)}, LORA_CFG, "module 'lm_head' is lm_head or an embedding"),
    ({**GOOD_LORA, P + "q_proj.lora_magnitude_vector": torch.ones(32)}, LORA_CFG,
     "has lora_magnitude_vector but use_dora is False"),
    (GOOD_LORA, {**LORA_CFG, "use_dora": True}, "has no lora_magnitude_vector but use_dora is True"),
    ({**GOOD_LORA, P + "q_proj.lora_magnitude_vector": torch.ones(16)}, {**LORA_CFG, "use_dora": True},
     "lora_magnitude_vector has shape \\[16\\]; DoRA needs one entry per output, \\[32\\]"),
    ({**GOOD_LORA, P + "q_proj.lora_B.bias": torch.ones(32)}, LORA_CFG, "lora_bias"),
    (GOOD_LORA, {**LORA_CFG, "r": 4}, "gives module 'model.layers.0.self_attn.q_proj' rank 4.*fix r or rank_pattern"),
    (_with(lora_A__weight=torch.ones(2, 32, dtype=torch.int32)), LORA_CFG, "dtype I32"),
    ({P + "k_proj.ia3_l": torch.ones(1, 32)}, {"peft_type": "IA3", "target_modules": ["k_proj"]},
     "ia3_l has shape \\[1, 32\\] but must be \\[d_out, 1\\]"),
    ({P + "k_proj.ia3_l": torch.ones(16, 1)}, {"peft_type": "IA3", "feedforward_modules": ["k_proj"]},
     "must be \\[1, d_in\\] \\(a feedforward module\\)"),
    (GOOD_LORA, FLORA_CFG, "not of a known form for a flora adapter"),
    ({P + "q_proj.flora_in": torch.ones(2, 32), P + "q_proj.flora_out": torch.ones(3, 32)},
     FLORA_CFG, "ranks disagree"),
]


@pytest.mark.parametrize(("tensors", "config", "match"), WEIGHT_ERRORS)
def test_weight_refusals_name_the_key(tmp_path, tensors, config, match):
    with pytest.raises(ValueError, match=match):
        load_adapter(write_adapter(tmp_path, config, tensors))


def test_limits_on_bytes_and_rank(tmp_path):
    write_adapter(tmp_path, LORA_CFG, GOOD_LORA)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert load_adapter(tmp_path, max_bytes=size, max_rank=2).rank == 2
    with pytest.raises(ValueError, match=f"is {size} bytes, over max_bytes={size - 1}"):
        load_adapter(tmp_path, max_bytes=size - 1)
    with pytest.raises(ValueError, match="rank 2, above max_rank=1"):
        load_adapter(tmp_path, max_rank=1)
    with pytest.raises(ValueError, match="max_bytes=-1"):
        load_adapter(tmp_path, max_bytes=-1)


# --- save refusals and shape checks against a base model ------------------------------------


def test_save_refuses_a_config_that_disagrees(tmp_path):
    lora = LoraModule(torch.ones(2, 32), torch.ones(32, 2), scale=3.0)
    with pytest.raises(ValueError, match="scale 2.0 .* module has scale 3.0"):
        save_adapter(AdapterWeights(AdapterKind.LORA, {Q: lora}, LORA_CFG), tmp_path)
    with pytest.raises(ValueError, match="peft_type 'LORA' but the adapter is ia3"):
        save_adapter(AdapterWeights(AdapterKind.IA3, {Q: Ia3Module(torch.ones(32), False)}, LORA_CFG), tmp_path)
    bad = LoraModule(torch.full((2, 32), float("nan")), torch.ones(32, 2), scale=2.0)
    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj' a holds NaN"):
        save_adapter(AdapterWeights(AdapterKind.LORA, {Q: bad}), tmp_path)
    with pytest.raises(ValueError, match="no modules"):
        save_adapter(AdapterWeights(AdapterKind.LORA, {}), tmp_path)
    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj' is a Ia3Module in a lora adapter"):
        save_adapter(AdapterWeights(AdapterKind.LORA, {Q: Ia3Module(torch.ones(32), False)}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_adapter_fits_names_the_module():
    shapes = {Q: (32, 32), "model.layers.0.mlp.down_proj": (64, 32)}
    far = "model.layers.9.self_attn.q_proj"
    lora = AdapterWeights(AdapterKind.LORA, {far: LoraModule(torch.ones(2, 32), torch.ones(32, 2), 1.0)})
    with pytest.raises(ValueError, match=f"'{far}' matches no adapter-capable layer.*mlp.down_proj"):
        check_adapter_fits(lora, shapes)
    flora = AdapterWeights(AdapterKind.FLORA, {Q: FloraModule(torch.ones(2, 32), torch.ones(2, 16))})
    with pytest.raises(ValueError, match="has d_out=16 but the base model's layer has d_out=32"):
        check_adapter_fits(flora, shapes)
    ia3 = AdapterWeights(AdapterKind.IA3, {"model.layers.0.mlp.down_proj": Ia3Module(torch.ones(32), on_input=True)})
    with pytest.raises(ValueError, match="has d_in=32 but the base model's layer has d_in=64"):
        check_adapter_fits(ia3, shapes)
    on_output = Ia3Module(torch.ones(32), on_input=False)
    check_adapter_fits(AdapterWeights(AdapterKind.IA3, {"model.layers.0.mlp.down_proj": on_output}), shapes)
