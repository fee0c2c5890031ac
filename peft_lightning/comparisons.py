"""What a report can claim: each setting of a study against the study's reference, with 95%
intervals from the paired bootstrap (`stats`), and the study's findings checked against them.

A study's settings are compared on the dev rows that every one of its runs predicted (runs write
`predictions/{task}-dev.tsv` with the label beside each prediction). References: main and
peft_methods against full fine-tuning, lora_rank against r=8, prefix_length against P=4,
prefix_mlp against no MLP at the same length, mtl_methods against the summed loss of the same strategy, lora_scaling against fixed scaling at the same
rank, lora_targets against all linear layers, sts_head against the MLP head.
"""

from __future__ import annotations

import csv
import functools
import zlib
from pathlib import Path

import numpy as np

import peft_lightning.stats as stats
from peft_lightning.runs import Num
from peft_lightning.stats import Interval
from peft_lightning.tasks import TASK_NAMES, TASKS

REFERENCE = {
    "main": ("adapter", "full"),
    "peft_methods": ("adapter", "full"),
    "lora_rank": ("adapter.rank", "8"),
    "prefix_length": ("adapter.length", "4"),
    "prefix_mlp": ("adapter.mlp", "false"),
    "lora_scaling": ("adapter.scaling", "fixed"),
    "lora_targets": ("adapter.targets", "[all]"),
    "sts_head": ("model.sts_head", "mlp"),
    "mtl_methods": ("mtl", "sum"),
    "tuned": ("adapter", "full"),
}
MAIN = [(t, TASKS[t].main_metric) for t in TASK_NAMES]


def dev_predictions(
    run: dict, split: str = "dev", folder: str = "predictions"
) -> dict[str, dict[str, tuple[float, float]]] | None:
    """task -> {id: (prediction, label)} from the run's `<folder>/{task}-<split>.tsv` files (dev by
    default; `select`, `train_eval`, and `predictions/last` for the last epoch's); None without them."""
    root = Path(run.get("path", "")) / folder
    out = {}
    for task in TASK_NAMES:
        path = root / f"{task}-{split}.tsv"
        if path.is_file():
            stat = path.stat()
            rows = _read_labelled(str(path), stat.st_mtime_ns, stat.st_size)
            if rows is not None:
                out[task] = rows
    return out or None


@functools.lru_cache(maxsize=4096)
def _read_labelled(path: str, mtime_ns: int, size: int) -> dict[str, tuple[float, float]] | None:
    """{id: (prediction, label)} of a prediction file, read once per version of it (a report reads
    each run's files for its table, its rows line and its findings)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or rows[0][:3] != ["id", "prediction", "label"]:
        return None  # written before dev files carried their labels
    return {r[0]: (float(r[1]), float(r[2])) for r in rows[1:]}


def run_seed(run: dict):
    """The run's seed (what pairs it with another setting's run), from results.json or its overrides."""
    seed = run.get("seed")
    if seed is None:
        seed = next((o.split("=", 1)[1] for o in run.get("overrides") or [] if o.startswith("seed=")), None)
    try:
        return int(seed)
    except (TypeError, ValueError):
        return seed


def load_by_seed(groups: dict[tuple, list[dict]], split: str, folder: str) -> dict[tuple, dict]:
    """setting -> seed -> the run's `dev_predictions` of `split` (a repeated seed: the first run)."""
    loaded: dict[tuple, dict] = {}
    for key, runs in groups.items():
        for r in runs:
            p = dev_predictions(r, split, folder)
            if p:
                loaded.setdefault(key, {}).setdefault(run_seed(r), p)
    return loaded


