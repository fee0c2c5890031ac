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

from peft_lightning import stats
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


# ---- the study's claims, checked -----------------------------------------------------------------

REPRODUCED, CONTRADICTED, UNRESOLVED = "reproduced", "contradicted", "unresolved"


def verdict(intervals: list[Interval | None], expect: str, tolerance: float = 0.01) -> str:
    """A claim's verdict from the intervals of the differences it is about.

    expect `+`: every difference is above 0 (each interval excludes 0 on the positive side) ->
    reproduced; one is below 0 (its interval excludes 0 on the negative side) -> contradicted;
    else unresolved. `-`: the mirror. `0` ("barely matters"): every interval inside
    [-tolerance, tolerance] -> reproduced; one entirely outside it -> contradicted.
    A missing interval leaves the claim unresolved (unless another contradicts it).
    """
    if expect not in ("+", "-", "0"):
        raise ValueError(f"expect must be '+', '-' or '0', got {expect!r}")
    known = [i for i in intervals if i is not None]
    if expect == "0":
        if any(i.low > tolerance or i.high < -tolerance for i in known):
            return CONTRADICTED
        ok = known and len(known) == len(intervals) and all(-tolerance <= i.low and i.high <= tolerance for i in known)
        return REPRODUCED if ok else UNRESOLVED
    sign = 1 if expect == "+" else -1
    if any((i.high < 0) if sign > 0 else (i.low > 0) for i in known):
        return CONTRADICTED
    ok = known and len(known) == len(intervals) and all((i.low > 0) if sign > 0 else (i.high < 0) for i in known)
    return REPRODUCED if ok else UNRESOLVED


def combine(verdicts: list[str]) -> str:
    """All parts reproduced -> reproduced; any contradicted -> contradicted; else unresolved."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return REPRODUCED if verdicts and all(v == REPRODUCED for v in verdicts) else UNRESOLVED


def seed_interval(a: list[float], b: list[float], n_boot: int = stats.N_BOOT) -> Interval | None:
    """mean(a) - mean(b) with a bootstrap over seeds (at least 3 a side), for scores without
    per-example predictions (train scores)."""
    if len(a) < 3 or len(b) < 3:
        return None
    rng = np.random.default_rng(stats.SEED)
    xa, xb = np.array(a), np.array(b)
    reps = xa[rng.integers(0, len(xa), (n_boot, len(xa)))].mean(1) - xb[
        rng.integers(0, len(xb), (n_boot, len(xb)))
    ].mean(1)
    return stats.interval(reps, float(xa.mean() - xb.mean()))


def _study(by_study: dict[str, list[dict]], study: str):
    from peft_lightning.tables import complete, overrides, varying_keys

    runs = by_study.get(study) or []
    keys = varying_keys(runs) if runs else []
    groups: dict[tuple, list[dict]] = {}
    for r in complete(runs)[0]:
        groups.setdefault(tuple(overrides(r).get(k, "") for k in keys), []).append(r)
    return keys, groups, StudyComparison(groups) if groups else None


def _fmt(i: Interval | None) -> str:
    return i.signed() if i else "n/a"


def findings(by_study: dict[str, list[dict]]) -> list[list[str]]:
    """Rows of the findings table: claim, study, verdict, the numbers behind it."""
    rows = []
    keys, groups, comp = _study(by_study, "main")
    by_adapter = {k[keys.index("adapter")]: k for k in groups} if comp and "adapter" in keys else {}

    def best_claim(claim: str, who: str, task: str):
        if who not in by_adapter or comp is None or task not in comp.tasks:
            return rows.append([claim, "main", UNRESOLVED, "no runs with per-example dev predictions"])
        others = [a for a in by_adapter if a != who]
        diffs = [comp.difference(by_adapter[who], by_adapter[o], task) for o in others]
        ev = "; ".join(f"{who} - {o}: {_fmt(d)}" for o, d in zip(others, diffs))
        rows.append([claim, "main", verdict(diffs, "+") if others else UNRESOLVED, f"{TASKS[task].main_metric}: {ev}"])

    best_claim("full fine-tuning is best on SST-5", "full", "sst5")
    best_claim("full fine-tuning is best on QQP", "full", "qqp")
    best_claim("prefix tuning is best on STS-B", "prefix", "stsb")

    # overfitting: the train - dev gap at the last epoch mark, LoRA against full (seeds only: no train predictions)
    gaps: dict[str, list[float]] = {}
    from peft_lightning.tables import complete, strategy

    for r in complete(by_study.get("epochs") or [])[0]:
        last = r["history"][-1]
        if last.get("train_avg") is not None and last.get("dev_avg") is not None:
            gaps.setdefault(strategy(r), []).append(last["train_avg"] - last["dev_avg"])
    d = seed_interval(gaps.get("lora", []), gaps.get("full", []))
    ev = (
        f"gap LoRA - gap full: {_fmt(d)}"
        if d
        else f"needs 3+ seeds of each (have lora {len(gaps.get('lora', []))}, full {len(gaps.get('full', []))})"
    )
    rows.append(["LoRA overfits less than full fine-tuning (train - dev gap)", "epochs", verdict([d], "-"), ev])

    keys, groups, comp = _study(by_study, "lora_rank")
    ranks = sorted((int(k[keys.index("adapter.rank")]), k) for k in groups) if comp and "adapter.rank" in keys else []
    if len(ranks) >= 2:
        (lo, klo), (hi, khi) = ranks[0], ranks[-1]
        parts = [("sst5", "+"), ("qqp", "+"), ("stsb", "-")]
        ds = {t: comp.difference(khi, klo, t) if t in comp.tasks else None for t, _ in parts}
        v = combine([verdict([ds[t]], e) for t, e in parts])
        ev = "; ".join(f"{t} r={hi} - r={lo}: {_fmt(ds[t])}" for t, _ in parts)
    else:
        v, ev = UNRESOLVED, "needs two ranks with dev predictions"
    rows.append(["a higher LoRA rank helps SST-5 and QQP and hurts STS-B", "lora_rank", v, ev])

    keys, groups, comp = _study(by_study, "prefix_length")
    ds = []
    if comp and "adapter.length" in keys:
        ref = reference_of("prefix_length", keys, next(iter(groups)))
        ds = [
            (k[keys.index("adapter.length")], comp.difference(k, ref, None))
            for k in groups
            if k != ref and ref in groups
        ]
    rows.append(
        [
            "prefix length barely matters (dev avg within ±0.01 of P=4)",
            "prefix_length",
            verdict([d for _, d in ds], "0") if ds else UNRESOLVED,
            "; ".join(f"P={p} - P=4: {_fmt(d)}" for p, d in ds) or "needs P=4 and another length",
        ]
    )

    keys, groups, comp = _study(by_study, "prefix_mlp")
    ds = []
    if comp and "adapter.mlp" in keys:
        for k in groups:
            if k[keys.index("adapter.mlp")] == "true":
                ref = reference_of("prefix_mlp", keys, k)
                if ref in groups:
                    ds.append((k, comp.difference(k, ref, None)))
    length = keys.index("adapter.length") if "adapter.length" in keys else None
    rows.append(
        [
            "the MLP reparameterisation helps prefix tuning (dev avg)",
            "prefix_mlp",
            verdict([d for _, d in ds], "+") if ds else UNRESOLVED,
            "; ".join(f"P={k[length] if length is not None else '?'} MLP - none: {_fmt(d)}" for k, d in ds)
            or "needs runs with and without the MLP",
        ]
    )
    return rows
