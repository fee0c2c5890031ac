"""Tables of a study from its runs' results.json: rows of formatted cells, one per setting.

`study_table`: rows are the sweep's varying overrides; runs that differ only in seed are averaged and
shown as mean +- std; scores are each run's chosen epoch (by its selection split, or by dev under the
study's protocol: `protocol`), the checkpoint it predicts with;
a failed or unfinished job is a row that says so. `epochs_table`: one row per strategy and epoch mark of
the long runs, mean +- std over seeds, with the train - dev gap. `multitask_table`: each task's score trained alone beside trained with the other two.
"""

from __future__ import annotations

from peft_lightning.comparisons import FLOOR_KEY, FLOOR_PER_TASK, interval_cell, interval_columns
from peft_lightning.results import selection_score
from peft_lightning.runs import Num, complete, fmt, mean, overrides, score, strategy, varying_keys
from peft_lightning.tasks import TASK_NAMES, TASKS

METRICS = [("sst5", "acc"), ("qqp", "acc"), ("qqp", "f1"), ("stsb", "pearson"), ("stsb", "spearman")]
WITH_TRAIN = {"epochs", "lora_rank"}
# studies whose setting peft-tune chooses on the selection split: its avg beside dev's, and the choice
CHOSEN_ON_SELECT = {"tune_lr": "optim.tuned_lr"}
WITH_COST = {
    "main",
    "peft_methods",
    "lora_targets",
    "mtl_methods",
}  # tables that also show parameters, step time, memory


def study_table(
    study: str, runs: list[dict], floor: dict | None = None
) -> tuple[list[str], list[list[str]], list[list[float | None]]]:
    """Header, formatted rows, and the numeric means behind them (for bolding and plots); with the
    bag-of-words `floor` run, each row's dev avg difference to it."""
    keys = varying_keys(runs)
    parts = ["train", "dev"] if study in WITH_TRAIN else ["dev"]
    header = list(keys) + [f"{p} {t} {m}" for p in parts for t, m in METRICS] + [f"{p} avg" for p in parts]
    chosen_by = CHOSEN_ON_SELECT.get(study)
    if chosen_by:
        header += ["select avg", "chosen"]
    extra = study in WITH_COST
    if extra:
        header += ["trainable (encoder)", "trainable (with heads)", "step ms", "peak MiB"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(overrides(r).get(k, "") for k in keys), []).append(r)
    chosen = _chosen(groups, keys, chosen_by) if chosen_by else set()
    ci_header, ci_cells, comp = interval_columns(study, keys, {k: complete(m)[0] for k, m in groups.items()}, floor)
    header += ci_header + ["seeds", "status"]
    rows, numbers = [], []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(_sort_key(v) for v in kv[0])):
        ok, problems = complete(members)
        cells, nums = list(key), []
        for p in parts:
            for t, m in METRICS:
                vals = [score(r["best"], part(r["best"], p), t, m) for r in ok]
                cells.append(fmt(vals))
                nums.append(mean(vals))
        for p in parts:
            vals = [r["best"].get(f"{part(r['best'], p)}_avg") for r in ok]
            cells.append(fmt(vals))
            nums.append(mean(vals))
        if chosen_by:
            vals = [r["best"].get("select_avg") for r in ok]
            cells += [fmt(vals), "yes" if key in chosen else ""]
            nums += [mean(vals), None]
        if extra:
            for path in (("params", "encoder", "trainable"), ("params", "with_heads", "trainable")):
                vals = [_get(r, path) for r in ok]
                cells.append(Num(f"{int(vals[0]):,}", value=int(vals[0])) if vals and vals[0] is not None else Num("-"))
                nums.append(None)
            # step time without each fit's warm-up steps (compile); runs from before it have only the mean
            steady = [r.get("steady_step_ms") or r.get("step_time_ms") for r in ok]
            for vals in (steady, [r.get("peak_memory_mb") for r in ok]):
                cells.append(fmt(vals, 1))
                nums.append(None)
        cells += ci_cells[key]
        nums += [None] * len(ci_header)
        cells += [Num(str(len(ok)), value=len(ok)), "; ".join(problems) or "ok"]
        rows.append(cells)
        numbers.append(nums)
    if floor is not None and study in FLOOR_PER_TASK and FLOOR_KEY in comp.preds:
        rows.append(floor_row(header, keys, floor, comp.score(FLOOR_KEY, None)))
        numbers.append([None] * len(numbers[0]) if numbers else [])  # not a contender for bold
    return header, rows, numbers