class StudyComparison:
    """The settings of one study on the rows every one of its runs predicted, with one set of
    bootstrap draws per task; each setting's runs keyed by seed (see `stats`).

    Args:
        groups: table row key -> the row's complete runs.
        n_boot: bootstrap draws per task.
        split, folder: which prediction files (dev by default; see `dev_predictions`).
    """

    def __init__(
        self,
        groups: dict[tuple, list[dict]],
        n_boot: int = stats.N_BOOT,
        split: str = "dev",
        folder: str = "predictions",
    ):
        self.labels: dict[str, np.ndarray] = {}
        self.idx: dict[str, np.ndarray] = {}
        self.preds: dict[tuple, dict[str, dict]] = {}  # key -> task -> seed -> (n,) predictions
        loaded = load_by_seed(groups, split, folder)
        for task, _ in MAIN:
            if not loaded or any(task not in p for seeds in loaded.values() for p in seeds.values()):
                continue
            ids = sorted(set.intersection(*(set(p[task]) for seeds in loaded.values() for p in seeds.values())))
            if len(ids) < 2:
                continue
            first = next(p for seeds in loaded.values() for p in seeds.values())
            self.labels[task] = np.array([first[task][i][1] for i in ids])
            # each task and split its own stream of draws: a dev avg (or a train - dev gap) then
            # averages independent row draws, not one stream cut to different lengths
            self.idx[task] = stats.draws(len(ids), n_boot, seed=zlib.crc32(f"{task}/{split}".encode()))
            for key, seeds in loaded.items():
                self.preds.setdefault(key, {})[task] = {
                    s: np.array([p[task][i][0] for i in ids]) for s, p in seeds.items()
                }
        self._scores: dict[tuple, stats.Scores] = {}

    @property
    def tasks(self) -> list[str]:
        return [t for t, _ in MAIN if t in self.labels]

    def rows(self, task: str) -> int:
        return len(self.labels.get(task, ()))

    def seeds(self, key: tuple) -> list:
        return sorted(next(iter(self.preds[key].values()))) if self.preds.get(key) else []

    def scores(self, key: tuple, task: str | None) -> stats.Scores | None:
        """The setting's main metric on `task` (None: the dev avg over the tasks) per seed, with replicates."""
        if key not in self.preds or not self.tasks:
            return None
        if task is None:
            return stats.Scores.average([self.scores(key, t) for t in self.tasks])
        if task not in self.labels:
            return None
        if (key, task) not in self._scores:
            m = TASKS[task].main_metric
            self._scores[(key, task)] = stats.Scores.of(m, self.preds[key][task], self.labels[task], self.idx[task])
        return self._scores[(key, task)]

    def score(self, key: tuple, task: str | None) -> Interval | None:
        """The setting's main metric on `task` (None: the dev avg) and its interval."""
        s = self.scores(key, task)
        return s.interval() if s else None

    def difference(self, key: tuple, ref: tuple, task: str | None) -> Interval | None:
        """key - ref on the main metric of `task` (None: the dev avg), seeds paired by value, with its interval."""
        a, b = self.scores(key, task), self.scores(ref, task)
        return (a - b).interval() if a and b else None


def seedwise_scores(
    groups: dict[tuple, list[dict]], split: str, folder: str = "predictions", n_boot: int = stats.N_BOOT
) -> dict[str, dict[tuple, stats.Scores]]:
    """task -> setting -> its main metric per seed, for a split whose rows are drawn per seed (the
    train_eval sample comes from the seed's own training rows, so two seeds share few of them).

    Each seed is scored on the rows its runs share across the settings (paired within the seed),
    with bootstrap draws of its own: no row noise is shared between seeds, so the interval's row
    part is the seeds' spread alone (`stats.t_interval`: the covariance of two seeds' replicates
    is then zero in expectation). Tasks some seed lacks (or shares under 2 rows of) are left out.
    """
    loaded = load_by_seed(groups, split, folder)
    if not loaded:
        return {}
    seeds = sorted(set.intersection(*(set(s) for s in loaded.values())), key=str)
    out: dict[str, dict[tuple, stats.Scores]] = {}
    for task, metric in MAIN:
        per_key: dict[tuple, dict] = {k: {"point": {}, "reps": {}} for k in loaded}
        rows = []
        for seed in seeds:
            files = [loaded[k][seed].get(task) for k in loaded]
            if any(f is None for f in files):
                break
            ids = sorted(set.intersection(*(set(f) for f in files)))
            if len(ids) < 2:
                break
            label = np.array([files[0][i][1] for i in ids])
            idx = stats.draws(len(ids), n_boot, seed=zlib.crc32(f"{task}/{split}/{seed}".encode()))
            for k in loaded:
                s = stats.Scores.of(metric, {seed: np.array([loaded[k][seed][task][i][0] for i in ids])}, label, idx)
                per_key[k]["point"].update(s.point)
                per_key[k]["reps"].update(s.reps)
            rows.append(len(ids))
        else:
            if seeds:
                out[task] = {k: stats.Scores(v["point"], v["reps"], min(rows)) for k, v in per_key.items()}
    return out


