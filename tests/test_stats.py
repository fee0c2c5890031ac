"""Intervals (rows and seeds), their coverage on simulated studies, the four verdicts with Holm's
adjustment, pairing by seed, and all of it in a report, on synthetic predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_numeric_csvs
from scipy.optimize import brentq
from scipy.stats import norm, pearsonr, spearmanr

from peft_lightning import stats
from peft_lightning.comparisons import StudyComparison
from peft_lightning.findings import CONTRADICTED, EQUIVALENT, REPRODUCED, UNRESOLVED, Comparison, verdict
from peft_lightning.report import build_report
from peft_lightning.stats import Interval, Scores


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


# ---- coverage on simulated studies with known truth ------------------------------------------------


def simulate(metric: str, seeds: int, delta: float, studies: int = 1000, n: int = 150, boot: int = 100, seed: int = 0):
    """`studies` simulated two-setting studies (A - B has true value `delta`): rows drawn from a
    population, a random effect per seed, and row-by-seed noise. Returns (coverage of the truth by
    the 95% interval, share of studies whose difference is marked)."""
    rng = np.random.default_rng(seed)
    gh_x, gh_w = np.polynomial.hermite_e.hermegauss(60)
    gh_w = gh_w / gh_w.sum()
    if metric == "acc":
        # a row has a difficulty r shared by every model; model (setting, seed) is right on it when
        # r + noise < c + u_seed: accuracy Phi((c + u) / sqrt(2)) on the population of rows
        def mean_acc(c: float) -> float:
            return float((norm.cdf((c + 0.07 * gh_x) / np.sqrt(2)) * gh_w).sum())

        c_a = norm.ppf(0.6) * np.sqrt(2)
        c_b = brentq(lambda c: mean_acc(c) - (mean_acc(c_a) - delta), c_a - 3, c_a + 3)
        r = rng.normal(size=(studies, 1, n))
        pa = (r + rng.normal(size=(studies, seeds, n)) < c_a + 0.07 * rng.normal(size=(studies, seeds, 1))) * 1.0
        pb = (r + rng.normal(size=(studies, seeds, n)) < c_b + 0.07 * rng.normal(size=(studies, seeds, 1))) * 1.0
        label = np.ones((studies, n))  # "right" is the label: accuracy is the share of rows a model gets right
    else:
        # pred = y + row noise b (shared) + seed noise of sd s_seed: Pearson 1 / sqrt(1 + 0.25 + s^2)
        def mean_rho(base: float) -> float:
            return float((gh_w / np.sqrt(1.25 + (base * np.exp(0.1 * gh_x)) ** 2)).sum())

        b_base = brentq(lambda x: mean_rho(x) - (mean_rho(0.6) - delta), 0.01, 5)
        label = rng.normal(size=(studies, n))
        shared = label[:, None] + 0.5 * rng.normal(size=(studies, 1, n))
        sd_a = 0.6 * np.exp(0.1 * rng.normal(size=(studies, seeds, 1)))
        sd_b = b_base * np.exp(0.1 * rng.normal(size=(studies, seeds, 1)))
        pa = shared + sd_a * rng.normal(size=(studies, seeds, n))
        pb = shared + sd_b * rng.normal(size=(studies, seeds, n))
    idx = stats.draws(n, boot, seed=seed + 1)
    covered = marked = 0
    for k in range(0, studies, 100):  # 100 studies at a time: (100, seeds, boot, n) arrays
        point_a, reps_a = stats.seed_scores(metric, pa[k : k + 100], label[k : k + 100], idx)
        point_b, reps_b = stats.seed_scores(metric, pb[k : k + 100], label[k : k + 100], idx)
        _, _, _, low, high = stats.t_interval(point_a - point_b, reps_a - reps_b)
        covered += int(((low <= delta) & (delta <= high)).sum())
        marked += int(((low > 0) | (high < 0)).sum())
    return covered / studies, marked / studies


@pytest.mark.parametrize("metric", ["acc", "pearson"])
@pytest.mark.parametrize("seeds", [3, 5])
def test_intervals_cover_the_truth_95_percent_of_the_time(metric, seeds):
    covered, marked = simulate(metric, seeds, delta=0.0)
    assert 0.93 <= covered <= 0.97 and marked <= 0.055, (covered, marked)
    covered, _ = simulate(metric, seeds, delta=0.02, seed=1)
    assert 0.93 <= covered <= 0.97, covered


# ---- pairing, exact zeros, rows ---------------------------------------------------------------------


def write_run(root, study, overrides, seed, preds, ids=None):
    """A complete run folder: results.json and dev predictions (task -> (pred, label) arrays)."""
    d = root / study / ",".join([*overrides, f"seed={seed}"])
    (d / "predictions").mkdir(parents=True)
    for task, (pred, label) in preds.items():
        row_ids = ids if ids is not None else [f"r{i}" for i in range(len(label))]
        rows = ["id\tprediction\tlabel"] + [f"{i}\t{p:g}\t{y:g}" for i, p, y in zip(row_ids, pred, label)]
        (d / "predictions" / f"{task}-dev.tsv").write_text("\n".join(rows) + "\n")
    best = {"epoch": 1, "dev_avg": 0.5, "dev": {}, "train": {}}
    res = {"status": "complete", "study": study, "overrides": [*overrides, f"seed={seed}"], "seed": seed}
    res.update(best=best, history=[best], adapter={"name": overrides[0].split("=")[1]}, path=str(d))
    (d / "results.json").write_text(json.dumps(res))
    return res


def task_preds(quality: float, seed: int, n: int = 400) -> dict:
    """sst5, qqp and stsb predictions of about `quality` on fixed labels."""
    rng = np.random.default_rng(seed)
    out = {}
    for task, k in (("sst5", 5), ("qqp", 2)):
        label = np.arange(n) % k
        out[task] = (np.where(rng.random(n) < quality, label, (label + 1) % k), label)
    y = (np.arange(n) * 37 % 100) / 20
    out["stsb"] = (y + rng.normal(scale=2 * (1 - quality), size=n), y)
    return out


def test_identical_settings_give_an_interval_of_exactly_zero(tmp_path):
    a = [write_run(tmp_path, "main", ["adapter=lora"], s, task_preds(0.6, s)) for s in (1, 2, 3)]
    b = [write_run(tmp_path, "main", ["adapter=full"], s, task_preds(0.6, s)) for s in (1, 2, 3)]
    comp = StudyComparison({("lora",): a, ("full",): b})
    for task in (*comp.tasks, None):
        d = comp.difference(("lora",), ("full",), task)
        assert (d.value, d.low, d.high, d.n) == (0.0, 0.0, 0.0, 3) and not d.excludes_zero


def test_seeds_are_paired_by_seed_value_not_position(tmp_path):
    a = [write_run(tmp_path, "main", ["adapter=lora"], s, task_preds(0.6, s)) for s in (1, 2, 3)]
    b = [write_run(tmp_path, "main", ["adapter=full"], s, task_preds(0.6, s)) for s in (1, 3)]  # seed 2 lost
    comp = StudyComparison({("lora",): a, ("full",): b})
    d = comp.difference(("lora",), ("full",), None)
    assert (d.value, d.low, d.high, d.n) == (0.0, 0.0, 0.0, 2)  # seed 1 with 1, seed 3 with 3
    assert comp.score(("lora",), None).n == 3 and comp.score(("full",), None).n == 2


def test_a_shared_dev_subsample_is_compared_on_all_its_rows(tmp_path, data_dir, tiny_tokenizer):
    """limit_eval draws the same dev rows for every seed of a study, so a 3-seed comparison rests on all of them."""
    from peft_lightning.data import MultiTaskDataModule

    ids = {}
    for seed in (1, 2, 3):
        dm = MultiTaskDataModule(data_dir, tiny_tokenizer, cache_dir=tmp_path / "cache", limit_eval=10, seed=seed)
        dm.setup()
        ids[seed] = {t: dm.split(t, "dev").ids for t in dm.task_names}
    assert ids[1] == ids[2] == ids[3] and all(len(v) == 10 for v in ids[1].values())
    runs = {
        (name,): [
            write_run(tmp_path / "runs", "main", [f"adapter={name}"], s, task_preds(q, s, 10), ids=ids[s]["sst5"])
            for s in (1, 2, 3)
        ]
        for name, q in (("lora", 0.6), ("full", 0.7))
    }
    comp = StudyComparison(runs)
    assert [comp.rows(t) for t in comp.tasks] == [10, 10, 10]
    assert comp.difference(("lora",), ("full",), None).rows == 30


# ---- verdicts -------------------------------------------------------------------------------------


def interval_of(a: dict, b: dict, task: str = "sst5") -> Interval:
    """A - B on `task`'s accuracy, from per-seed predictions (seed -> (pred, label))."""
    label = next(iter(a.values()))[task][1]
    idx = stats.draws(len(label), 400)
    metric = "pearson" if task == "stsb" else "acc"
    sa = Scores.of(metric, {s: p[task][0] for s, p in a.items()}, label, idx)
    sb = Scores.of(metric, {s: p[task][0] for s, p in b.items()}, label, idx)
    return (sa - sb).interval()


