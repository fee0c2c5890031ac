"""peft-report on hand-made results.json files: tables, bold best, mean +- std, failed rows, plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import assert_numeric_csvs

from peft_lightning.report import build_report


def fake(
    root: Path,
    study: str,
    overrides: list[str],
    dev: dict,
    train: dict | None = None,
    status="complete",
    history=None,
    **extra,
):
    d = (
        root
        / study
        / ",".join(o for o in overrides if not o.startswith("seed="))
        / (next((o for o in overrides if o.startswith("seed=")), "seed=0"))
    )
    d.mkdir(parents=True, exist_ok=True)
    best = None
    if status == "complete":
        avg = (dev["sst5"]["acc"] + dev["qqp"]["acc"] + dev["stsb"]["pearson"]) / 3
        best = {"epoch": 1, "dev": dev, "train": train or dev, "dev_avg": avg, "train_avg": avg + 0.1}
    res = {
        "status": status,
        "study": study,
        "overrides": overrides,
        "best": best,
        "history": history or ([best] if best else []),
        "adapter": {"name": next((o.split("=")[1] for o in overrides if o.startswith("adapter=")), "lora")},
        "model": {"name": "minilm"},
        "params": {"encoder": {"trainable": 100}, "with_heads": {"trainable": 150}},
        "step_time_ms": 12.5,
        "peak_memory_mb": 900.0,
        **extra,
    }
    (d / "results.json").write_text(json.dumps(res))


def scores(a, b, c):
    return {"sst5": {"acc": a}, "qqp": {"acc": b, "f1": b - 0.1}, "stsb": {"pearson": c, "spearman": c}}


def test_the_epochs_table_is_one_row_per_strategy_and_epoch_over_seeds(tmp_path):
    from peft_lightning.runs import load_runs
    from peft_lightning.tables import epochs_table

    def hist(dev_sst5, epochs):
        return [
            {
                "epoch": e,
                "dev": scores(dev_sst5 + e / 100, 0.7, 0.5),
                "train": scores(0.5 + e / 10, 0.8, 0.6),
                "dev_avg": 0.5 + e / 100,
                "train_avg": 0.6 + e / 10 + dev_sst5,
            }
            for e in epochs
        ]

    marks = {"budget": {"epoch_marks": [1, 2]}}
    fake(
        tmp_path, "epochs", ["adapter=full", "seed=1"], scores(0.4, 0.7, 0.5), history=hist(0.40, (1, 2)), config=marks
    )
    fake(
        tmp_path, "epochs", ["adapter=full", "seed=2"], scores(0.4, 0.7, 0.5), history=hist(0.44, (1, 2)), config=marks
    )
    fake(tmp_path, "epochs", ["adapter=full", "seed=3"], {}, status="failed", history=hist(0.42, (1,)), config=marks)
    for r in (p for p in tmp_path.rglob("results.json")):  # the seed, as results.json records it
        res = json.loads(r.read_text())
        r.write_text(json.dumps(res | {"seed": int(r.parent.name.split("=")[1])}))
    header, rows = epochs_table(load_runs(tmp_path))
    assert [(r[0], r[1]) for r in rows] == [("full", "1"), ("full", "2")]  # not a row per seed
    col = {h: i for i, h in enumerate(header)}
    one, two = rows
    assert one[col["dev sst5 acc"]] == "0.4300 ± 0.0200" and one[col["seeds"]] == "3" and one[col["status"]] == "ok"
    assert two[col["seeds"]] == "2" and two[col["status"]] == "seed 3: failed"
    assert two[col["train - dev avg"]].values["mean"] == pytest.approx(0.6 + 0.2 + 0.42 - 0.52)  # per seed, averaged


def test_report_tables(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    close = plt.close
    close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)  # the figures stay open, to be looked at here
    root = tmp_path / "mr"
    fake(root, "main", ["adapter=full"], scores(0.5, 0.8, 0.7))
    fake(root, "main", ["adapter=lora"], scores(0.45, 0.85, 0.6))
    fake(root, "main", ["adapter=prefix"], {}, status="failed", error="ValueError: boom")
    for seed, a in ((1, 0.40), (2, 0.44)):
        # seed 2 came from a later command (more seeds, the data elsewhere): overrides that Hydra
        # leaves out of the run folder's name are no setting, so both seeds make one row
        later = ["budget.seeds=[1,2]", "data.dir=/elsewhere", "sweep_root=mr"] if seed == 2 else []
        fake(root, "lora_rank", ["adapter.rank=2", f"seed={seed}", *later], scores(a, 0.7, 0.5))
        fake(root, "lora_rank", ["adapter.rank=8", f"seed={seed}", *later], scores(a + 0.1, 0.7, 0.5))
    hist = [
        {
            "epoch": e,
            "dev": scores(0.4 + e / 100, 0.7, 0.5),
            "train": scores(0.5 + e / 10, 0.8, 0.6),
            "dev_avg": 0.5 + e / 100,
            "train_avg": 0.6 + e / 10,
        }
        for e in (1, 2, 3, 4)
    ]
    fake(
        root,
        "epochs",
        ["adapter=full"],
        scores(0.44, 0.7, 0.5),
        history=hist,
        config={"budget": {"epoch_marks": [1, 2, 4]}},
    )
    fake(root, "peft_methods", ["adapter=ia3"], scores(0.4, 0.7, 0.6))
    fake(root, "peft_methods", ["adapter=lora"], scores(0.45, 0.85, 0.6))
    path = build_report(root, tmp_path / "out")
    text = path.read_text()
    ia3 = next(line for line in text.split("## PEFT methods")[1].splitlines() if line.startswith("| ia3"))
    assert "| 100 | 150 | 12.5 | 900.0 |" in ia3  # the cost columns, as in the main table
    assert "## Main comparison (dev)" in text and "## LoRA rank: train and dev" in text and "## Epoch budgets" in text
    assert "## Findings of the study, checked" in text and "| a higher LoRA rank helps SST-5" in text
    main_rows = [
        line
        for line in text.split("## Main comparison")[1].split("\n## ")[0].splitlines()
        if line.startswith("| full") or line.startswith("| lora") or line.startswith("| prefix")
    ]
    full = next(r for r in main_rows if r.startswith("| full"))
    lora = next(r for r in main_rows if r.startswith("| lora"))
    assert "**0.5000**" in full and "**0.8500**" in lora and "0.4500" in lora  # best per column in bold
    assert "failed: ValueError: boom" in next(r for r in main_rows if r.startswith("| prefix"))
    assert "| 100 | 150 | 12.5 | 900.0 |" in full  # params, step time, peak memory columns
    assert "| adapter.rank | train sst5 acc |" in text  # the one setting column
    rank2 = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert "0.4200 ± 0.0283" in rank2 and rank2.rstrip().endswith("| 2 | ok |")  # mean ± std over 2 seeds
    epochs_section = text.split("## Epoch budgets")[1].split("## ")[0]
    epoch_rows = [line for line in epochs_section.splitlines() if line.startswith("| full |")]
    assert [r.split("|")[2].strip() for r in epoch_rows] == ["1", "2", "4"]
    assert (tmp_path / "out" / "lora_rank.png").stat().st_size > 1000 and (tmp_path / "out" / "epochs.png").is_file()
    figures = [plt.figure(n) for n in plt.get_fignums()]
    headings = [f._suptitle.get_text() for f in figures]
    assert len(figures) == 4 and all("budget" in h and "seeds" in h for h in headings), (
        headings
    )  # main, epochs, rank, peft_methods
    epochs = next(f for f, h in zip(figures, headings) if h.startswith("Epoch budgets"))
    ticks = epochs.get_axes()[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)  # whole epochs, not 1.2, 1.4
    rank = next(f for f, h in zip(figures, headings) if h.startswith("LoRA rank"))
    assert [ax.get_title() for ax in rank.get_axes()] == [
        "SST-5 acc",
        "QQP acc",
        "STS-B pearson",
        "dev avg (the three)",
    ]
    assert any(line.get_linestyle() == "--" for line in rank.get_axes()[0].get_lines())  # train, dashed
    close("all")
    assert (
        (tmp_path / "out" / "main.csv")
        .read_text()
        .splitlines()[0]
        .startswith("adapter,dev sst5 acc mean,dev sst5 acc std")
    )
    assert_numeric_csvs(tmp_path / "out")
    assert "not clean transfer" in text  # MiniLM's QQP caveat


def test_multitask_table_pairs_each_task_alone_with_the_joint_run(tmp_path):
    root = tmp_path / "mr"
    one = {"sst5": {"acc": None}, "qqp": {"acc": None}, "stsb": {"pearson": None}}
    alone = {"sst5": 0.40, "qqp": 0.80, "stsb": 0.70}
    for seed, shift in ((1, 0.0), (2, 0.02)):
        for task, value in alone.items():
            dev = {**one, task: {"acc" if task != "stsb" else "pearson": value + shift}}
            # a single-task run's dev scores hold its own task only
            fake(root, "multitask_vs_single", ["adapter=lora", f"data.tasks=[{task}]", f"seed={seed}"],
                 scores(0, 0, 0), tasks=[task], seed=seed, wall_time_s=100.0)  # fmt: skip
            path = next((root / "multitask_vs_single").glob(f"*{task}*/seed={seed}/results.json"))
            res = json.loads(path.read_text())
            res["best"]["dev"] = dev
            path.write_text(json.dumps(res))
        fake(root, "multitask_vs_single", ["adapter=lora", "data.tasks=[sst5,qqp,stsb]", f"seed={seed}"],
             scores(0.43 + shift, 0.78 + 2 * shift, 0.75), tasks=["sst5", "qqp", "stsb"], seed=seed,
             wall_time_s=240.0)  # fmt: skip
    fake(root, "multitask_vs_single", ["adapter=full", "data.tasks=[sst5,qqp,stsb]"], scores(0.5, 0.8, 0.7),
         tasks=["sst5", "qqp", "stsb"], seed=1)  # fmt: skip
    text = build_report(root, tmp_path / "out").read_text()
    assert "## Findings of the study" not in text  # none of the paper's five studies ran: no claim to check
    section = text.split("## Multi-task vs single-task training (dev)")[1]

    def cells(prefix: str) -> list[str]:
        line = next(x for x in section.splitlines() if x.startswith(prefix))
        return [c.strip() for c in line.strip("|").split("|")]

    lora = dict(zip(cells("| adapter"), cells("| lora")))
    assert lora["sst5 acc alone"] == "0.4100 ± 0.0141" and lora["sst5 acc together"] == "0.4400 ± 0.0141"
    assert lora["sst5 acc change"] == "+0.0300 ± 0.0000"  # paired by seed: +0.03 in both
    assert lora["qqp acc change"] == "-0.0100 ± 0.0141"  # 0.78 vs 0.80, 0.82 vs 0.82
    assert lora["stsb pearson change"] == "+0.0400 ± 0.0141"  # 0.75 vs 0.70 and 0.72
    assert lora["avg alone"] == "0.6433 ± 0.0141" and lora["avg change"] == "+0.0200 ± 0.0000"
    assert lora["wall s alone (3 runs)"] == "300" and lora["wall s together"] == "240"
    assert lora["seeds"] == "2" and lora["status"] == "ok"
    full = dict(zip(cells("| adapter"), cells("| full")))
    assert full["sst5 acc alone"] == "-" and full["sst5 acc together"] == "0.5000" and full["sst5 acc change"] == "-"
    assert "no complete sst5-only run" in full["status"] and "no complete stsb-only run" in full["status"]
    assert (tmp_path / "out" / "multitask_vs_single.csv").read_text().startswith("adapter,sst5 acc alone mean,")
    assert_numeric_csvs(tmp_path / "out")


BAD_RESULTS = [
    ("not an object", b"[1, 2]", "not a JSON object (a list)"),
    ("not UTF-8", b'{"status": "complete", "study": "caf\xe9"}', "not UTF-8 (byte 0xe9 at offset 36)"),
    ("truncated", b'{"status": "complete", "best": {"dev', "unreadable JSON (Unterminated string"),
    (
        "wrong-typed field",
        b'{"status": "complete", "history": "none"}',
        "field 'history' should be a list, got \"none\"",
    ),
    (
        "wrong-typed score",
        b'{"status": "complete", "best": {"epoch": 1, "dev": {"sst5": {"acc": "high"}}}}',
        "field 'best.dev' should map tasks to their metrics",
    ),
    ("a folder", None, "is a folder, not a file"),
]


def test_a_results_json_that_cannot_be_used_is_a_named_failed_row_and_the_report_is_made(tmp_path):
    root = tmp_path / "mr"
    fake(root, "main", ["adapter=full"], scores(0.5, 0.8, 0.7))
    fake(root, "main", ["adapter=lora"], scores(0.45, 0.85, 0.6))
    for i, (_, blob, _) in enumerate(BAD_RESULTS):
        folder = root / "main" / f"adapter=bad{i}"  # a sweep's layout: <root>/<study>/<run>
        folder.mkdir(parents=True)
        if blob is None:
            (folder / "results.json").mkdir()
        else:
            (folder / "results.json").write_bytes(blob)
    text = build_report(root, tmp_path / "out").read_text()
    assert f"{2 + len(BAD_RESULTS)} runs under `mr`; 2 complete" in text
    for i, (what, _, problem) in enumerate(BAD_RESULTS):
        assert f"- `main/adapter=bad{i}/results.json: {problem}" in text, what
    full = next(line for line in text.split("## Main comparison")[1].splitlines() if line.startswith("| full"))
    assert "**0.5000**" in full  # the good runs' table as without the bad files


def test_the_cost_table_keeps_machines_and_epoch_counts_apart(tmp_path):
    """Times hold for one machine: the cost table has a row per strategy, epochs and machine, never a
    mean over a 2-core VM's two CPUs or over 1- and 3-epoch runs, and runs under a multi-task
    aggregator (three backward passes a step) apart from the summed loss's; its CSV is numbers."""
    amd = {"cpu": "AMD EPYC (family 25, model 17)", "cores": 2, "bf16": ["avx512_bf16"], "gpu": None, "torch": "2"}
    intel = {**amd, "cpu": "Intel Xeon (family 6, model 143)", "bf16": ["amx_bf16", "avx512_bf16"]}
    timing = {"startup": 1.0, "features": 0.0, "train": 80.0, "validation": 5.0, "predict": 10.0, "other": 4.0}
    runs = [(amd, 1, 300.0, "sum"), (amd, 1, 200.0, "sum"), (amd, 1, 2000.0, "sum"), (intel, 1, 100.0, "sum")]
    runs += [(amd, 3, 900.0, "sum"), (amd, 1, 600.0, "upgrad")]  # an aggregated step: its own row
    for i, (where, epochs, wall, mtl) in enumerate(runs):  # the 2000 s run shared its machine: the highest
        d = tmp_path / "main" / f"adapter=lora,seed={i}"
        d.mkdir(parents=True)
        best = {"epoch": 1, "dev_avg": 0.5, "dev": {}, "train": {}}
        res = {"status": "complete", "study": "main", "overrides": ["adapter=lora", f"seed={i}"], "seed": i}
        res.update(best=best, history=[best], adapter={"name": "lora"}, epochs=epochs, machine=where)
        res.update(mtl={"name": mtl})
        res.update(wall_time_s=wall, step_time_ms=wall, timing={k: v * wall / 100 for k, v in timing.items()})
        (d / "results.json").write_text(json.dumps(res))
    d = tmp_path / "main" / "adapter=full,seed=1"  # from before runs recorded their machine
    d.mkdir(parents=True)
    best = {"epoch": 1, "dev_avg": 0.5, "dev": {}, "train": {}}
    (d / "results.json").write_text(
        json.dumps(
            {"status": "complete", "study": "main", "overrides": ["adapter=full", "seed=1"], "seed": 1, "best": best}
            | {"history": [best], "adapter": {"name": "full"}, "epochs": 1, "wall_time_s": 50.0, "train_time_s": 40.0}
        )
    )
    text = build_report(tmp_path, tmp_path / "out").read_text()
    with open(tmp_path / "out" / "cost.csv") as f:
        rows = list(csv.DictReader(f))
    wall = "wall s (median) [lowest, highest]"
    got = [
        (r["strategy"], r["epochs"], r["machine"], r["runs"], r[f"{wall} median"], r[f"{wall} highest"]) for r in rows
    ]
    assert got == [
        ("full", "1", "not recorded", "1", "50", "50"),
        ("lora", "1", "AMD EPYC (family 25, model 17), 2 cores", "3", "300", "2000"),  # not the mean, 833
        ("lora", "1", "Intel Xeon (family 6, model 143) AMX, 2 cores", "1", "100", "100"),
        ("lora", "3", "AMD EPYC (family 25, model 17), 2 cores", "1", "900", "900"),
        ("lora+upgrad", "1", "AMD EPYC (family 25, model 17), 2 cores", "1", "600", "600"),
    ]
    amd_one = rows[1]
    assert float(amd_one["train %"]) == pytest.approx(80) and float(amd_one["step ms (median)"]) == pytest.approx(300)
    assert float(rows[0]["train %"]) == pytest.approx(80) and rows[0]["predict %"] == ""
    assert "The runs trained on 3 machines: compare times within one." in text


