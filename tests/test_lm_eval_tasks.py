"""The lm-evaluation-harness demo tasks (bench/lm_eval): documents, targets and the report.

A wrong target index or a stale document would make lm_eval report the wrong adapter as right,
so each task's target must name its own demo function and every document must be a held-out
word with that function's answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench.lm_eval import report
from bench.lm_eval.write_words import CHOICES, WORDS_FILE, documents
from flora_core.demo_tasks import is_held_out, task_by_name

TASKS_DIR = WORDS_FILE.parent


def test_documents_are_held_out_words_with_each_functions_answer():
    lines = [json.loads(line) for line in WORDS_FILE.read_text().splitlines()]
    assert lines == documents(), "held_out_words.jsonl is stale: run python -m bench.lm_eval.write_words"
    for doc in lines:
        assert is_held_out(doc["word"])
        assert {name: doc[name] for name in (t.name for t in CHOICES)} == {
            t.name: task_by_name(t.name).fn(doc["word"]) for t in CHOICES}
        assert len({doc[t.name] for t in CHOICES}) == len(CHOICES)  # exactly one right answer


def test_each_task_targets_its_own_function():
    template = yaml.safe_load((TASKS_DIR / "_flora_demo_template_yaml").read_text())
    assert template["doc_to_choice"] == "{{[" + ", ".join(t.name for t in CHOICES) + "]}}"
    assert template["target_delimiter"] == ""  # "abc=" + "cba", as the demo prompts are written
    for index, task in enumerate(CHOICES):
        spec = yaml.safe_load((TASKS_DIR / f"flora_{task.name}.yaml").read_text())
        assert spec == {"include": "_flora_demo_template_yaml", "task": f"flora_{task.name}", "doc_to_target": index}
    assert len(list(TASKS_DIR.glob("flora_*.yaml"))) == len(CHOICES) == len(report.TASKS)


def test_report_reads_the_newest_results_of_each_model(tmp_path: Path):
    def write(model: str, stamp: str, accs: dict[str, float]) -> None:
        folder = tmp_path / model / model
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"results_{stamp}.json"
        path.write_text(json.dumps({"results": {t: {"acc,none": a} for t, a in accs.items()}}))

    write("reverse-lora-r8", "1", {"flora_reverse": 0.5, "flora_copy": 0.5})
    write("reverse-lora-r8", "2", {"flora_reverse": 1.0, "flora_copy": 0.0})
    write("flora-tiny-llama", "1", {"flora_copy": 0.97})
    table = report.accuracies(tmp_path)
    assert table == {"flora-tiny-llama": {"flora_copy": 0.97},
                     "reverse-lora-r8": {"flora_reverse": 1.0, "flora_copy": 0.0}}
    lines = report.markdown(table).splitlines()
    assert lines[2] == "| flora-tiny-llama | 0.97 | - | - | - | - |"
    assert lines[3] == "| reverse-lora-r8 | 0.00 | 1.00 | - | - | - |"
