"""The end-to-end serving run as a Markdown report and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

APP_LABEL = {"ours": "flora-serve (adapters mixed in every batch)",
             "one_adapter_per_step": "one adapter per batch (max_adapters_per_step=1)"}
COLOR = {"ours": "tab:blue", "one_adapter_per_step": "tab:red"}


def _matching(results: list[dict], app: str, workload: str, concurrency=None, rate=None, stream=True) -> list[dict]:
    return [r for r in results if (r["app"], r["workload"], r.get("concurrency"), r.get("rate"),
                                   r.get("stream", True)) == (app, workload, concurrency, rate, stream)]


def _median_point(points: list[dict]) -> dict | None:
    """The point of median throughput (the lower median for an even count); None if there is none."""
    ranked = sorted(points, key=lambda r: r["output_tokens_per_s"])
    return ranked[(len(ranked) - 1) // 2] if ranked else None


def _find(results: list[dict], app: str, workload: str, concurrency=None, rate=None, stream=True) -> dict | None:
    """The point measured for this app, workload and load: the median round where it ran in rounds."""
    return _median_point(_matching(results, app, workload, concurrency, rate, stream))


def _rate(value: float) -> str:
    """A rate with a decimal where it is small (a wide model's engine makes tens of tokens/s)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _range_text(points: list[dict]) -> str:
    """' (lo-hi)' of the points' output tokens/s for a point run in rounds, '' for one run once."""
    values = [r["output_tokens_per_s"] for r in points]
    return f" ({_rate(min(values))}-{_rate(max(values))})" if len(values) > 1 else ""


def _spread(results: list[dict], app: str, workload: str, concurrency=None, stream=True) -> str:
    return _range_text(_matching(results, app, workload, concurrency, stream=stream))


def _rounds_of(results: list[dict]) -> int:
    return len({r.get("round") for r in results if r.get("round") is not None})


def _ratio_range(results: list[dict], numerator: tuple, denominator: tuple, stream=True) -> tuple[float, float] | None:
    """min and max over rounds of the ratio of two points' throughput measured in the same round."""
    by_round = {}
    for key, (app, workload, c) in (("num", numerator), ("den", denominator)):
        for r in _matching(results, app, workload, c, stream=stream):
            if r.get("round") is not None:
                by_round.setdefault(r["round"], {})[key] = r["output_tokens_per_s"]
    ratios = [v["num"] / v["den"] for v in by_round.values() if len(v) == 2 and v["den"]]
    return (min(ratios), max(ratios)) if len(ratios) > 1 else None


def _verdict(value: float, target: float, text: str, spread: tuple[float, float] | None, percent: bool) -> str:
    shown = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:.1f}x")
    rounds = f"; {shown(spread[0])}-{shown(spread[1])} round by round" if spread else ""
    return f"{shown(value)} {text} (target >= {shown(target)}: {'met' if value >= target else 'missed'}{rounds})"


