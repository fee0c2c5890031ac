"""`peft-report <multirun dir>`: every run's results.json -> report.md, one CSV per table, PNG plots.

A table per study found (main, epochs, lora_rank, prefix_length, prefix_mlp, and each
beyond-the-study experiment that ran). Rows are the sweep's varying overrides; runs that differ only
in seed are averaged and shown as mean +- std. multitask_vs_single has a table of its own: each
task's score trained alone beside trained with the other two, and the change. Scores are the best epoch's (by dev avg), as the
checkpoint used for predictions. A failed or unfinished job is a row that says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

from peft_lightning.results import RESULTS
from peft_lightning.tasks import TASK_NAMES, TASKS

PAPER_STUDIES = ["main", "epochs", "lora_rank", "prefix_length", "prefix_mlp"]
BEYOND = ["lora_scaling", "lora_targets", "multitask_vs_single", "sts_head", "peft_methods"]
ORDER = PAPER_STUDIES + BEYOND
TITLES = {
    "main": "Main comparison (dev)",
    "epochs": "Epoch budgets: train and dev (overfitting)",
    "lora_rank": "LoRA rank: train and dev",
    "prefix_length": "Prefix length (dev)",
    "prefix_mlp": "Prefix tuning with and without the MLP reparameterisation (dev)",
    "lora_scaling": "LoRA scaling across ranks (dev)",
    "lora_targets": "LoRA target modules (dev)",
    "multitask_vs_single": "Multi-task vs single-task training (dev)",
    "sts_head": "STS-B head: MLP vs cosine similarity (dev)",
    "peft_methods": "PEFT methods: the study's four strategies and (IA)^3 (dev)",
}
METRICS = [("sst5", "acc"), ("qqp", "acc"), ("qqp", "f1"), ("stsb", "pearson"), ("stsb", "spearman")]
WITH_TRAIN = {"epochs", "lora_rank"}
WITH_COST = {"main", "peft_methods", "lora_targets"}  # tables that also show parameters, step time, memory
IGNORED_KEYS = {"seed"}


def load_runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.rglob(RESULTS)):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            res = {"status": "failed", "error": f"unreadable results.json: {err}"}
        res["dir"] = str(path.parent.relative_to(root))
        res.setdefault("study", path.parent.parent.name)
        runs.append(res)
    return runs


def overrides(run: dict) -> dict[str, str]:
    out = {}
    for item in run.get("overrides") or []:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def varying_keys(runs: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for k in overrides(r):
            if k not in keys and k not in IGNORED_KEYS:
                keys.append(k)
    return [k for k in keys if len({overrides(r).get(k) for r in runs}) > 1] or keys[:1]


def fmt(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.mean(values) if values else None


def score(entry: dict | None, part: str, task: str, metric: str) -> float | None:
    return ((entry or {}).get(part) or {}).get(task, {}).get(metric)


def study_table(study: str, runs: list[dict]) -> tuple[list[str], list[list[str]], list[list[float | None]]]:
    """Header, formatted rows, and the numeric means behind them (for bolding and plots)."""
    keys = varying_keys(runs)
    parts = ["train", "dev"] if study in WITH_TRAIN else ["dev"]
    header = list(keys) + [f"{p} {t} {m}" for p in parts for t, m in METRICS] + [f"{p} avg" for p in parts]
    extra = study in WITH_COST
    if extra:
        header += ["trainable (encoder)", "trainable (with heads)", "step ms", "peak MiB"]
    header += ["seeds", "status"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(overrides(r).get(k, "") for k in keys), []).append(r)
    rows, numbers = [], []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(_sort_key(v) for v in kv[0])):
        ok = [r for r in members if r.get("status") == "complete" and r.get("best")]
        bad = [r for r in members if r not in ok]
        cells, nums = list(key), []
        for p in parts:
            for t, m in METRICS:
                vals = [score(r["best"], p, t, m) for r in ok]
                cells.append(fmt(vals))
                nums.append(mean(vals))
        for p in parts:
            vals = [r["best"].get(f"{p}_avg") for r in ok]
            cells.append(fmt(vals))
            nums.append(mean(vals))
        if extra:
            for path in (("params", "encoder", "trainable"), ("params", "with_heads", "trainable")):
                vals = [_get(r, path) for r in ok]
                cells.append(f"{int(vals[0]):,}" if vals and vals[0] is not None else "-")
                nums.append(None)
            # step time without each fit's warm-up steps (compile); runs from before it have only the mean
            steady = [r.get("steady_step_ms") or r.get("step_time_ms") for r in ok]
            for vals in (steady, [r.get("peak_memory_mb") for r in ok]):
                cells.append(fmt(vals, 1))
                nums.append(None)
        status = (
            "ok" if not bad else "; ".join(f"{r.get('status', '?')}: {r.get('error', '')}".strip(": ") for r in bad)
        )
        cells += [str(len(ok)), status]
        rows.append(cells)
        numbers.append(nums)
    return header, rows, numbers


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _get(d: dict, path: tuple[str, ...]):
    for p in path:
        d = (d or {}).get(p)
    return d


def bold_best(
    header: list[str], rows: list[list[str]], numbers: list[list[float | None]], first_metric: int
) -> list[list[str]]:
    out = [list(r) for r in rows]
    for j in range(len(numbers[0]) if numbers else 0):
        col = [n[j] for n in numbers]
        if all(v is None for v in col) or not header[first_metric + j].startswith(("dev", "train")):
            continue
        best = max(v for v in col if v is not None)
        for i, v in enumerate(col):
            if v is not None and v == best and sum(c == best for c in col) < len(col):
                out[i][first_metric + j] = f"**{out[i][first_metric + j]}**"
    return out


def epochs_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = (
        ["strategy", "epoch"]
        + [f"{p} {t} {m}" for p in ("train", "dev") for t, m in METRICS if m != "spearman"]
        + ["train avg", "dev avg", "status"]
    )
    rows = []
    for r in runs:
        name = (r.get("adapter") or {}).get("name") or overrides(r).get("adapter", "?")
        marks = ((r.get("config") or {}).get("budget") or {}).get("epoch_marks") or [
            h["epoch"] for h in r.get("history", [])
        ]
        hist = {h["epoch"]: h for h in r.get("history", [])}
        for mark in marks:
            h = hist.get(mark)
            if h is None:
                rows.append(
                    [name, str(mark)]
                    + ["-"] * (len(header) - 3)
                    + [r.get("status", "?") + (": " + r["error"] if r.get("error") else "")]
                )
                continue
            cells = [name, str(mark)]
            cells += [fmt([score(h, p, t, m)]) for p in ("train", "dev") for t, m in METRICS if m != "spearman"]
            cells += [fmt([h.get("train_avg")]), fmt([h.get("dev_avg")]), "ok"]
            rows.append(cells)
    return header, rows


def multitask_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per strategy, each task's dev score trained alone and trained with the other two, and the cost.

    A task's score is its main metric (SST-5 and QQP accuracy, STS-B Pearson) at each run's best
    epoch: a single-task run's best epoch is its own task's best, a multi-task run's the best by
    dev avg (the checkpoint either run predicts with). "change" is together - alone, as mean +- std
    of the differences of runs with the same seed (with one seed, the difference). "wall s" is
    the three single-task runs' wall time summed against the multi-task run's.
    """
    header = ["adapter"]
    for t in TASK_NAMES:
        label = f"{t} {TASKS[t].main_metric}"
        header += [f"{label} alone", f"{label} together", f"{label} change"]
    header += ["avg alone", "avg together", "avg change", "wall s alone (3 runs)", "wall s together", "seeds", "status"]
    by_adapter: dict[str, list[dict]] = {}
    for r in runs:
        name = overrides(r).get("adapter") or (r.get("adapter") or {}).get("name") or "?"
        by_adapter.setdefault(name, []).append(r)
    rows = []
    for name in sorted(by_adapter):
        members = by_adapter[name]
        ok = [r for r in members if r.get("status") == "complete" and r.get("best")]
        problems = [f"{r.get('status', '?')}: {r.get('error', '')}".strip(": ") for r in members if r not in ok]

        cells = [name]
        alone_by_seed: dict = {}  # seed -> the tasks' scores, for the avg's paired change
        together_by_seed: dict = {}
        if not any(_tasks(r) == TASK_NAMES for r in ok):
            problems.append("no complete multi-task run")
        for t in TASK_NAMES:
            alone, together = _seed_scores(ok, (t,), t), _seed_scores(ok, TASK_NAMES, t)
            if not alone:
                problems.append(f"no complete {t}-only run")
            for by_seed, scores in ((alone_by_seed, alone), (together_by_seed, together)):
                for seed, v in scores.items():
                    by_seed.setdefault(seed, []).append(v)
            change = [together[s] - v for s, v in alone.items() if together.get(s) is not None and v is not None]
            cells += [fmt(list(alone.values())), fmt(list(together.values())), _signed(change)]
        n = len(TASK_NAMES)
        avg_alone = {s: sum(v) / n for s, v in alone_by_seed.items() if len(v) == n and None not in v}
        avg_together = {s: sum(v) / n for s, v in together_by_seed.items() if len(v) == n and None not in v}
        cells += [
            fmt(list(avg_alone.values())),
            fmt(list(avg_together.values())),
            _signed([v - avg_alone[s] for s, v in avg_together.items() if s in avg_alone]),
        ]
        wall = {
            tasks: mean([r.get("wall_time_s") for r in ok if _tasks(r) == tasks])
            for tasks in [(t,) for t in TASK_NAMES] + [TASK_NAMES]
        }
        singles = [wall[(t,)] for t in TASK_NAMES]
        cells += [fmt([] if None in singles else [sum(singles)], 0), fmt([wall[TASK_NAMES]], 0)]
        seeds = {r.get("seed") for r in ok}
        cells += [str(len(seeds)), "; ".join(problems) or "ok"]
        rows.append(cells)
    return header, rows


