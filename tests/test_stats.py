"""The paired bootstrap, the findings' verdict logic, and both in a report, on synthetic predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from peft_lightning import stats
from peft_lightning.findings import CONTRADICTED, REPRODUCED, UNRESOLVED, combine, verdict
from peft_lightning.report import build_report
from peft_lightning.stats import Interval

N = 1000


LABEL = np.random.default_rng(0).integers(0, 5, N)


def labels_and(correct_rate: float, seed: int, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The shared labels, and a predictor right on about `correct_rate` of them."""
    rng = np.random.default_rng(seed)
    right = rng.random(N) < correct_rate
    pred = np.where(right, LABEL, (LABEL + rng.integers(1, classes, N)) % classes)
    return LABEL, pred


def test_metrics_on_resamples_equal_scipy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = 0.5 * x + y
    idx = stats.draws(200, 5)
    got_p = stats.metric_rows("pearson", x[idx], y[idx])
    got_s = stats.metric_rows("spearman", x[idx], y[idx])
    for b in range(5):
        assert got_p[b] == pytest.approx(pearsonr(x[idx[b]], y[idx[b]])[0], abs=1e-12)
        assert got_s[b] == pytest.approx(spearmanr(x[idx[b]], y[idx[b]])[0], abs=1e-12)
    lab = (rng.random(50) < 0.5).astype(int)
    pred = (rng.random(50) < 0.5).astype(int)
    tp, fp, fn = ((pred == 1) & (lab == 1)).sum(), ((pred == 1) & (lab == 0)).sum(), ((pred == 0) & (lab == 1)).sum()
    assert stats.metric_rows("f1", pred[None], lab[None])[0] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_a_clear_difference_is_marked():
    label, good = labels_and(0.60, seed=1)
    _, bad = labels_and(0.45, seed=2)
    idx = stats.draws(N)
    d = stats.difference_interval("acc", [good], [bad], label, idx)
    assert d.value == pytest.approx((good == label).mean() - (bad == label).mean())
    assert d.excludes_zero and d.low > 0.08 and d.high < 0.22
    assert d.signed().endswith(" *")


def test_identical_predictions_give_an_interval_of_exactly_zero():
    label, pred = labels_and(0.5, seed=3)
    idx = stats.draws(N)
    d = stats.difference_interval("acc", [pred], [pred.copy()], label, idx)
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0) and not d.excludes_zero
    y = np.random.default_rng(0).uniform(0, 5, N)
    s = y + np.random.default_rng(1).normal(size=N)
    d = stats.difference_interval("pearson", [s], [s.copy()], y, idx)
    assert (d.low, d.high) == (0.0, 0.0)


def test_a_coin_flip_difference_is_not_marked():
    rng = np.random.default_rng(4)
    label = rng.integers(0, 2, N)
    a, b = rng.integers(0, 2, N), rng.integers(0, 2, N)  # two 50/50 guessers
    d = stats.difference_interval("acc", [a], [b], label, stats.draws(N))
    assert not d.excludes_zero and d.low < 0 < d.high


def test_seeds_widen_the_interval():
    label, p1 = labels_and(0.55, seed=5)
    _, p2 = labels_and(0.45, seed=6)  # a second seed of the same setting, much worse
    idx = stats.draws(N)
    one = stats.score_interval("acc", [p1], label, idx)
    two = stats.score_interval("acc", [p1, p2], label, idx)
    assert two.value == pytest.approx(((p1 == label).mean() + (p2 == label).mean()) / 2)
    assert (two.high - two.low) > 2 * (one.high - one.low)


def iv(low: float, high: float) -> Interval:
    return Interval((low + high) / 2, low, high)


@pytest.mark.parametrize(
    "intervals,expect,want",
    [
        ([iv(0.01, 0.05), iv(0.002, 0.03)], "+", REPRODUCED),
        ([iv(0.01, 0.05), iv(-0.01, 0.03)], "+", UNRESOLVED),
        ([iv(0.01, 0.05), iv(-0.04, -0.01)], "+", CONTRADICTED),
        ([iv(0.01, 0.05), None], "+", UNRESOLVED),
        ([iv(-0.05, -0.01)], "-", REPRODUCED),
        ([iv(0.01, 0.05)], "-", CONTRADICTED),
        ([iv(-0.008, 0.006), iv(-0.002, 0.009)], "0", REPRODUCED),
        ([iv(-0.008, 0.006), iv(-0.002, 0.02)], "0", UNRESOLVED),
        ([iv(0.012, 0.03)], "0", CONTRADICTED),
        ([], "+", UNRESOLVED),
    ],
)
def test_verdicts(intervals, expect, want):
    assert verdict(intervals, expect) == want


def test_combined_verdicts():
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, UNRESOLVED]) == UNRESOLVED
    assert combine([UNRESOLVED, CONTRADICTED]) == CONTRADICTED


def fake_run(root, study, overrides, seed, scores, dev_avg=0.5):
    """A complete run folder: results.json and dev predictions drawn to hit `scores` (task -> acc-like)."""
    d = root / study / (",".join(overrides) + f",seed={seed}")
    (d / "predictions").mkdir(parents=True)
    rng = np.random.default_rng(hash((study, *overrides, seed)) % 2**32)
    for task, (quality, n) in scores.items():
        rows = ["id\tprediction\tlabel"]
        for i in range(n):
            if task == "stsb":
                y = (i * 37 % 100) / 20
                rows.append(f"r{i}\t{y + rng.normal(scale=quality):.6f}\t{y:.6f}")
            else:
                y = i % (5 if task == "sst5" else 2)
                p = y if rng.random() < quality else (y + 1) % (5 if task == "sst5" else 2)
                rows.append(f"r{i}\t{p}\t{y}")
        (d / "predictions" / f"{task}-dev.tsv").write_text("\n".join(rows) + "\n")
    best = {"epoch": 1, "dev_avg": dev_avg, "train_avg": dev_avg, "dev": {}, "train": {}}
    res = {
        "status": "complete",
        "study": study,
        "overrides": [*overrides, f"seed={seed}"],
        "seed": seed,
        "best": best,
        "history": [best],
        "adapter": {"name": overrides[0].split("=")[1]},
    }
    (d / "results.json").write_text(json.dumps(res))


def test_report_has_intervals_and_checked_findings(tmp_path):
    n = 600
    # full clearly best on SST-5 and QQP, prefix clearly best on STS-B (noise 0.3 against 1.5)
    quality = {
        "full": {"sst5": (0.7, n), "qqp": (0.9, n), "stsb": (1.5, n)},
        "lora": {"sst5": (0.5, n), "qqp": (0.7, n), "stsb": (1.5, n)},
        "prefix": {"sst5": (0.5, n), "qqp": (0.7, n), "stsb": (0.3, n)},
    }
    for name, q in quality.items():
        fake_run(tmp_path, "main", [f"adapter={name}"], 42, q)
    text = build_report(tmp_path).read_text()
    head = text[: text.index("## Main comparison")]
    assert "| full fine-tuning is best on SST-5 | main | reproduced |" in head
    assert "| full fine-tuning is best on QQP | main | reproduced |" in head
    assert "| prefix tuning is best on STS-B | main | reproduced |" in head
    assert "| LoRA overfits less than full fine-tuning (train - dev gap) | epochs | unresolved |" in head
    table = text[text.index("## Main comparison") :]
    assert "Δ sst5 acc vs adapter=full" in table and "dev avg 95% CI" in table
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    full_row = next(line for line in table.splitlines() if line.startswith("| full |"))
    assert "reference" in full_row and lora_row.count(" *") >= 2  # SST-5 and QQP worse than full, marked
