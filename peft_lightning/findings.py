"""The study's claims, checked against the intervals of `comparisons`: a verdict and the numbers behind it.

Each claim is a few comparisons (differences with their 95% intervals, `stats`), each with what the
claim expects of it: above 0 (`+`), below 0 (`-`), or within the margin of 0 (`0`: equivalent).
Three tests are run on every comparison, each family with Holm's adjustment over the claim's
comparisons (statsmodels' `multipletests`), so that a claim of five comparisons is not five
chances to be contradicted:
- the expected direction, one-sided at 0.025 (what a 95% interval excluding 0 says);
- the opposite direction (for `0`: beyond the margin on either side), one-sided at 0.025;
- equivalence within +-margin by two one-sided tests (TOST, Schuirmann 1987) at 0.05.

Verdicts: **contradicted** when an opposite test rejects; **reproduced** when every expected test
rejects (for `0`: every equivalence test); **equivalent** when a directional claim's settings are
shown equivalent within the margin instead (no difference worth the name either way); else
**unresolved** (the intervals are too wide to say). The margin is `report.margin` (0.01 on
accuracy, Pearson and dev avg by default), printed with the report.
"""

from __future__ import annotations

from dataclasses import dataclass

from statsmodels.stats.multitest import multipletests

from peft_lightning.comparisons import StudyComparison, reference_of, seedwise_scores
from peft_lightning.runs import complete, overrides, strategy, varying_keys
from peft_lightning.stats import Interval, Scores
from peft_lightning.tasks import TASKS

REPRODUCED, CONTRADICTED, EQUIVALENT, UNRESOLVED = "reproduced", "contradicted", "equivalent", "unresolved"
MARGIN = 0.01
ALPHA_ONE_SIDED, ALPHA_TOST = 0.025, 0.05


@dataclass(frozen=True)
class Comparison:
    """One difference a claim is about, what the claim expects of it, and how it is named."""

    name: str
    interval: Interval | None
    expect: str  # "+", "-" or "0"


def holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Which of the hypotheses Holm's step-down procedure rejects at family-wise level `alpha`."""
    return list(multipletests(pvalues, alpha=alpha, method="holm")[0]) if pvalues else []


def verdict(comparisons: list[Comparison], margin: float = MARGIN) -> str:
    """A claim's verdict from its comparisons (see the module doc); a missing interval leaves the
    claim unresolved unless another one contradicts it."""
    for c in comparisons:
        if c.expect not in ("+", "-", "0"):
            raise ValueError(f"expect must be '+', '-' or '0', got {c.expect!r}")
    known = [c for c in comparisons if c.interval is not None]
    if not known:
        return UNRESOLVED

    def expected(c: Comparison) -> float:
        i = c.interval
        return i.p_above(0) if c.expect == "+" else i.p_below(0) if c.expect == "-" else i.p_equivalent(margin)

    def opposite(c: Comparison) -> float:
        i = c.interval
        if c.expect == "0":
            return min(1.0, 2 * min(i.p_above(margin), i.p_below(-margin)))  # beyond the margin, either side
        return i.p_below(0) if c.expect == "+" else i.p_above(0)

    if any(holm([opposite(c) for c in known], ALPHA_ONE_SIDED)):
        return CONTRADICTED
    if len(known) < len(comparisons):
        return UNRESOLVED
    directional = [c for c in known if c.expect != "0"]
    alpha = ALPHA_TOST if not directional else ALPHA_ONE_SIDED
    if all(holm([expected(c) for c in known], alpha)):
        return REPRODUCED
    if directional and all(holm([c.interval.p_equivalent(margin) for c in known], ALPHA_TOST)):
        return EQUIVALENT
    return UNRESOLVED


def _study(by_study: dict[str, list[dict]], study: str, **kw):
    runs = by_study.get(study) or []
    keys = varying_keys(runs) if runs else []
    groups: dict[tuple, list[dict]] = {}
    for r in complete(runs)[0]:
        groups.setdefault(tuple(overrides(r).get(k, "") for k in keys), []).append(r)
    return keys, groups, StudyComparison(groups, **kw) if groups else None


def _evidence(comparisons: list[Comparison]) -> str:
    return "; ".join(
        f"{c.name}: {c.interval.signed()} (n={c.interval.n})" if c.interval else f"{c.name}: n/a" for c in comparisons
    )


def _row(claim: str, study: str, comparisons: list[Comparison], margin: float, missing: str) -> list[str]:
    if not comparisons or all(c.interval is None for c in comparisons):
        return [claim, study, UNRESOLVED, missing]
    return [claim, study, verdict(comparisons, margin), _evidence(comparisons)]