def reference_of(study: str, keys: list[str], key: tuple, rows: list[tuple] | None = None) -> tuple | None:
    """The row `key` is compared with: the same settings but the reference value of the study's key
    or, where no row has those (tuned: each strategy at its own lr), the one row with that value."""
    if study not in REFERENCE or REFERENCE[study][0] not in keys:
        return None
    name, value = REFERENCE[study]
    i = keys.index(name)
    ref = (*key[:i], value, *key[i + 1 :])
    if rows is not None and ref not in rows:
        only = [r for r in rows if r[i] == value]
        return only[0] if len(only) == 1 else ref
    return ref


def interval_columns(study: str, keys: list[str], groups: dict[tuple, list[dict]], floor: dict | None = None):
    """Extra header cells and, per row key, the cells: the dev avg's 95% interval, the paired
    differences to the reference (each task's main metric and the avg) with theirs, and with a
    `floor` run (the bag-of-words row), the dev avg's difference to it. Each interval says how many
    seeds it rests on (n); `comp.rows` how many dev rows."""
    comp = StudyComparison({**groups, **({FLOOR_KEY: [floor]} if floor else {})})
    ref_name = REFERENCE.get(study, (None, None))
    header = ["dev avg 95% CI"]
    label = f"{ref_name[0]}={ref_name[1]}" if ref_name[0] in keys else None
    if label:
        header += [f"Δ {t} {m} vs {label}" for t, m in MAIN] + [f"Δ dev avg vs {label}"]
    with_floor = floor is not None and FLOOR_KEY in comp.preds
    floor_tasks = [t for t, _ in MAIN if t in comp.tasks] if with_floor and study in FLOOR_PER_TASK else []
    if with_floor:
        header += [f"Δ {t} {m} vs floor" for t, m in MAIN if t in floor_tasks] + ["Δ dev avg vs floor"]
    cells: dict[tuple, list[str]] = {}
    for key in groups:
        score = comp.score(key, None)
        row = [interval_cell(f"{score.plain()} n={score.n}", score) if score else Num("-")]
        if label:
            ref = reference_of(study, keys, key, list(groups))
            for task in [t for t, _ in MAIN] + [None]:
                if key == ref:
                    row.append(Num("reference", value=0.0, lo=0.0, hi=0.0, n=None))
                    continue
                d = comp.difference(key, ref, task) if task is None or task in comp.tasks else None
                row.append(interval_cell(f"{d.signed()} n={d.n}", d) if d else Num("-"))
        if with_floor:
            for task in [*floor_tasks, None]:
                d = comp.difference(key, FLOOR_KEY, task)
                row.append(interval_cell(f"{d.signed()} n={d.n}", d) if d else Num("-"))
        cells[key] = row
    return header, cells, comp


def interval_cell(text: str, interval) -> Num:
    """An interval's cell: its text, and its estimate, ends and seeds as numbers (the CSVs' columns)."""
    return Num(text, value=interval.value, lo=interval.low, hi=interval.high, n=interval.n)


FLOOR_KEY = ("floor",)  # the bag-of-words run's row key in a comparison
FLOOR_PER_TASK = ("main", "tuned")  # tables that set each task's score against the floor, not only the avg
