"""Generated token ids to text, one token at a time, and the stop strings that cut it.

A byte-level tokenizer may split one character over several tokens: decoding them one by one
gives U+FFFD halves. `IncrementalDetokenizer` uses vLLM's prefix/read offsets: it decodes a
short window of ids twice (up to the last emitted token, and up to the newest) and emits the
difference only once the newest decode no longer ends in U+FFFD. The window starts a few prompt
tokens back, so tokenizers that drop a leading space at the start of a decode (SentencePiece)
still give the first generated word its space.

`StopStringMatcher` finds stop strings across token boundaries and holds back the last
(longest stop - 1) characters, so streamed text never shows the beginning of a stop string
that the next token completes; the concatenated stream equals the final text.
"""

from __future__ import annotations

import threading
from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded in front of the generated ones


class TextCodec:
    """A Hugging Face tokenizer behind a lock, so encode and decode can be called from any thread.

    (A fast tokenizer's Rust object refuses concurrent use: "Already borrowed".)
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with the tokenizer's special tokens (BOS) as a prompt gets them."""
        with self._lock:
            return list(self.tokenizer.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


class IncrementalDetokenizer:
    """Text of the generated tokens, emitted only up to the last complete character."""

    def __init__(self, codec: TextCodec, prompt_ids: Sequence[int]) -> None:
        self._codec = codec
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: ids before it are never decoded again
        self._read_offset = len(self._ids)  # ids before it have been emitted as text

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" while a character is split)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: the text still held back (an incomplete character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        emitted = self._codec.decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._codec.decode(self._ids[self._prefix_offset :])
        if len(current) <= len(emitted) or (current.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return current[len(emitted) :]


class StopStringMatcher:
    """Cuts text at the first stop string; holds back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""  # received, not yet released: shorter than the longest stop string

    def feed(self, text: str) -> tuple[str, str | None]:
        """New text in; (text safe to release, the stop string matched or None).

        After a match, the released text ends right before the stop string and the rest is dropped.
        """
        buffer = self._pending + text
        hit = _first_stop(buffer, self._stops)
        if hit is not None:
            self._pending = ""
            return buffer[: hit[0]], hit[1]
        cut = max(len(buffer) - self._hold, 0)
        self._pending = buffer[cut:]
        return buffer[:cut], None

    def finish(self) -> str:
        """Generation ended for another reason: release the held-back text."""
        held, self._pending = self._pending, ""
        return held


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(index, stop) of the earliest stop string in text; the first listed wins a tie."""
    best = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best
