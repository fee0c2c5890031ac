"""The report's figures: each titled with its study, model, budget, seeds and dev rows, with the
report's own 95% intervals as error bars, and one axis per metric.

- `plot_study`: one panel per task's main metric (SST-5 acc, QQP acc, STS-B Pearson) and one for
  the dev avg. A study whose setting is a number (rank, prefix length, lr) is drawn against it, one
  line per other setting (LoRA scaling, prefix with or without its MLP, the strategy of an lr
  search); the others as points per setting. The bag-of-words floor is a dotted line; studies that
  report train scores (epochs, rank) add them dashed (means: the train rows have no interval).
- `plot_epochs`: train and dev avg against the epoch (whole epochs), the mean over seeds with a
  band from the lowest to the highest seed.

Points are the means over seeds; where the runs' prediction files are at hand (always, for runs
this project writes) the bars are the intervals of the report's tables (`comparisons`).
"""

from __future__ import annotations

from pathlib import Path

from peft_lightning.comparisons import FLOOR_KEY, MAIN, StudyComparison
from peft_lightning.runs import complete, mean, overrides, score, varying_keys
from peft_lightning.tables import CHOSEN_ON_SELECT
from peft_lightning.tasks import TASKS

# a study's numeric setting (its x axis) and the axis scale
NUMERIC_X = {
    "lora_rank": ("adapter.rank", 2),
    "prefix_length": ("adapter.length", 2),
    "prefix_mlp": ("adapter.length", 2),
    "lora_scaling": ("adapter.rank", 2),
    "tune_lr": ("optim.tuned_lr", 10),
}
WITH_TRAIN = {"lora_rank"}
LABEL = {"sst5": "SST-5", "qqp": "QQP", "stsb": "STS-B"}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def title(heading: str, runs: list[dict], comp: StudyComparison | None) -> str:
    """`heading` and, below it, model, budget, seeds and the dev rows the intervals rest on."""
    models = sorted({(r.get("model") or {}).get("name", "?") for r in runs})
    budgets = sorted({str(((r.get("config") or {}).get("budget") or {}).get("name", "?")) for r in runs})
    seeds = sorted({str(r.get("seed")) for r in runs if r.get("seed") is not None})
    rows = ", ".join(f"{LABEL[t]} {comp.rows(t):,}" for t in comp.tasks) if comp and comp.tasks else "-"
    return f"{heading}\n{', '.join(models)} · budget {', '.join(budgets)} · seeds {', '.join(seeds) or '-'} · dev rows {rows}"