def _seed_scores(runs: list[dict], tasks: tuple[str, ...], task: str) -> dict:
    """seed -> the task's dev score (its main metric, best epoch), over the runs that trained on exactly `tasks`."""
    metric = TASKS[task].main_metric
    return {r.get("seed"): score(r["best"], "dev", task, metric) for r in runs if _tasks(r) == tasks}


def _tasks(run: dict) -> tuple[str, ...]:
    """The tasks a run trained on, in canonical order (all three when it does not say)."""
    named = run.get("tasks") or TASK_NAMES
    return tuple(t for t in TASK_NAMES if t in named)


def _signed(values: list[float]) -> str:
    text = fmt(values)
    return text if text == "-" or text.startswith("-") else "+" + text


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[c.replace("**", "") for c in r] for r in rows])


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, ax, path: Path, xlabel: str, ylabel: str) -> bool:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sweep(path: Path, runs: list[dict], key: str, xlabel: str, parts: tuple[str, ...]) -> bool:
    plt = pyplot()
    points: dict[float, list[dict]] = {}
    for r in runs:
        if r.get("status") == "complete" and r.get("best") and key in overrides(r):
            try:
                points.setdefault(float(overrides(r)[key]), []).append(r)
            except ValueError:
                return False
    if not points:
        return False
    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (t, m), color in zip([("sst5", "acc"), ("qqp", "acc"), ("stsb", "pearson")], ["C0", "C1", "C2"]):
        for p in parts:
            ys = [mean([score(r["best"], p, t, m) for r in points[x]]) for x in xs]
            ax.plot(xs, ys, marker="o", color=color, linestyle="-" if p == "dev" else "--", label=f"{p} {t} {m}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    return save_figure(plt, fig, ax, path, xlabel, "score (best epoch)")


def plot_epochs(path: Path, runs: list[dict]) -> bool:
    plt = pyplot()
    done = [r for r in runs if r.get("history")]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(done):
        name = (r.get("adapter") or {}).get("name", r["dir"])
        ep = [h["epoch"] for h in r["history"]]
        ax.plot(ep, [h.get("train_avg") for h in r["history"]], linestyle="--", color=f"C{i}", label=f"{name} train")
        ax.plot(ep, [h.get("dev_avg") for h in r["history"]], marker="o", color=f"C{i}", label=f"{name} dev")
    return save_figure(plt, fig, ax, path, "epoch", "avg of SST-5 acc, QQP acc, STS-B Pearson")


def build_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md, CSVs and PNGs for the runs under `root`; returns the report's path."""
    root = Path(root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f"peft-report: no {RESULTS} under {root}")
    by_study: dict[str, list[dict]] = {}
    for r in runs:
        by_study.setdefault(r.get("study") or "adhoc", []).append(r)
    studies = [s for s in ORDER if s in by_study] + sorted(s for s in by_study if s not in ORDER)
    models = sorted({(r.get("model") or {}).get("name", "?") for r in runs})
    lines = [
        f"# Report: {root.name}",
        "",
        f"{len(runs)} runs; models: {', '.join(models)}; {sum(r.get('status') == 'complete' for r in runs)} complete.",
        "",
    ]
    lines.append(
        "Scores are each run's best epoch by dev avg (mean of SST-5 acc, QQP acc, STS-B Pearson); "
        "the best value of each column is in bold; mean ± std over seeds where several ran."
    )
    if "minilm" in models:
        lines.append(
            "The packaged MiniLM saw Quora duplicate pairs in pretraining: its QQP scores are not clean transfer."
        )
    lines.append("")
    for study in studies:
        srun = by_study[study]
        lines += [f"## {TITLES.get(study, study)}", ""]
        if study == "epochs":
            header, rows = epochs_table(srun)
        elif study == "multitask_vs_single":
            header, rows = multitask_table(srun)
        else:
            header, rows, numbers = study_table(study, srun)
            rows = bold_best(header, rows, numbers, len(varying_keys(srun)))
        lines += [markdown(header, rows), "", f"CSV: `{study}.csv`", ""]
        write_csv(out / f"{study}.csv", header, rows)
        if study == "lora_rank" and plot_sweep(
            out / "lora_rank.png", srun, "adapter.rank", "LoRA rank r", ("train", "dev")
        ):
            lines += ["![metric vs rank](lora_rank.png)", ""]
        if study == "prefix_length" and plot_sweep(
            out / "prefix_length.png", srun, "adapter.length", "prefix length P", ("dev",)
        ):
            lines += ["![metric vs prefix length](prefix_length.png)", ""]
        if study == "epochs" and plot_epochs(out / "epochs.png", srun):
            lines += ["![train and dev vs epoch](epochs.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peft-report", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a multirun folder (searched recursively for results.json)")
    parser.add_argument("--out", help="where to write report.md, CSVs and PNGs (default: the root)")
    args = parser.parse_args(argv)
    print(build_report(args.root, args.out))


if __name__ == "__main__":
    main()
