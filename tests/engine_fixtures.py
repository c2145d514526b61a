"""Raw material of the engine tests: tiny models with registered adapters, references, a tokenizer.

The reference for a request is transformers' own `generate()` (greedy) on the base model with
that request's adapter merged into its weights (tests/reference.py), run alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerFast)

from flora_core import AdapterKind, AdapterWeights, MultiAdapterModel, SlotCapacity
from flora_core.engine import Engine, EngineConfig
from flora_core.request_output import RequestOutput
from tests.factories import TINY_MODELS, VOCAB, random_adapter
from tests.reference import merge_adapter

MAX_MODEL_LEN = 64  # the tiny models' positions
ADAPTERS = {  # name -> (kind, rank, seed, strength): each visibly changes the greedy tokens
    "lora-a": (AdapterKind.LORA, 4, 11, 0.5),
    "lora-b": (AdapterKind.LORA, 2, 12, 0.5),
    "flora": (AdapterKind.FLORA, 4, 13, 0.5),
    "ia3": (AdapterKind.IA3, 1, 14, 1.0),
}
CAPACITY = SlotCapacity(lora_slots=2, lora_max_rank=4, flora_slots=1, flora_max_rank=4, ia3_slots=1)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Adapters for everyone: LoRA, FLoRA and IA3 in one batch!",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji time: 🚀🔥 party 🎉 with friends 👩‍💻 and cats 🐈.",
    "Ünïcödé çharacters, naïve café, résumé, Straße.",
    "한국어 문장도 있습니다. Привет, мир!",
]


@dataclass
class Setup:
    """A base model, its patched copy with ADAPTERS registered, and memoized references."""

    base: PreTrainedModel
    model: MultiAdapterModel
    adapters: dict[str, AdapterWeights]
    _merged: dict = field(default_factory=dict)

    def engine(self, tokenizer=None, **config) -> Engine:
        return Engine(self.model, EngineConfig(**{"max_model_len": MAX_MODEL_LEN, **config}), tokenizer=tokenizer)

    def merged(self, adapter: str | None) -> PreTrainedModel:
        if adapter not in self._merged:
            self._merged[adapter] = merge_adapter(self.base, self.adapters[adapter] if adapter else None)
        return self._merged[adapter]

    @torch.no_grad()
    def reference(self, adapter: str | None, prompt: list[int], max_tokens: int) -> list[int]:
        """generate(do_sample=False) on the merged model, alone: the generated ids (EOS included)."""
        model = self.merged(adapter)
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
        )
        return out[0, len(prompt):].tolist()


def untied_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """factories.tiny_gpt2 with its own output head: with the head tied to the embeddings, the
    tiny random GPT-2 just repeats its last input token, adapters or not (a vacuous test)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=MAX_MODEL_LEN,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


BASES = {**TINY_MODELS, "gpt2": untied_gpt2}


def make_setup(arch: str = "llama", base: PreTrainedModel | None = None, capacity: SlotCapacity = CAPACITY) -> Setup:
    base = BASES[arch]() if base is None else base
    model = MultiAdapterModel(copy.deepcopy(base), capacity=capacity)
    shapes = {name: (layer.d_in, layer.d_out) for name, layer in model.layers.items()}
    adapters = {}
    for name, (kind, rank, seed, strength) in ADAPTERS.items():
        adapters[name] = random_adapter(kind, shapes, rank=rank, seed=seed, strength=strength)
        model.add_adapter(name, adapters[name])
    return Setup(base, model, adapters)


def make_resident(setup: Setup, names: list[str]) -> None:
    """Load adapters into device slots now, so the engine admits their requests at its first step
    (a non-resident adapter first goes through the loader thread: one step or more later)."""
    with setup.model.pool.pinned(names):
        pass


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spinning threads made each step hundreds of times slower: run every engine test on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_to_completion(engine: Engine, max_steps: int = 1000) -> dict[str, RequestOutput]:
    """Step until every request finished; the last output of each request."""
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return final
        outputs = engine.step()
        final.update({output.request_id: output for output in outputs if output.finished})
        if not outputs:
            engine.wait_for_work(0.01)
    raise AssertionError(f"requests still unfinished after {max_steps} steps: {engine.stats()}")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained here on SENTENCES (no download): multi-byte characters
    are split over several tokens, the case incremental detokenization must get right."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False,
    )


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/SentencePiece style BPE (Metaspace "▁" words, byte fallback, the leading space of a
    decode stripped), trained here on SENTENCES: decoding a generated word alone loses its space."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>", *byte_tokens], show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def tiny_llama_for(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose vocabulary is the tokenizer's (EOS included)."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=MAX_MODEL_LEN,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    return LlamaForCausalLM(config).eval()
