"""Selection that never reads dev, train scores measured like dev, and the bag-of-words floor."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
from conftest import compose, make_data_dir, tiny_overrides
from test_stats import task_preds

from peft_lightning.data import MultiTaskDataModule
from peft_lightning.findings import REPRODUCED, findings, overfitting
from peft_lightning.floor import write_floor
from peft_lightning.report import build_report
from peft_lightning.runs import load_runs


def read_tsv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def test_the_selection_split_is_held_out_stratified_and_the_same_for_every_seed(data_dir, tiny_tokenizer, tmp_path):
    splits = {}
    for seed in (1, 2):
        dm = MultiTaskDataModule(data_dir, tiny_tokenizer, cache_dir=tmp_path, seed=seed, selection=12, limit_train=20)
        dm.setup()
        splits[seed] = dm
    a, b = splits[1], splits[2]
    for task in a.task_names:
        select, train = a.split(task, "select"), a.split(task, "train")
        assert len(select) == 9  # at most a fifth of the 48 training rows
        assert a.split(task, "select").ids == b.split(task, "select").ids  # eval_seed, not the run's seed
        assert a.split(task, "train").ids != b.split(task, "train").ids  # limit_train draws with the run's seed
        assert not set(select.ids) & set(train.ids) and not set(select.ids) & set(b.split(task, "train").ids)
        assert set(a.split(task, "train_eval").ids) <= set(train.ids)
    # stratified: SST-5's five classes in the selection split as in the training set (48 rows: ~9.6 each)
    sst = a.split("sst5", "select").labels.long().tolist()
    assert sorted(set(sst)) == [0, 1, 2, 3, 4]
    assert a.selection_record()["rows"] == {"sst5": 9, "qqp": 9, "stsb": 9}


def test_select_on_dev_keeps_the_studys_protocol(data_dir, tiny_tokenizer, tmp_path):
    dm = MultiTaskDataModule(data_dir, tiny_tokenizer, cache_dir=tmp_path, select_on="dev")
    dm.setup()
    assert len(dm.split("sst5", "train")) == 48 and ("sst5", "select") not in dm.splits
    assert dm.selection_record()["on"] == "dev"
    with pytest.raises(ValueError, match="data.select_on=selection needs a selection split"):
        MultiTaskDataModule(data_dir, tiny_tokenizer, selection=0)
    with pytest.raises(ValueError, match="data.selection must be a number of rows"):
        MultiTaskDataModule(data_dir, tiny_tokenizer, selection=1.5)


def noisy_dev(data_dir, tmp_path):
    """A copy of the data folder whose dev labels are noise."""
    import shutil

    out = tmp_path / "noisy"
    shutil.copytree(data_dir, out)
    rng = random.Random(0)
    for task, make in (
        ("sst5", lambda: rng.randint(0, 4)),
        ("qqp", lambda: rng.randint(0, 1)),
        ("stsb", lambda: round(rng.uniform(0, 5), 2)),
    ):
        rows = read_tsv(out / task / "dev.tsv")
        rows = [rows[0]] + [r[:-1] + [str(make())] for r in rows[1:]]
        with open(out / task / "dev.tsv", "w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)
    return out


@pytest.mark.slow
def test_selection_never_reads_dev_labels(tiny_model_dir, data_dir, tmp_path):
    """With the dev labels replaced by noise, the chosen epoch and peft-tune's chosen lr stay the same."""
    from peft_lightning.train import train
    from peft_lightning.tune import choose

    noisy = noisy_dev(data_dir, tmp_path)
    runs = {}
    for name, folder in (("real", data_dir), ("noisy", noisy)):
        for lr in (1e-4, 3e-2):
            out = tmp_path / name / f"lr-{lr:g}"
            extra = ("adapter=lora", "adapter.rank=2", "trainer.max_epochs=3", f"optim.tuned_lr={lr:g}", "seed=3")
            extra += ("data.score_dev=every_epoch",)  # dev in every epoch's record, to show it changed
            runs.setdefault(name, []).append(train(compose(tiny_overrides(tiny_model_dir, folder, out, *extra))))
    for real, noise in zip(runs["real"], runs["noisy"]):
        assert real["best"]["epoch"] == noise["best"]["epoch"]
        assert [h["select_avg"] for h in real["history"]] == [h["select_avg"] for h in noise["history"]]
        assert [h["dev_avg"] for h in real["history"]] != [h["dev_avg"] for h in noise["history"]]  # dev did change
    chosen = {name: choose(load_runs(tmp_path / name), ["lora"])["lora"] for name in runs}
    assert chosen["real"]["lr"] == chosen["noisy"]["lr"] and chosen["real"]["on"] == "select"
    assert chosen["real"]["grid"] == chosen["noisy"]["grid"]


def write_last(root, name: str, seed: int, train_q: float, dev_q: float, n: int = 600) -> None:
    """An epochs-study run with last-epoch dev and train_eval predictions of the given qualities."""
    d = root / "epochs" / f"adapter={name},seed={seed}"
    for split, q in (("dev", dev_q), ("train_eval", train_q)):
        (d / "predictions" / "last").mkdir(parents=True, exist_ok=True)
        for task, (pred, label) in task_preds(
            q, seed + (split == "dev") * 50 + {"lora": 7, "full": 13}[name], n
        ).items():
            # train_eval: each seed's own sample of its training rows (ids shared only within the seed)
            ids = [f"s{seed}r{i}" if split == "train_eval" else f"r{i}" for i in range(len(pred))]
            rows = ["id\tprediction\tlabel"] + [f"{i}\t{p:g}\t{y:g}" for i, p, y in zip(ids, pred, label)]
            (d / "predictions" / "last" / f"{task}-{split}.tsv").write_text("\n".join(rows) + "\n")
    best = {"epoch": 3, "dev_avg": dev_q, "train_avg": train_q, "dev": {}, "train": {}}
    res = {"status": "complete", "study": "epochs", "overrides": [f"adapter={name}", f"seed={seed}"], "seed": seed}
    res.update(best=best, history=[best], adapter={"name": name})
    (d / "results.json").write_text(json.dumps(res))


