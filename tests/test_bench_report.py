"""The serving benchmark's rounds and report: what the README's end-to-end numbers are read from.

No serving here: the plan's order is checked directly, the report is fed results with known
throughputs and its headline and engine table are compared with medians and ratios worked out
by hand.
"""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

pytest.importorskip("matplotlib")

from bench.serving_e2e import Point, headline_points, plan  # noqa: E402 - after the skip
from bench.serving_report import engine_table, headline, write_markdown, write_plots  # noqa: E402
from bench.timing import interleaved  # noqa: E402

SATURATION = 32


def test_interleaved_rounds_run_every_point_once_each_in_rotated_order():
    points = ["a", "b", "c"]
    order = interleaved(points, rounds=4)
    assert [k for k, _ in order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    rounds = [[p for k, p in order if k == r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_plan_runs_headline_points_once_per_round_and_every_other_point_once():
    rounds = 3
    points = plan(quick=False, rates=(4.0, 8.0), saturation=SATURATION, rounds=rounds)
    counts = Counter(p if p.round is None else Point(p.app, p.workload, p.concurrency, p.rate, p.stream)
                     for p in points)
    headline_set = set(headline_points(SATURATION))
    assert len(headline_set) == 6
    for point, count in counts.items():
        assert count == (rounds if point in headline_set else 1), point
    assert {p.round for p in points[: 6 * rounds]} == set(range(rounds))  # the rounds run first
    assert all(p.round is None for p in points[6 * rounds:])


def test_a_headline_only_plan_runs_just_the_headline_rounds():
    points = plan(quick=False, rates=(4.0, 8.0), saturation=SATURATION, rounds=2, headline_only=True)
    assert len(points) == 6 * 2 and {p.round for p in points} == {0, 1}
    assert {Point(p.app, p.workload, p.concurrency, p.rate, p.stream) for p in points} == set(
        headline_points(SATURATION))


def _point(app, workload, tokens_per_s, round_=None, stream=True, concurrency=SATURATION):
    return {"app": app, "workload": workload, "concurrency": concurrency, "rate": None, "stream": stream,
            "round": round_, "mode": "closed", "output_tokens_per_s": tokens_per_s,
            "requests_per_s": tokens_per_s / 20}


def _result(base, ours, one, stream=True):
    results = []
    for k, (b, o, n) in enumerate(zip(base, ours, one)):
        results += [_point("ours", "base", b, k, stream), _point("ours", "uniform-100", o, k, stream),
                    _point("one_adapter_per_step", "uniform-100", n, k, stream)]
    return {"results": results, "settings": {"saturation": SATURATION}}


def test_headline_reports_median_rounds_and_ratio_ranges_within_rounds():
    base, ours, one = [600, 500, 550], [480, 470, 530], [150, 170, 160]
    lines = "\n".join(headline(_result(base, ours, one)))
    share = statistics.median(ours) / statistics.median(base)  # 480 / 550
    per_round = sorted(o / b for o, b in zip(ours, base))  # 0.80, 0.94, 0.96
    assert "| 550 (500-600) |" in lines
    assert (f"{share:.0%} of the base (target >= 85%: met; {per_round[0]:.0%}-{per_round[-1]:.0%} round by round)"
            in lines)
    speedups = sorted(o / n for o, n in zip(ours, one))
    assert (f"flora-serve is 3.0x this (target >= 3.0x: met; {speedups[0]:.1f}x-{speedups[-1]:.1f}x round by round)"
            in lines)


def test_headline_says_missed_below_a_target():
    lines = "\n".join(headline(_result(base=[600, 600, 600], ours=[480, 500, 490], one=[200, 200, 200])))
    assert "82% of the base (target >= 85%: missed" in lines
    assert "flora-serve is 2.5x this (target >= 3.0x: missed" in lines


def test_headline_of_a_single_run_has_no_ranges():
    lines = "\n".join(headline(_result(base=[600], ours=[540], one=[150])))
    assert "90% of the base (target >= 85%: met) |" in lines
    assert "round by round" not in lines and "(" not in lines.split("| 600")[1].split("|")[0]


def test_engine_table_shows_each_engine_point_as_its_median_round():
    rows = [{"app": "engine", "workload": w, "round": k, "output_tokens_per_s": v, "requests_per_s": 1.0,
             "steps_per_s": 1.0, "mean_rows_per_step": 32.0, "load_average": [1.0]}
            for k, (b, u) in enumerate([(1700, 1200), (1800, 1300), (1600, 1250)])
            for w, v in (("base", b), ("uniform-100", u))]
    table = "\n".join(engine_table({"engine_only": rows}))
    assert "| engine | base | 1700 (1600-1800) | 100% |" in table
    assert f"| engine | uniform-100 | 1250 (1200-1300) | {1250 / 1700:.0%} |" in table


def test_report_and_plots_are_written(tmp_path):
    result = _result(base=[600, 500, 550], ours=[480, 470, 530], one=[150, 170, 160])
    result["results"] += [dict(p, stream=False) for p in result["results"]]
    for p in result["results"]:
        p |= {"requests": 10, "failed": 0, "errors": [], "ttft_ms_p50": 1.0, "ttft_ms_p99": 2.0, "itl_ms_p50": 1.0,
              "itl_ms_p99": 2.0, "tpot_ms_p50": 1.0, "tpot_ms_p99": 2.0, "tokens_per_chunk": 2.0,
              "e2e_ms_p50": 3.0, "load_average": [1.0]}
    result |= {"machine": {"cpu": "test", "cpu_count": 2, "torch": "x", "load_average_1_5_15": [0, 0, 0],
                           "load_average_after": [0, 0, 0], "seconds": 1},
               "settings": {"saturation": SATURATION, "rank": 8, "duration": 15.0}, "command": "test",
               "workload": {"prompt_chars": [4, 24], "output_tokens": [8, 32]}, "app_args": {}, "adapters": 100,
               "engine_only": []}
    write_markdown(result, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "Each point ran in 3 interleaved rounds" in text
    assert text.count("| ours | base | closed, C=32 | ") == 3  # every round is listed
    made = write_plots(result, tmp_path, "report")
    assert (tmp_path / "report_throughput.png") in made
