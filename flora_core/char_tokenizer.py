"""The character-level tokenizer of the embedded demo model: one token per character.

Built with the `tokenizers` library (a WordLevel vocabulary over single characters, each
character split off by the pre-tokenizer) and wrapped in `PreTrainedTokenizerFast`, so
`AutoTokenizer.from_pretrained(dir)` loads what `save_pretrained` writes. Decoding fuses the
tokens back without separators, so `decode(encode(s))` gives `s` back for text in `CHARACTERS`;
any other character becomes `<unk>`.

Encoding with special tokens puts `<s>` in front (and nothing after: generation ends at `</s>`).
Padding is on the left, as batched generation needs.

Chat template: the content of the LAST user message, followed by "=", after `<s>`. System and
assistant messages are ignored; the demo tasks are one-shot string maps, so the conversation
history carries nothing the model uses. For example
`[{"role": "user", "content": "hello"}]` renders as `"<s>hello="`.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
CHARACTERS = (
    string.ascii_lowercase + string.ascii_uppercase + string.digits + " =.,:;!?'-"
)
MODEL_MAX_LENGTH = 64

CHAT_TEMPLATE = (
    "{%- set ns = namespace(last='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{{ ns.last }}="
)


def _char_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] matches every character, newline included: each one becomes its own piece.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join tokens with no space between them
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character tokenizer with bos/eos/pad/unk and the chat template set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_char_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: the model takes none
    )
