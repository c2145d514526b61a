"""One forward pass, three adapter kinds: the README's Python example, runnable.

    python examples/mixed_batch.py

Builds a small Llama from a config (no download), saves a PEFT LoRA, a PEFT IA3 and a FLoRA
adapter for it, loads them by directory, and runs ONE batch where every row has its own adapter.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from flora_core import AdapterKind, AdapterWeights, FloraModule, MultiAdapterModel, save_adapter


def make_adapters(base: LlamaForCausalLM, root: Path) -> None:
    """Three adapter directories under root: PEFT LoRA, PEFT IA3, and our FLoRA format."""
    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    lora.save_pretrained(root / "summarize-lora")
    ia3 = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["k_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"], init_ia3_weights=False))
    ia3.save_pretrained(root / "polite-ia3")
    flora_modules = {
        name: FloraModule(flora_in=1 + 0.5 * torch.randn(2, m.in_features), flora_out=1 + 0.5 * torch.randn(2, m.out_features))
        for name, m in base.named_modules() if name.endswith(("q_proj", "o_proj"))
    }
    save_adapter(AdapterWeights(AdapterKind.FLORA, flora_modules), root / "pirate-flora")


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    base = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(base, Path(tmp))
        model = MultiAdapterModel(copy.deepcopy(base))
        for name in ["summarize-lora", "polite-ia3", "pirate-flora"]:
            model.add_adapter(name, Path(tmp) / name)
        rows = ["summarize-lora", "polite-ia3", "pirate-flora", None]
        input_ids = torch.randint(0, 256, (len(rows), 8))
        with torch.no_grad():
            logits = model(input_ids, adapter_names=rows).logits  # [4, 8, 256], one forward pass
            base_logits = base(input_ids=input_ids).logits
        for i, name in enumerate(rows):
            change = (logits[i] - base_logits[i]).abs().max().item()
            print(f"row {i} adapter={name or 'base':15s} max |logit change vs base| = {change:.4f}")
        print(model.pool.stats())


if __name__ == "__main__":
    main()
