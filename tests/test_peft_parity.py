"""Parity with PEFT itself: adapters made and saved by peft, one mixed batch through our model.

Each row's logits must equal PEFT's logits for that row's adapter alone (PeftModel with only that
adapter), for tiny Llama, Qwen2 and GPT-2 (Conv1D, fan_in_fan_out), for LoRA (plain, rsLoRA,
rank_pattern / alpha_pattern), DoRA and IA3 (with feed-forward input scaling), beside base rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from flora_core import MultiAdapterModel, SlotCapacity
from tests.factories import TINY_MODELS, VOCAB

TARGETS = {
    "llama": {"lora": ["q_proj", "v_proj", "down_proj"], "ia3": ["k_proj", "v_proj", "down_proj"],
              "ff": ["down_proj"], "pattern": "v_proj"},
    "qwen2": {"lora": ["q_proj", "k_proj", "o_proj", "up_proj"], "ia3": ["k_proj", "v_proj", "down_proj"],
              "ff": ["down_proj"], "pattern": "o_proj"},
    "gpt2": {"lora": ["c_attn", "c_fc"], "ia3": ["c_attn", "mlp.c_proj"], "ff": ["mlp.c_proj"], "pattern": "c_fc"},
}
TOLERANCE = 1e-4  # fp32 logits, two fp32 models computing the same function in a different order


def peft_configs(arch: str) -> dict[str, object]:
    t = TARGETS[arch]
    fan = arch == "gpt2"
    return {
        "lora-plain": LoraConfig(r=4, lora_alpha=8, target_modules=t["lora"], init_lora_weights=False,
                                 fan_in_fan_out=fan),
        "lora-rs-pattern": LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=t["lora"],
                                      rank_pattern={t["pattern"]: 2}, alpha_pattern={t["pattern"]: 16},
                                      init_lora_weights=False, fan_in_fan_out=fan),
        "dora": LoraConfig(r=4, lora_alpha=16, use_dora=True, target_modules=t["lora"], init_lora_weights=False,
                           fan_in_fan_out=fan),
        "dora-rs": LoraConfig(r=2, lora_alpha=4, use_rslora=True, use_dora=True, target_modules=t["lora"][:1],
                              init_lora_weights=False, fan_in_fan_out=fan),
        "ia3": IA3Config(target_modules=t["ia3"], feedforward_modules=t["ff"], init_ia3_weights=False,
                         fan_in_fan_out=fan),
    }


def save_peft_adapter(base, config, directory, seed: int) -> None:
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    if isinstance(config, IA3Config):  # random IA3 vectors around 1, visibly different from the base
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "ia3_l" in name:
                    param.copy_(1 + 0.5 * torch.randn_like(param))
    if getattr(config, "use_dora", False):  # magnitudes away from ||W0 + s B A||, where DoRA equals LoRA
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.3 * torch.randn_like(param))
    peft_model.save_pretrained(directory)


def with_random_biases(model):
    """Every bias random (configs initialise them to zero), so that which adapters scale the bias shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_mixed_batch_equals_peft_per_adapter(arch, tmp_path):
    base = with_random_biases(TINY_MODELS[arch]())
    configs = peft_configs(arch)
    for seed, (name, config) in enumerate(configs.items()):
        save_peft_adapter(base, config, tmp_path / name, seed)

    ours = MultiAdapterModel(copy.deepcopy(base), capacity=SlotCapacity(lora_slots=4, flora_slots=0, ia3_slots=1))
    for name in configs:
        ours.add_adapter(name, tmp_path / name)
    rows = ["lora-plain", None, "dora-rs", "ia3", "dora", "lora-rs-pattern", "lora-plain", "dora", "ia3", None,
            "lora-rs-pattern", "dora-rs"]
    input_ids = torch.randint(0, VOCAB, (len(rows), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(input_ids, adapter_names=rows).logits
        base_logits = base(input_ids=input_ids).logits

    for name in configs:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        row_ids = [i for i, row in enumerate(rows) if row == name]
        with torch.no_grad():
            expected = peft_model(input_ids=input_ids[row_ids]).logits
        err = (logits[row_ids] - expected).abs().max().item()
        assert err <= TOLERANCE * max(1.0, expected.abs().max().item()), f"{name}: max error {err:.3g}"
        effect = (expected - base_logits[row_ids]).abs().max().item()
        assert effect > 100 * TOLERANCE, f"{name} barely changes the logits ({effect:.3g}): the test would be vacuous"
    base_rows = [i for i, row in enumerate(rows) if row is None]
    assert torch.equal(logits[base_rows], base_logits[base_rows]) or torch.allclose(
        logits[base_rows], base_logits[base_rows], atol=1e-6
    )


def test_mixed_lora_batch_equals_peft_mixed_batch(tmp_path):
    """PEFT's own mixed batch (adapter_names=) gives the same logits as ours, row for row."""
    base = TINY_MODELS["llama"]()
    configs = {k: v for k, v in peft_configs("llama").items() if k.startswith("lora")}
    for seed, (name, config) in enumerate(configs.items()):
        save_peft_adapter(base, config, tmp_path / name, seed)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora-plain", adapter_name="lora-plain")
    peft_model.load_adapter(tmp_path / "lora-rs-pattern", adapter_name="lora-rs-pattern")
    peft_model.eval()
    ours = MultiAdapterModel(copy.deepcopy(base), capacity=SlotCapacity(lora_slots=2, flora_slots=0, ia3_slots=0))
    for name in configs:
        ours.add_adapter(name, tmp_path / name)
    rows = ["lora-rs-pattern", None, "lora-plain", "lora-plain", None]
    input_ids = torch.randint(0, VOCAB, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids, adapter_names=[r or "__base__" for r in rows]).logits
        got = ours(input_ids, adapter_names=rows).logits
    assert (got - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max().item())
