"""What a report can claim: each setting of a study against the study's reference, with 95%
intervals from the paired bootstrap (`stats`), and the study's findings checked against them.

A study's settings are compared on the dev rows that every one of its runs predicted (runs write
`predictions/{task}-dev.tsv` with the label beside each prediction). References: main and
peft_methods against full fine-tuning, lora_rank against r=8, prefix_length against P=4,
prefix_mlp against no MLP at the same length, lora_scaling against fixed scaling at the same
rank, lora_targets against all linear layers, sts_head against the MLP head.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import peft_lightning.stats as stats
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
    "tuned": ("adapter", "full"),
}
MAIN = [(t, TASKS[t].main_metric) for t in TASK_NAMES]


def dev_predictions(run: dict) -> dict[str, dict[str, tuple[float, float]]] | None:
    """task -> {id: (prediction, label)} from the run's dev predictions files; None without them."""
    folder = Path(run.get("path", "")) / "predictions"
    out = {}
    for task in TASK_NAMES:
        path = folder / f"{task}-dev.tsv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or rows[0][:3] != ["id", "prediction", "label"]:
            continue  # written before dev files carried their labels
        out[task] = {r[0]: (float(r[1]), float(r[2])) for r in rows[1:]}
    return out or None


@dataclass
class Setting:
    """One table row's runs (ordered by seed), as arrays on the study's common dev rows."""

    key: tuple
    preds: dict[str, list[np.ndarray]]  # task -> one array per seed


class StudyComparison:
    """The settings of one study on common dev rows, with one set of bootstrap draws per task."""

    def __init__(self, groups: dict[tuple, list[dict]], n_boot: int = stats.N_BOOT):
        self.settings: dict[tuple, Setting] = {}
        self.labels: dict[str, np.ndarray] = {}
        self.idx: dict[str, np.ndarray] = {}
        loaded = {
            k: [(r, dev_predictions(r)) for r in sorted(rs, key=lambda r: str(r.get("seed")))]
            for k, rs in groups.items()
        }
        loaded = {k: [(r, p) for r, p in rs if p] for k, rs in loaded.items()}
        loaded = {k: rs for k, rs in loaded.items() if rs}
        for task, _ in MAIN:
            id_sets = [set(p[task]) for rs in loaded.values() for _, p in rs if task in p]
            if not id_sets or any(task not in p for rs in loaded.values() for _, p in rs):
                continue
            ids = sorted(set.intersection(*id_sets))
            if len(ids) < 2:
                continue
            first = next(p for rs in loaded.values() for _, p in rs)
            self.labels[task] = np.array([first[task][i][1] for i in ids])
            self.idx[task] = stats.draws(len(ids), n_boot)
            for k, rs in loaded.items():
                s = self.settings.setdefault(k, Setting(k, {}))
                s.preds[task] = [np.array([p[task][i][0] for i in ids]) for _, p in rs]

    @property
    def tasks(self) -> list[str]:
        return [t for t, _ in MAIN if t in self.labels]

    def rows(self, task: str) -> int:
        return len(self.labels.get(task, ()))

    def score(self, key: tuple, task: str | None) -> Interval | None:
        """The setting's main metric on `task` (None: the dev avg over the tasks) and its interval."""
        s = self.settings.get(key)
        if s is None or not self.tasks:
            return None
        if task is not None:
            return stats.score_interval(TASKS[task].main_metric, s.preds[task], self.labels[task], self.idx[task])
        reps = [
            stats.replicate_scores(TASKS[t].main_metric, s.preds[t], self.labels[t], self.idx[t]) for t in self.tasks
        ]
        est = [stats.point(TASKS[t].main_metric, s.preds[t], self.labels[t]) for t in self.tasks]
        return stats.interval(np.mean(reps, axis=0), float(np.mean(est)))

    def difference(self, key: tuple, ref: tuple, task: str | None) -> Interval | None:
        """key - ref on the main metric of `task` (None: the dev avg), paired, with its interval."""
        a, b = self.settings.get(key), self.settings.get(ref)
        if a is None or b is None or not self.tasks:
            return None
        tasks = [task] if task is not None else self.tasks
        reps, est = [], []
        for t in tasks:
            m = TASKS[t].main_metric
            reps.append(
                stats.replicate_scores(m, a.preds[t], self.labels[t], self.idx[t])
                - stats.replicate_scores(m, b.preds[t], self.labels[t], self.idx[t])
            )
            est.append(stats.point(m, a.preds[t], self.labels[t]) - stats.point(m, b.preds[t], self.labels[t]))
        return stats.interval(np.mean(reps, axis=0), float(np.mean(est)))


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


def interval_columns(study: str, keys: list[str], groups: dict[tuple, list[dict]]):
    """Extra header cells and, per row key, the cells: the dev avg's 95% interval, and the paired
    differences to the reference (each task's main metric and the avg) with theirs."""
    comp = StudyComparison(groups)
    ref_name = REFERENCE.get(study, (None, None))
    header = ["dev avg 95% CI"]
    label = f"{ref_name[0]}={ref_name[1]}" if ref_name[0] in keys else None
    if label:
        header += [f"Δ {t} {m} vs {label}" for t, m in MAIN] + [f"Δ dev avg vs {label}"]
    cells: dict[tuple, list[str]] = {}
    for key in groups:
        score = comp.score(key, None)
        row = [score.plain() if score else "-"]
        if label:
            ref = reference_of(study, keys, key, list(groups))
            for task in [t for t, _ in MAIN] + [None]:
                if key == ref:
                    row.append("reference")
                    continue
                d = comp.difference(key, ref, task) if task is None or task in comp.tasks else None
                row.append(d.signed() if d else "-")
        cells[key] = row
    return header, cells, comp