def headline(result: dict) -> list[str]:
    results, c = result["results"], result["settings"]["saturation"]
    rounds = _rounds_of(results)
    lines = [f"## Headline: 100 adapters drawn uniformly, closed loop of {c} concurrent streams", ""]
    if rounds > 1:
        lines += [f"Each point ran in {rounds} interleaved rounds (rotated order); a cell is the median round, "
                  "with the range over rounds in brackets. Ratios are of the medians; beside them, the range of the "
                  "same ratio taken within each round.", ""]
    lines += ["| | output tokens/s | requests/s | vs target |", "|---|---:|---:|---|"]
    base_key, ours_key, one_key = ("ours", "base", c), ("ours", "uniform-100", c), ("one_adapter_per_step",
                                                                                   "uniform-100", c)
    for stream, how in ((True, "streaming"), (False, "whole answers, no streaming")):
        base, ours, one = (_find(results, *key, stream=stream) for key in (base_key, ours_key, one_key))
        if not (base and ours):
            continue
        share = ours["output_tokens_per_s"] / base["output_tokens_per_s"]
        lines += [f"| {how}: base model only (the ceiling) | {base['output_tokens_per_s']:.0f}"
                  f"{_spread(results, *base_key, stream=stream)} | {base['requests_per_s']:.1f} | |",
                  f"| {how}: flora-serve, uniform over 100 adapters | {ours['output_tokens_per_s']:.0f}"
                  f"{_spread(results, *ours_key, stream=stream)} | {ours['requests_per_s']:.1f} | "
                  + _verdict(share, 0.85, "of the base", _ratio_range(results, ours_key, base_key, stream), True)
                  + " |"]
        if one:
            speedup = ours["output_tokens_per_s"] / max(one["output_tokens_per_s"], 1e-9)
            lines.append(f"| {how}: one adapter per batch, uniform over 100 | {one['output_tokens_per_s']:.0f}"
                         f"{_spread(results, *one_key, stream=stream)} | {one['requests_per_s']:.1f} | flora-serve is "
                         + _verdict(speedup, 3.0, "this", _ratio_range(results, ours_key, one_key, stream), False)
                         + " |")
    return lines + [""]


def _engine_groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(app, workload) -> its engine-only points (one per round), in the order they first ran."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["app"], r["workload"]), []).append(r)
    return groups


