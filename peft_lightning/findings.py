"""The study's claims, checked against the intervals of `comparisons`: a verdict and the numbers behind it."""

from __future__ import annotations

import numpy as np

import peft_lightning.stats as stats
from peft_lightning.comparisons import StudyComparison, reference_of
from peft_lightning.runs import complete, overrides, strategy, varying_keys
from peft_lightning.stats import Interval
from peft_lightning.tasks import TASKS

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
