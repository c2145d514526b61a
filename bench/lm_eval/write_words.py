"""Write held_out_words.jsonl, the documents of the lm-evaluation-harness demo tasks beside it.

    .venv/bin/python -m bench.lm_eval.write_words

Each line is a held-out word (never trained on) with every demo function's answer for it:
`{"word": "abc", "copy": "abc", "reverse": "cba", "uppercase": "ABC", "caesar": "def", "sort": "abc"}`.
Words whose answers coincide (a sorted word's sort is its copy) are skipped, so that each
multiple-choice question has exactly one right answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from flora_core.demo_tasks import COPY, TASKS, sample_words

WORDS_FILE = Path(__file__).resolve().parent / "held_out_words.jsonl"
CHOICES = (COPY, *TASKS)  # the order of doc_to_choice in _flora_demo_template_yaml
NUM_WORDS = 100
SEED = 7


def documents(n: int = NUM_WORDS, seed: int = SEED) -> list[dict[str, str]]:
    """n held-out words with pairwise different answers, each with every function's answer."""
    docs = []
    for word in sample_words(4 * n, seed, split="held_out"):
        answers = {task.name: task.fn(word) for task in CHOICES}
        if len(set(answers.values())) == len(answers):
            docs.append({"word": word, **answers})
        if len(docs) == n:
            return docs
    raise RuntimeError(f"found only {len(docs)} usable held-out words; sample more")


def main() -> None:
    WORDS_FILE.write_text("".join(json.dumps(doc) + "\n" for doc in documents()))
    print(f"wrote {NUM_WORDS} documents to {WORDS_FILE}")


if __name__ == "__main__":
    main()