def plot_study(path: Path, study: str, runs: list[dict], heading: str, floor: dict | None = None) -> bool:
    """The study's figure (see the module doc) into `path`; False where no run is complete."""
    keys = varying_keys(runs)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(overrides(r).get(k, "") for k in keys), []).append(r)
    groups = {k: ok for k, v in groups.items() if (ok := complete(v)[0])}
    if not groups or not keys:
        return False
    comp = StudyComparison({**groups, **({FLOOR_KEY: [floor]} if floor else {})})
    xkey, base = NUMERIC_X.get(study, (None, None))
    numeric = xkey in keys and all(_number(k[keys.index(xkey)]) is not None for k in groups)
    series: dict[tuple, list[tuple]] = {}
    for key in groups:
        rest = tuple(v for k, v in zip(keys, key) if not (numeric and k == xkey))
        series.setdefault(rest, []).append(key)
    plt = pyplot()
    panels = [(t, m) for t, m in MAIN] + [(None, "avg")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6))
    positions = {key: i for i, key in enumerate(sorted(groups, key=_order))}
    for ax, (task, metric) in zip(axes, panels):
        for i, (rest, members) in enumerate(sorted(series.items())):
            members = sorted(members, key=lambda k: _number(k[keys.index(xkey)]) if numeric else positions[k])
            xs = [_number(k[keys.index(xkey)]) if numeric else positions[k] for k in members]
            ys, low, high = [], [], []
            for key in members:
                iv = comp.score(key, task) if comp.tasks else None
                y = iv.value if iv else _mean_score(groups[key], task, metric, "dev")
                ys.append(y)
                low.append(y - iv.low if iv else 0.0)
                high.append(iv.high - y if iv else 0.0)
            # a setting a row does not have (full's optim.adapter_lr beside LoRA's) is left out, not "key="
            shown = [k for k in keys if not (numeric and k == xkey)]
            label = ", ".join(f"{k}={v}" for k, v in zip(shown, rest) if v != "")
            color = f"C{i}"
            if comp.tasks:
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, color=color, label=label or "dev")
            else:
                ax.plot(xs, ys, marker="o", color=color, label=label or "dev")
            if study in WITH_TRAIN:
                train = [_mean_score(groups[k], task, metric, "train") for k in members]
                ax.plot(xs, train, linestyle="--", color=color, alpha=0.7, label=f"{label + ' ' if label else ''}train")
            if study in CHOSEN_ON_SELECT:  # what peft-tune chooses the lr on, not dev
                select = [_mean_score(groups[k], task, metric, "select") for k in members]
                if any(v is not None for v in select):
                    name = f"{label + ' ' if label else ''}selection split (chooses)"
                    ax.plot(xs, select, linestyle="-.", marker="s", color=color, alpha=0.7, label=name)
        if floor is not None and comp.tasks:
            iv = comp.score(FLOOR_KEY, task)
            if iv is not None:
                ax.axhline(iv.value, color="grey", linestyle=":", label="bag-of-words floor")
        ax.set_title(f"{LABEL[task]} {metric}" if task else "dev avg (the three)", fontsize=9)
        both = "dev, selection" if study in CHOSEN_ON_SELECT else "dev"
        ax.set_ylabel(f"{both} {metric}" if task else f"{both} avg")
        ax.grid(alpha=0.3)
        if numeric:
            ax.set_xscale("log", base=base)
            ticks = sorted({_number(k[keys.index(xkey)]) for k in groups})
            names = [f"{t:g}" if base == 2 else f"{t:.0e}".replace("e-0", "e-") for t in ticks]
            ax.set_xticks(ticks, names, rotation=0 if base == 2 else 30, fontsize=8)
            ax.minorticks_off()
            ax.set_xlabel(xkey)
        else:
            ordered = sorted(groups, key=_order)
            names = [",".join(v for v in k if v != "") for k in ordered]
            ax.set_xticks(range(len(ordered)), names, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(ordered) - 0.5)
    handles, labels = axes[-1].get_legend_handles_labels()  # below the panels: never over a point
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7, frameon=False)
    fig.suptitle(title(heading, runs, comp), fontsize=9)
    rows = (len(labels) + 3) // 4
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_epochs(path: Path, runs: list[dict], heading: str) -> bool:
    """Train and dev avg per epoch, each strategy's mean over seeds with its seeds' range as a band."""
    from matplotlib.ticker import MaxNLocator

    done = [r for r in runs if r.get("history")]
    if not done:
        return False
    by_name: dict[str, list[dict]] = {}
    for r in done:
        by_name.setdefault((r.get("adapter") or {}).get("name", r.get("dir", "?")), []).append(r)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, members) in enumerate(sorted(by_name.items())):
        for part, style in (("train", "--"), ("dev", "-")):
            per_epoch: dict[int, list[float]] = {}
            for r in members:
                for h in r["history"]:
                    v = h.get("train_eval_avg", h.get("train_avg")) if part == "train" else h.get("dev_avg")
                    if v is not None:
                        per_epoch.setdefault(int(h["epoch"]), []).append(v)
            if not per_epoch:
                continue
            xs = sorted(per_epoch)
            ys = [mean(per_epoch[x]) for x in xs]
            ax.plot(
                xs, ys, linestyle=style, marker="o" if part == "dev" else None, color=f"C{i}", label=f"{name} {part}"
            )
            if any(len(per_epoch[x]) > 1 for x in xs):
                ax.fill_between(
                    xs, [min(per_epoch[x]) for x in xs], [max(per_epoch[x]) for x in xs], color=f"C{i}", alpha=0.15
                )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("avg of SST-5 acc, QQP acc, STS-B Pearson")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    finished = {(i,): [r] for i, r in enumerate(done) if r.get("status") == "complete"}
    rows = StudyComparison(finished, n_boot=2) if finished else None  # the dev rows every run predicted
    fig.suptitle(title(heading + " (mean over seeds; band: lowest to highest seed)", done, rows), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _order(key: tuple) -> tuple:
    return tuple((0, _number(v), "") if _number(v) is not None else (1, 0.0, str(v)) for v in key)


def _mean_score(runs: list[dict], task: str | None, metric: str, part: str) -> float | None:
    """The mean over seeds of the runs' chosen-epoch score (train: the train_eval sample where measured)."""
    values = []
    for r in runs:
        best = r["best"]
        where = "train_eval" if part == "train" and best.get("train_eval") else part
        if task is None:
            values.append(best.get(f"{where}_avg"))
        else:
            values.append(score(best, where, task, TASKS[task].main_metric))
    return mean(values)


def plot_search(path: Path, searches: list[dict], importances: dict[str, dict[str, float]]) -> bool:
    """peft-tune search=optuna: per strategy, each trial's selection score in trial order (pruned
    trials at their last reported score, marked x) and, where a study searched two axes or more,
    Optuna's fANOVA importance of each axis."""
    searches = [s for s in searches if s.get("scores")]
    if not searches:
        return False
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    with_imp = [s["strategy"] for s in searches if importances.get(s["strategy"])]
    cols = len(searches) + len(with_imp)
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.6), squeeze=False)
    for ax, s in zip(axes[0], searches):
        for state, marker in (("complete", "o"), ("pruned", "x")):
            pts = [
                (t["trial"], t["score"] if t["score"] is not None else t.get("last"))
                for t in s["scores"]
                if t["state"] == state
            ]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker, label=f"{state} ({len(pts)})")
        ax.set_title(f"{s['strategy']}: trials")
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers: 0, 1, 2, not 0.5
        ax.set_ylabel("select avg (pruned: its last)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, name in zip(axes[0][len(searches) :], with_imp):
        imp = importances[name]
        ax.barh(list(imp), list(imp.values()))
        ax.set_title(f"{name}: parameter importance (fANOVA)")
        ax.set_xlim(0, 1)
    fig.suptitle("Optuna search (selection split, one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