def findings(by_study: dict[str, list[dict]], margin: float = MARGIN) -> list[list[str]]:
    """Rows of the findings table: claim, study, verdict, the numbers behind it."""
    rows = []
    keys, groups, comp = _study(by_study, "main")
    by_adapter = {k[keys.index("adapter")]: k for k in groups} if comp and "adapter" in keys else {}

    def best(who: str, task: str) -> list[Comparison]:
        if who not in by_adapter or comp is None or task not in comp.tasks:
            return []
        return [
            Comparison(f"{who} - {other}", comp.difference(by_adapter[who], by_adapter[other], task), "+")
            for other in by_adapter
            if other != who
        ]

    for claim, who, task in (
        ("full fine-tuning is best on SST-5: every other strategy significantly below it", "full", "sst5"),
        ("full fine-tuning is best on QQP: every other strategy significantly below it", "full", "qqp"),
        ("prefix tuning is best on STS-B: every other strategy significantly below it", "prefix", "stsb"),
    ):
        comps = best(who, task)
        evidence_metric = f"{TASKS[task].main_metric}: "
        row = _row(claim, "main", comps, margin, "needs main runs with per-example dev predictions")
        rows.append(row[:3] + [evidence_metric + row[3] if comps else row[3]])

    rows.append(
        _row(*overfitting(by_study), margin, "needs epochs runs with last-epoch train_eval and dev predictions")
    )

    keys, groups, comp = _study(by_study, "lora_rank")
    comps = []
    if comp and "adapter.rank" in keys:
        ranks = sorted((int(k[keys.index("adapter.rank")]), k) for k in groups)
        if len(ranks) >= 2:
            (lo, klo), (hi, khi) = ranks[0], ranks[-1]
            comps = [
                Comparison(f"{t} r={hi} - r={lo}", comp.difference(khi, klo, t) if t in comp.tasks else None, e)
                for t, e in (("sst5", "+"), ("qqp", "+"), ("stsb", "-"))
            ]
    rows.append(
        _row(
            "a higher LoRA rank helps SST-5 and QQP and hurts STS-B (highest rank against lowest)",
            "lora_rank",
            comps,
            margin,
            "needs two ranks with dev predictions",
        )
    )

    keys, groups, comp = _study(by_study, "prefix_length")
    comps = []
    if comp and "adapter.length" in keys:
        ref = reference_of("prefix_length", keys, next(iter(groups)))
        if ref in groups:
            comps = [
                Comparison(f"P={k[keys.index('adapter.length')]} - P=4", comp.difference(k, ref, None), "0")
                for k in groups
                if k != ref
            ]
    rows.append(
        _row(
            f"prefix length barely matters: every length's dev avg equivalent to P=4's within ±{margin:g}",
            "prefix_length",
            comps,
            margin,
            "needs P=4 and another length",
        )
    )

    keys, groups, comp = _study(by_study, "prefix_mlp")
    comps = []
    if comp and "adapter.mlp" in keys:
        length = keys.index("adapter.length") if "adapter.length" in keys else None
        for k in groups:
            if k[keys.index("adapter.mlp")] == "true":
                ref = reference_of("prefix_mlp", keys, k)
                if ref in groups:
                    p = k[length] if length is not None else "?"
                    comps.append(Comparison(f"P={p} MLP - none", comp.difference(k, ref, None), "+"))
    rows.append(
        _row(
            "the MLP reparameterisation helps prefix tuning: dev avg significantly higher at every length",
            "prefix_mlp",
            comps,
            margin,
            "needs runs with and without the MLP",
        )
    )
    return rows


def overfitting(by_study: dict[str, list[dict]]) -> tuple[str, str, list[Comparison]]:
    """LoRA's train - dev gap against full fine-tuning's, at the long runs' last epoch: train scored
    in eval mode on the train_eval sample like dev (`predictions/last/`), rows of both drawn apart.
    Each seed's train rows are its own sample (`seedwise_scores`), paired between the strategies of
    that seed; dev rows are shared by all runs; both sides average the same tasks."""
    claim = "LoRA overfits less than full fine-tuning: its train - dev gap (dev avg) significantly smaller"
    runs = complete(by_study.get("epochs") or [])[0]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((strategy(r),), []).append(r)
    if ("lora",) not in groups or ("full",) not in groups:
        return claim, "epochs", []
    dev = StudyComparison(groups, folder="predictions/last")
    # each seed's train_eval sample is its own (drawn from its training rows): scored per seed
    train = seedwise_scores(groups, "train_eval", "predictions/last")
    tasks = [t for t in dev.tasks if t in train]  # the same tasks on both sides of the gap
    if not tasks:
        return claim, "epochs", []

    def gap_of(key: tuple) -> Scores:
        return Scores.average([train[t][key] for t in tasks]) - Scores.average([dev.scores(key, t) for t in tasks])

    gap = {k: gap_of(k) for k in (("lora",), ("full",))}
    return claim, "epochs", [Comparison("gap LoRA - gap full", (gap[("lora",)] - gap[("full",)]).interval(), "-")]