def setting(quality: float, offset: int, n: int = 4000) -> dict:
    return {s: task_preds(quality, 100 * offset + s, n) for s in (1, 2, 3)}


def test_each_of_the_four_verdicts_on_synthetic_predictions():
    good, bad, same = setting(0.70, 1), setting(0.55, 2), setting(0.70, 3)
    clear, reverse = interval_of(good, bad), interval_of(bad, good)
    tied = interval_of(same, good)
    assert clear.low > 0.1 and reverse.high < -0.1 and abs(tied.value) < 0.02
    assert verdict([Comparison("good - bad", clear, "+")]) == REPRODUCED
    assert verdict([Comparison("good - bad", clear, "+"), Comparison("bad - good", reverse, "+")]) == CONTRADICTED
    assert verdict([Comparison("same - good", tied, "+")], margin=0.03) == EQUIVALENT
    assert verdict([Comparison("same - good", tied, "0")], margin=0.03) == REPRODUCED  # "barely matters"
    assert verdict([Comparison("good - bad", clear, "0")], margin=0.03) == CONTRADICTED
    middling = interval_of(setting(0.62, 4, n=300), setting(0.60, 5, n=300))  # a small difference on few rows
    assert verdict([Comparison("near - other", middling, "+")], margin=0.01) == UNRESOLVED
    assert verdict([Comparison("missing", None, "+")]) == UNRESOLVED