def test_the_train_dev_gap_is_measured_like_dev_and_gets_an_interval(tmp_path):
    for seed in (1, 2, 3):
        write_last(tmp_path, "lora", seed, train_q=0.75, dev_q=0.65)  # gap about 0.1
        write_last(tmp_path, "full", seed, train_q=0.95, dev_q=0.65)  # gap about 0.3
    by_study = {"epochs": load_runs(tmp_path)}
    row = next(r for r in findings(by_study) if r[1] == "epochs")
    assert row[2] == REPRODUCED and row[3].startswith("gap LoRA - gap full: -") and "(n=3)" in row[3]
    # every seed's whole train_eval sample counts, though no two seeds share a train row
    (comparison,) = overfitting(by_study)[2]
    assert comparison.interval.rows == 3 * 600  # three tasks, 600 rows each, per seed
    assert -0.3 < comparison.interval.low < comparison.interval.value < comparison.interval.high < 0


def test_the_floor_is_a_run_the_report_scores_every_row_against(tmp_path):
    data = make_data_dir(tmp_path / "data", n_train=200, n_dev=60, n_test=20)
    floor = write_floor(data, tmp_path / "sweep")
    res = json.loads((floor / "results.json").read_text())
    assert (
        res["status"] == "complete" and res["study"] == "floor" and set(res["best"]["dev"]) == {"sst5", "qqp", "stsb"}
    )
    for task in ("sst5", "qqp", "stsb"):
        dev, test = (
            read_tsv(floor / "predictions" / f"{task}-dev.tsv"),
            read_tsv(floor / "predictions" / f"{task}-test.tsv"),
        )
        src_dev, src_test = read_tsv(data / task / "dev.tsv"), read_tsv(data / task / "test.tsv")
        assert dev[0] == ["id", "prediction", "label"] and test[0] == ["id", "prediction"]
        assert [r[0] for r in dev[1:]] == [r[0] for r in src_dev[1:]] and [r[0] for r in test[1:]] == [
            r[0] for r in src_test[1:]
        ]
    # the synthetic sentiment words make SST-5 learnable by bag of words: well above chance (0.2)
    assert res["best"]["dev"]["sst5"]["acc"] > 0.4
    dev_ids = [r[0] for r in read_tsv(data / "sst5" / "dev.tsv")[1:]]
    rng = np.random.default_rng(0)
    for s in (1, 2, 3):  # a main study on the same dev rows
        d = tmp_path / "sweep" / "main" / f"adapter=lora,seed={s}"
        (d / "predictions").mkdir(parents=True)
        for task in ("sst5", "qqp", "stsb"):
            rows = read_tsv(data / task / "dev.tsv")
            lines = ["id\tprediction\tlabel"] + [
                f"{r[0]}\t{r[-1] if rng.random() < 0.9 else 0}\t{r[-1]}" for r in rows[1:]
            ]
            (d / "predictions" / f"{task}-dev.tsv").write_text("\n".join(lines) + "\n")
        best = {"epoch": 1, "dev_avg": 0.9, "dev": {}, "train": {}}
        res = {"status": "complete", "study": "main", "overrides": ["adapter=lora", f"seed={s}"], "seed": s}
        (d / "results.json").write_text(
            json.dumps({**res, "best": best, "history": [best], "adapter": {"name": "lora"}})
        )
    text = build_report(tmp_path / "sweep").read_text()
    assert "Floor: a bag-of-words model" in text and "Δ dev avg vs floor" in text
    # main sets each task against the floor too: SST-5 right 90% of the time against the floor's (above 0.4)
    header = next(line for line in text.splitlines() if line.startswith("| adapter |")).split("|")
    row = next(line for line in text.splitlines() if line.startswith("| lora |")).split("|")
    cells = {h.strip(): c.strip() for h, c in zip(header, row)}
    for column in ("Δ sst5 acc vs floor", "Δ qqp acc vs floor", "Δ stsb pearson vs floor", "Δ dev avg vs floor"):
        assert cells[column].endswith("n=3"), (column, cells)
    floor_sst5 = json.loads((floor / "results.json").read_text())["best"]["dev"]["sst5"]["acc"]
    assert float(cells["Δ sst5 acc vs floor"].split()[0]) == pytest.approx(0.9 - floor_sst5, abs=0.1)
    assert len(dev_ids) == 60
    # and the floor is a row of the main table: its dev scores and its rows-only interval, not bolded
    floor_line = next(line for line in text.splitlines() if line.startswith("| bag-of-words floor |")).split("|")
    floor_cells = {h.strip(): c.strip() for h, c in zip(header, floor_line)}
    assert floor_cells["dev sst5 acc"] == f"{floor_sst5:.4f}" and floor_cells["seeds"] == "-"
    assert floor_cells["dev avg 95% CI"].endswith("rows only") and floor_cells["Δ dev avg vs floor"] == "-"
    main_csv = list(csv.DictReader((tmp_path / "sweep" / "main.csv").open()))
    assert main_csv[-1]["adapter"] == "bag-of-words floor"
    assert float(main_csv[-1]["dev sst5 acc mean"]) == pytest.approx(floor_sst5)