def _chosen(groups: dict[tuple, list[dict]], keys: list[str], setting: str) -> set[tuple]:
    """The rows peft-tune chooses: among the rows that differ only in `setting` (one strategy's lrs),
    the one with the highest mean selection-split avg (`tune.choose`'s rule; dev for runs from
    before the selection split)."""
    if setting not in keys:
        return set()
    at = keys.index(setting)
    best: dict[tuple, tuple[float, tuple]] = {}
    for key, members in groups.items():
        value = mean([selection_score(r["best"]) for r in complete(members)[0]])
        rest = key[:at] + key[at + 1 :]
        if value is not None and (rest not in best or value > best[rest][0]):
            best[rest] = (value, key)
    return {key for _, key in best.values()}


def floor_row(header: list[str], keys: list[str], floor: dict, avg) -> list[str]:
    """The bag-of-words floor as a row of the table: its dev scores, its dev avg and that avg's
    interval `avg` (the rows' alone: it has no seed); "-" in the columns it has nothing for."""
    best = floor["best"]
    cells = {keys[0]: "bag-of-words floor", "seeds": Num("-"), "status": "ok"}
    for t, m in METRICS:
        cells[f"dev {t} {m}"] = fmt([score(best, "dev", t, m)])
    cells["dev avg"] = fmt([best.get("dev_avg")])
    if avg is not None:
        cells["dev avg 95% CI"] = interval_cell(f"{avg.plain()} rows only", avg)
    return [cells.get(h, "" if h in keys else Num("-")) for h in header]


def part(entry: dict, name: str) -> str:
    """Where an epoch's `train` scores are read from: the train_eval sample scored like dev (eval mode,
    the weights of that epoch) where the run has it, else the metrics averaged during training."""
    return "train_eval" if name == "train" and entry.get("train_eval") else name


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
    """One row per strategy and epoch mark: each score's mean ± std over the strategy's seeds, the
    train - dev gap of the avg (per seed, then averaged), how many seeds reached the mark, and what
    became of the runs that did not."""
    header = (
        ["strategy", "epoch"]
        + [f"{p} {t} {m}" for p in ("train", "dev") for t, m in METRICS if m != "spearman"]
        + ["train avg", "dev avg", "train - dev avg", "seeds", "status"]
    )
    by_strategy: dict[str, list[dict]] = {}
    for r in runs:
        by_strategy.setdefault(strategy(r), []).append(r)
    rows = []
    for name, members in by_strategy.items():
        marks = sorted(
            {
                m
                for r in members
                for m in ((r.get("config") or {}).get("budget") or {}).get("epoch_marks")
                or [h["epoch"] for h in r.get("history", [])]
            }
        )
        for mark in marks:
            reached = [h for r in members for h in r.get("history", []) if h["epoch"] == mark]
            missing = [r for r in members if not any(h["epoch"] == mark for h in r.get("history", []))]
            cells = [name, str(mark)]
            cells += [
                fmt([score(h, part(h, p), t, m) for h in reached])
                for p in ("train", "dev")
                for t, m in METRICS
                if m != "spearman"
            ]
            train_avg = [h.get(f"{part(h, 'train')}_avg") for h in reached]
            dev_avg = [h.get("dev_avg") for h in reached]
            gaps = [t - d for t, d in zip(train_avg, dev_avg) if t is not None and d is not None]
            cells += [fmt(train_avg), fmt(dev_avg), fmt(gaps), Num(str(len(reached)), value=len(reached))]
            problems = [
                f"seed {r.get('seed', '?')}: {r.get('status', '?')}" + (": " + r["error"] if r.get("error") else "")
                for r in missing
            ]
            cells.append("; ".join(problems) or "ok")
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
        by_adapter.setdefault(strategy(r), []).append(r)
    rows = []
    for name in sorted(by_adapter):
        members = by_adapter[name]
        ok, problems = complete(members)

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
        cells += [Num(str(len(seeds)), value=len(seeds)), "; ".join(problems) or "ok"]
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


def _signed(values: list[float]) -> Num:
    cell = fmt(values)
    return cell if cell == "-" or cell.startswith("-") else Num("+" + cell, **cell.values)


def protocol(runs: list[dict]) -> str:
    """How the runs of a table chose their epoch, in words (runs from before the selection split: dev)."""
    ons = {(r.get("selection") or {}).get("on", "dev") for r in runs}
    if ons == {"select"}:
        rows = next(r["selection"].get("rows") for r in runs if r.get("selection"))
        held = ", ".join(f"{t} {n:,}" for t, n in (rows or {}).items())
        return f"best epoch chosen on the selection split held out of training ({held} rows); dev only scored"
    if ons == {"dev"}:
        return "best epoch chosen on dev, the rows reported (the study's protocol: dev scores are optimistic)"
    return "mixed: some runs chose their epoch on the selection split, some on dev"
