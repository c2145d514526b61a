"""The demo string tasks: pure functions on short lowercase words, one adapter per task.

Every task shares one prompt format and the prompt never names the task, so the adapter alone
decides what the model does: prompt `"abcde="`, completion `"edcba"` followed by the eos token
(the tokenizer adds `<s>` in front of the prompt). The base model is pretrained on `COPY`, so it
echoes the word and fails every task in `TASKS`.

Words are a-z, length 3..10. A word is held out (never trained on, by the base model or by an
adapter) when a hash of the word says so, so the train / held-out split is the same for every
task and every seed.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

MIN_WORD_LEN = 3
MAX_WORD_LEN = 10
PROMPT_SEPARATOR = "="
HELD_OUT_PERCENT = 20  # share of all words that belong to the held-out split

Split = Literal["train", "held_out"]


@dataclass(frozen=True)
class Task:
    """A named string-to-string function; `fn(word)` is the completion the model should give."""

    name: str
    fn: Callable[[str], str]


def _copy(word: str) -> str:
    return word


def _reverse(word: str) -> str:
    return word[::-1]


def _uppercase(word: str) -> str:
    return word.upper()


def _caesar(word: str) -> str:
    """Shift each letter by 3 places, wrapping z to c."""
    return "".join(chr((ord(c) - ord("a") + 3) % 26 + ord("a")) for c in word)


def _sort(word: str) -> str:
    return "".join(sorted(word))


COPY = Task("copy", _copy)  # what the base model is pretrained on; not an adapter task
TASKS: tuple[Task, ...] = (
    Task("reverse", _reverse),
    Task("uppercase", _uppercase),
    Task("caesar", _caesar),
    Task("sort", _sort),
)


def task_by_name(name: str) -> Task:
    """The task called `name` among `COPY` and `TASKS`."""
    for task in (COPY, *TASKS):
        if task.name == name:
            return task
    known = ", ".join(t.name for t in (COPY, *TASKS))
    raise ValueError(f"unknown demo task {name!r}; choose one of: {known}")


def prompt_for(word: str) -> str:
    """The prompt text for `word` (without the `<s>` the tokenizer adds)."""
    return f"{word}{PROMPT_SEPARATOR}"


def is_held_out(word: str) -> bool:
    """Whether `word` belongs to the held-out split (a fixed hash, independent of any seed)."""
    digest = hashlib.sha256(word.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def random_word(rng: random.Random) -> str:
    """One word of a-z, with a length drawn uniformly from MIN_WORD_LEN..MAX_WORD_LEN."""
    length = rng.randint(MIN_WORD_LEN, MAX_WORD_LEN)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def sample_words(n: int, seed: int, split: Split = "train") -> list[str]:
    """`n` distinct words of `split`, the same list for the same (n, seed, split)."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    want_held_out = split == "held_out"
    words: dict[str, None] = {}  # insertion-ordered set
    while len(words) < n:
        word = random_word(rng)
        if is_held_out(word) == want_held_out:
            words[word] = None
    return list(words)


def make_examples(task: Task, n: int, seed: int, split: Split = "train") -> list[tuple[str, str]]:
    """`n` (prompt, completion) pairs of `task` on distinct words of `split`; deterministic.

    The completion is the answer text only: the eos token that ends it is added at tokenization.
    """
    return [(prompt_for(word), task.fn(word)) for word in sample_words(n, seed, split)]


def exact_match_accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Share of predictions equal to their target after stripping surrounding whitespace."""
    if len(predictions) != len(targets):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(targets)} targets; pass one per target"
        )
    if not targets:
        raise ValueError("exact_match_accuracy needs at least one target")
    hits = sum(p.strip() == t.strip() for p, t in zip(predictions, targets))
    return hits / len(targets)