def test_figures_name_each_rows_own_settings_and_number_trials_whole(tmp_path, monkeypatch):
    """An Optuna search of full (optim.lr) and LoRA (optim.adapter_lr): each tick and legend entry
    names the row's own settings, never an empty `optim.adapter_lr=`; the search figure's trial
    axis is whole numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_lightning.figures import plot_search

    close = plt.close
    close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    root = tmp_path / "mr"
    fake(root, "tune_optuna", ["adapter=full", "optim.lr=3.54e-05", "seed=6"], scores(0.45, 0.82, 0.86))
    fake(root, "tune_optuna", ["adapter=lora", "optim.adapter_lr=0.000647", "seed=6"], scores(0.44, 0.80, 0.87))
    build_report(root, tmp_path / "out")
    (fig,) = [plt.figure(n) for n in plt.get_fignums()]
    ticks = [t.get_text() for t in fig.get_axes()[0].get_xticklabels()]
    assert ticks == ["full,3.54e-05", "lora,0.000647"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "adapter=full, optim.lr=3.54e-05",
        "adapter=lora, optim.adapter_lr=0.000647",
    ]
    close("all")
    trials = [{"trial": i, "state": "pruned", "score": None, "last": 0.6 + i / 100} for i in range(1, 4)]
    search = {"strategy": "lora", "scores": [{"trial": 0, "state": "complete", "score": 0.7}, *trials]}
    assert plot_search(tmp_path / "search.png", [search], {})
    (fig,) = [plt.figure(n) for n in plt.get_fignums()]
    ax = fig.get_axes()[0]
    assert all(float(t).is_integer() for t in ax.get_xticks()) and ax.get_title() == "lora: trials"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["complete (1)", "pruned (3)"]
    close("all")


def test_the_lr_search_figure_draws_the_selection_split_it_chooses_on(tmp_path, monkeypatch):
    """peft-tune chooses each strategy's lr on the selection split: its figure draws that score
    beside dev's, per lr, so the chosen lr can be read off it (dev alone can point elsewhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    close = plt.close
    close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    root = tmp_path / "mr"
    select = {"1e-4": (0.40, 0.80, 0.80), "1e-3": (0.46, 0.82, 0.83)}  # dev prefers 1e-4, select 1e-3
    dev = {"1e-4": (0.45, 0.83, 0.86), "1e-3": (0.43, 0.81, 0.85)}
    for lr in select:
        fake(root, "tune_lr", ["adapter=lora", f"optim.tuned_lr={lr}", "seed=1"], scores(*dev[lr]))
        path = root / "tune_lr" / f"adapter=lora,optim.tuned_lr={lr}" / "seed=1" / "results.json"
        res = json.loads(path.read_text())
        res["best"]["select"] = scores(*select[lr])
        res["best"]["select_avg"] = sum(select[lr]) / 3
        path.write_text(json.dumps(res))
    build_report(root, tmp_path / "out")
    (fig,) = [plt.figure(n) for n in plt.get_fignums()]
    avg = fig.get_axes()[-1]
    lines = {line.get_label(): line for line in avg.get_lines() if not line.get_label().startswith("_")}
    chooses = next(v for k, v in lines.items() if k.endswith("selection split (chooses)"))
    assert list(chooses.get_xdata()) == [1e-4, 1e-3]
    assert list(chooses.get_ydata()) == pytest.approx([sum(select["1e-4"]) / 3, sum(select["1e-3"]) / 3])
    assert avg.get_ylabel() == "dev, selection avg"
    close("all")
    # the table says the same: each lr's selection avg beside its dev avg, and which lr is chosen
    csv_rows = list(csv.DictReader((tmp_path / "out" / "tune_lr.csv").open()))
    by_lr = {r["optim.tuned_lr"]: r for r in csv_rows}
    assert float(by_lr["1e-3"]["select avg mean"]) == pytest.approx(sum(select["1e-3"]) / 3)
    assert float(by_lr["1e-4"]["dev avg mean"]) > float(by_lr["1e-3"]["dev avg mean"])
    assert [by_lr[lr]["chosen"] for lr in ("1e-4", "1e-3")] == ["", "yes"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Learning-rate search per strategy (chosen on the selection split, one seed)" in report