def test_holm_adjusts_a_claims_comparisons():
    # each comparison alone is significant one-sided at 0.025 (p = 0.02), not both under Holm
    p02 = Interval(0.0205, 0.0, 0.041, se=0.0205 / norm.isf(0.02), df=np.inf, n=3)
    assert p02.p_above(0) == pytest.approx(0.02)
    assert verdict([Comparison("a", p02, "+")]) == REPRODUCED
    assert verdict([Comparison("a", p02, "+"), Comparison("b", p02, "+")]) == UNRESOLVED
    # and a contradiction must survive the same adjustment
    m02 = Interval(-0.0205, -0.041, 0.0, se=0.0205 / norm.isf(0.02), df=np.inf, n=3)
    strong = Interval(0.2, 0.15, 0.25, se=0.025, df=np.inf, n=3)
    assert verdict([Comparison("m", m02, "+")]) == CONTRADICTED
    assert verdict([Comparison("s", strong, "+"), Comparison("m", m02, "+")]) == UNRESOLVED  # 0.02 > 0.025 / 2


# ---- in a report ------------------------------------------------------------------------------------


def test_report_has_intervals_checked_findings_and_prefix_mlp_as_hydra_names_it(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    close = plt.close
    close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)  # the figures stay open, to be looked at here
    n = 1500
    quality = {"full": 0.75, "lora": 0.6, "prefix": 0.6}
    for name, q in quality.items():
        for s in (1, 2, 3):
            preds = task_preds(q, 10 * hash(name) % 1000 + s, n)
            if name == "prefix":  # prefix clearly best on STS-B
                y = preds["stsb"][1]
                preds["stsb"] = (y + np.random.default_rng(s).normal(scale=0.1, size=n), y)
            write_run(tmp_path, "main", [f"adapter={name}"], s, preds)
    # prefix_mlp as Hydra names a boolean sweep: adapter.mlp=True / adapter.mlp=False
    for mlp, q in (("True", 0.75), ("False", 0.6)):
        for length in (2, 4):
            for s in (1, 2, 3):
                write_run(
                    tmp_path,
                    "prefix_mlp",
                    ["adapter=prefix", f"adapter.length={length}", f"adapter.mlp={mlp}"],
                    s,
                    task_preds(q, s + length, n),
                )
    text = build_report(tmp_path).read_text()
    head = text[: text.index("## Main comparison")]
    assert (
        "| full fine-tuning is best on SST-5: every other strategy significantly below it | main | reproduced |" in head
    )
    assert "| prefix tuning is best on STS-B: every other strategy significantly below it | main | reproduced |" in head
    assert (
        "| the MLP reparameterisation helps prefix tuning: dev avg significantly higher at every length | prefix_mlp | reproduced |"
        in head
    )
    assert "P=2 MLP - none: +" in head and "P=4 MLP - none: +" in head
    assert "Holm" in head and "±0.01" in head
    table = text[text.index("## Main comparison") :]
    assert "Δ sst5 acc vs adapter=full" in table and "dev avg 95% CI" in table
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert lora_row.count(" *") >= 2 and "n=3" in lora_row
    assert "Dev rows the intervals rest on: sst5 1,500, qqp 1,500, stsb 1,500." in table
    assert "Protocol: best epoch chosen on dev, the rows reported" in table
    mlp = text[text.index("## Prefix tuning with and without") :]
    true_row = next(line for line in mlp.splitlines() if line.startswith("| 2 | true |"))
    assert true_row.count(" *") == 4 and "| 2 | false |" in mlp  # every difference to the MLP-less row, marked
    # the figures: titled, one axis per metric, the tables' intervals as error bars, prefix_mlp against P
    figures = [plt.figure(n) for n in plt.get_fignums()]
    assert len(figures) == 2
    for fig in figures:
        heading = fig._suptitle.get_text()
        assert (
            "budget" in heading
            and "seeds 1, 2, 3" in heading
            and "dev rows SST-5 1,500, QQP 1,500, STS-B 1,500" in heading
        )
        axes = fig.get_axes()
        assert [ax.get_title() for ax in axes] == ["SST-5 acc", "QQP acc", "STS-B pearson", "dev avg (the three)"]
        for ax in axes:
            bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
            assert bars and all(c.has_yerr for c in bars)
    titles = sorted(f._suptitle.get_text().splitlines()[0] for f in figures)
    assert titles == ["Main comparison (dev)", "Prefix tuning with and without the MLP reparameterisation (dev)"]
    mlp_fig = next(f for f in figures if f._suptitle.get_text().startswith("Prefix"))
    assert mlp_fig.get_axes()[0].get_xlabel() == "adapter.length" and len(mlp_fig.get_axes()[0].containers) == 2
    assert_numeric_csvs(tmp_path)  # the intervals' columns are numbers too
    close("all")


def test_the_epochs_figure_names_the_dev_rows_its_curves_rest_on(tmp_path, monkeypatch):
    """epochs.png's heading gives the dev rows every run predicted, as the other figures' do (not `-`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_lightning.figures import plot_epochs

    runs = []
    for s in (1, 2):
        res = write_run(tmp_path, "epochs", ["adapter=lora"], s, task_preds(0.6, s, n=300))
        res["history"] = [{"epoch": e, "dev_avg": 0.5 + e / 100, "train_avg": 0.6 + e / 50} for e in (1, 2, 3)]
        runs.append(res)
    close = plt.close
    close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)  # the figure stays open, to be looked at here
    assert plot_epochs(tmp_path / "epochs.png", runs, "Epoch budgets")
    (fig,) = [plt.figure(n) for n in plt.get_fignums()]
    heading = fig._suptitle.get_text()
    assert "seeds 1, 2" in heading and heading.endswith("dev rows SST-5 300, QQP 300, STS-B 300"), heading
    close("all")