def engine_medians(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(app, workload) -> its median round among the engine-only points, in the order they first ran."""
    return {key: _median_point(points) for key, points in _engine_groups(rows).items()}


def engine_table(result: dict) -> list[str]:
    rows = result.get("engine_only") or []
    if not rows:
        return []
    groups = _engine_groups(rows)
    base = _median_point(groups.get(("engine", "base"), []))
    rounds = _rounds_of(rows)
    lines = ["## The engine alone (no Ray, no HTTP): the same closed loop against `Engine.step()`", ""]
    if rounds > 1:
        lines += [f"{rounds} interleaved rounds; each row is the median round, the range over rounds in brackets.", ""]
    lines += ["| engine | workload | output tokens/s | vs base | requests/s | steps/s | tokens per step | load avg |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for points in groups.values():
        r, spread = _median_point(points), _range_text(points)
        share = f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.0%}" if base else ""
        lines.append(f"| {r['app']} | {r['workload']} | {_rate(r['output_tokens_per_s'])}{spread} | {share} | "
                     f"{r['requests_per_s']:.1f} | {_rate(r['steps_per_s'])} | {r['mean_rows_per_step']} | "
                     f"{(r['load_average'] or [None])[0]} |")
    return lines + [""]


def model_description(result: dict) -> str:
    """The served model in words (results written before the --model option served the default)."""
    return result.get("model_description", "the embedded default model")


def write_markdown(result: dict, path: Path) -> None:
    m, s, w = result["machine"], result["settings"], result["workload"]
    lines = [f"# End-to-end serving: {result['adapters']} LoRA adapters (rank {s['rank']}, every linear layer) on "
             f"{model_description(result)}", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}; everything on this machine: "
             "Ray (the replica with 1 CPU and 1 torch thread, ingress, proxy, controller) and the load generator "
             f"(httpx, streaming). Load average (1, 5, 15 min) at start: {m['load_average_1_5_15']}, at the end: "
             f"{m['load_average_after']}; per point in the table. Ray's environment: {m.get('ray_env', {})} "
             "(deploy/cluster_env.py). While a point runs the benchmark itself keeps "
             "about 5 processes busy (replica, ingress, proxy, catalog, load generator), so a load average of 3-5 "
             f"there is mostly its own. Ran {m['seconds']} s.", "",
             f"Command: `{result['command']}`", "",
             f"Each point runs {s['duration']:.0f} s. Prompts: {w['prompt_chars'][0]}-{w['prompt_chars'][1]} random "
             f"letters and '=' (uniform); outputs: max_tokens uniform in {w['output_tokens'][0]}-"
             f"{w['output_tokens'][1]} with ignore_eos, so each request generates exactly that many tokens. Zipf: "
             f"p(k) ~ 1/k. Latencies are client-side, from the SSE chunk timestamps: TTFT, the gap between "
             "chunks, and TPOT (a request's time per output token after its first: (last chunk - first chunk) / "
             "(tokens - 1)). With `stream_interval_ms` > 0 a chunk may carry several tokens (tok/chunk). "
             f"Application arguments: `{result['app_args']}`.", ""]
    lines += headline(result) + engine_table(result)
    lines += ["## Every point", "",
              "| app | workload | load | round | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
              "chunk gap p50 / p99 ms | tok/chunk | e2e p50 ms | failed / sent | load avg (1 min) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        load = f"closed, C={r['concurrency']}" if r["mode"] == "closed" else f"Poisson {r['rate']:g}/s"
        load += "" if r.get("stream", True) else ", whole answers (no streaming)"
        ttft = "-" if r["ttft_ms_p50"] is None else f"{r['ttft_ms_p50']} / {r['ttft_ms_p99']}"
        itl = "-" if r["itl_ms_p50"] is None else f"{r['itl_ms_p50']} / {r['itl_ms_p99']}"
        tpot = "-" if r.get("tpot_ms_p50") is None else f"{r['tpot_ms_p50']} / {r['tpot_ms_p99']}"
        round_ = "" if r.get("round") is None else r["round"]
        lines.append(f"| {r['app']} | {r['workload']} | {load} | {round_} | {r['requests_per_s']:.1f} | "
                     f"{r['output_tokens_per_s']:.0f} | {ttft} | {tpot} | {itl} | {r.get('tokens_per_chunk') or '-'} | "
                     f"{r['e2e_ms_p50']} | "
                     f"{r['failed']} / {r['requests']} | "
                     f"{(r['load_average'] or [None])[0]} |")
    errors = sorted({e for r in result["results"] for e in r["errors"]})
    if errors:
        lines += ["", "Errors seen: " + "; ".join(errors)]
    path.write_text("\n".join(lines) + "\n")


def _throughput_plot(result: dict, path: Path) -> Path | None:
    results, c = result["results"], result["settings"]["saturation"]
    closed = [r for r in results if r["concurrency"] == c and r["workload"] != "base" and r.get("stream", True)]
    base = _find(results, "ours", "base", c)
    if not closed or base is None:
        return None
    workloads = sorted({r["workload"] for r in closed}, key=lambda w: (w.split("-")[0], int(w.split("-")[1])))
    engine = list(engine_medians(result.get("engine_only") or []).values())
    fig, (ax, ax_engine) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=(3, 1.2))
    width = 0.4
    for j, app in enumerate(APP_LABEL):
        xs, ys = [], []
        for i, workload in enumerate(workloads):
            r = _find(results, app, workload, c)
            if r:
                xs.append(i + (j - 0.5) * width)
                ys.append(r["output_tokens_per_s"])
        ax.bar(xs, ys, width, label=APP_LABEL[app], color=COLOR[app])
    ax.axhline(base["output_tokens_per_s"], color="black", linestyle="--", label="base model only (the ceiling)")
    ax.axhline(0.85 * base["output_tokens_per_s"], color="tab:green", linestyle=":", label="85% of the base (target)")
    ax.set_xticks(range(len(workloads)), [w.replace("-", "\n") for w in workloads])
    ax.set_ylabel("output tokens/s")
    ax.set_xlabel("adapter distribution and number of adapters")
    ax.set_title(f"Through the application (HTTP, streaming), closed loop of {c} streams", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if engine:
        kinds = {"engine": "mixed", "engine_one_adapter_per_step": "one adapter\nper batch"}
        labels = [kinds[r["app"]] + "\n" + r["workload"] for r in engine]
        colors = ["black" if r["workload"] == "base" else COLOR["ours" if r["app"] == "engine" else
                                                               "one_adapter_per_step"] for r in engine]
        ax_engine.bar(range(len(engine)), [r["output_tokens_per_s"] for r in engine], color=colors)
        engine_base = next((r["output_tokens_per_s"] for r in engine if r["workload"] == "base"), None)
        if engine_base:
            ax_engine.axhline(engine_base, color="black", linestyle="--")
            ax_engine.axhline(0.85 * engine_base, color="tab:green", linestyle=":")
        ax_engine.set_xticks(range(len(engine)), labels, fontsize=7)
        ax_engine.set_title("The engine alone (no Ray, no HTTP)", fontsize=10)
        ax_engine.set_ylabel("output tokens/s")
        ax_engine.grid(True, axis="y", alpha=0.3)
    else:
        ax_engine.axis("off")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"Throughput on {model_description(result)}, CPU", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_plot(result: dict, path: Path) -> Path | None:
    lines = [("ours", "base", "base model only"), ("ours", "uniform-100", "flora-serve, uniform-100"),
             ("one_adapter_per_step", "uniform-100", "one adapter per batch, uniform-100")]
    series = {label: sorted((r for r in result["results"] if r["rate"] is not None and (r["app"], r["workload"])
                             == (app, workload)), key=lambda r: r["rate"]) for app, workload, label in lines}
    if not any(series.values()):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = {"base model only": "black", "flora-serve, uniform-100": "tab:blue",
              "one adapter per batch, uniform-100": "tab:red"}
    for label, rows in series.items():
        if not rows:
            continue
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["output_tokens_per_s"] for r in rows], "o-", color=colors[label], label=label)
        for ax, metric in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
            ax.plot(rates, [r[f"{metric}_p50"] for r in rows], "o-", color=colors[label], label=f"{label} p50")
            ax.plot(rates, [r[f"{metric}_p99"] for r in rows], "x--", color=colors[label], label=f"{label} p99")
    for ax, title, ylabel in ((axes[0], "achieved throughput", "output tokens/s"),
                              (axes[1], "time to first token", "ms (log)"),
                              (axes[2], "time per output token (TPOT)", "ms (log)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("Poisson arrival rate (requests/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle("Open loop (Poisson arrivals): solid p50, dashed p99", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _concurrency_plot(result: dict, path: Path) -> Path | None:
    rows = {w: sorted((r for r in result["results"] if r["app"] == "ours" and r["workload"] == w
                       and r["concurrency"] is not None and r.get("stream", True)), key=lambda r: r["concurrency"])
            for w in ("base", "uniform-100")}
    if min(len({r["concurrency"] for r in v}) for v in rows.values()) < 2:  # no sweep: one concurrency
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for workload, color in (("base", "black"), ("uniform-100", "tab:blue")):
        cs = [r["concurrency"] for r in rows[workload]]
        axes[0].plot(cs, [r["output_tokens_per_s"] for r in rows[workload]], "o-", color=color, label=workload)
        for ax, metric in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
            ax.plot(cs, [r[f"{metric}_p50"] for r in rows[workload]], "o-", color=color, label=f"{workload} p50")
            ax.plot(cs, [r[f"{metric}_p99"] for r in rows[workload]], "x--", color=color, label=f"{workload} p99")
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("time to first token, ms (log)")
    axes[2].set_ylabel("time per output token (TPOT), ms (log)")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("flora-serve: closed-loop concurrency sweep", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict, out_dir: Path, stem: str) -> list[Path]:
    made = [_throughput_plot(result, out_dir / f"{stem}_throughput.png"),
            _latency_plot(result, out_dir / f"{stem}_latency.png"),
            _concurrency_plot(result, out_dir / f"{stem}_concurrency.png")]
    return [p for p in made if p is not None]
