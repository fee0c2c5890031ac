"""What a researcher looks at: the wandb run of a training run and of a finished one (offline,
read back from its run file), and peft-predict as a notebook uses it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
from conftest import compose, make_data_dir, tiny_overrides, wandb_run

from peft_lightning.train import train

NOTHING_LEARNS = ("optim.lr=1e-30", "optim.adapter_lr=1e-30", "optim.head_lr=1e-30")  # below fp32 resolution


@pytest.fixture(scope="module")
def wandb_trained(tiny_model_dir, tmp_path_factory):
    """A three-epoch run logged to wandb (offline) whose best epoch is its first (nothing learns)."""
    root = tmp_path_factory.mktemp("wb")
    data = make_data_dir(root / "data")
    out = root / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        res = train(
            compose(
                tiny_overrides(
                    tiny_model_dir,
                    data,
                    out,
                    "adapter=lora",
                    "logger=wandb",
                    "budget=smoke",
                    "study=main",
                    "trainer.max_epochs=3",
                    "data.limit_train=48",
                    "data.batch_size=4",
                    *NOTHING_LEARNS,
                )
            )
        )
    finally:
        mp.undo()
    return data, out, res


def test_a_wandb_run_holds_the_best_epoch_and_the_tags(wandb_trained):
    _, out, res = wandb_trained
    assert res["best"]["epoch"] == 1 and len(res["history"]) == 3
    run = wandb_run(out)
    assert set(run["tags"]) >= {"budget:smoke", "model:local", "strategy:lora", "study:main"}
    assert run["group"] == "main-smoke"  # budgets kept apart
    summary = run["summary"]
    assert summary["best/epoch"] == 1 and summary["epoch"] == 1  # the chosen epoch, not the last (3)
    assert summary["select/avg"] == pytest.approx(res["best"]["select_avg"])
    assert summary["val/avg"] == pytest.approx(res["best"]["dev_avg"])
    assert summary["params/encoder/trainable"] == res["params"]["encoder"]["trainable"]
    assert summary["peak_memory_mb"] == pytest.approx(res["peak_memory_mb"]) and "step_time_ms" in summary
    assert summary["predictions/sst5-dev"] == "predictions/sst5-dev.tsv"
    losses = [h for h in run["history"] if "train/loss" in h]
    assert len(losses) >= 3 * 3  # a curve in every epoch of a short run (the interval scaled to it)
    assert sorted({h["epoch"] for h in run["history"] if "epoch" in h}) == [1, 2, 3]  # from 1, as results.json


def test_peft_report_wandb_logs_finished_runs_without_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from peft_lightning.report import main as report

    data = make_data_dir(tmp_path / "data")
    root = tmp_path / "multirun"
    for adapter in ("lora", "frozen"):
        train(
            compose(tiny_overrides(tiny_model_dir, data, root / "main" / adapter, f"adapter={adapter}", "study=main"))
        )
    fits = []
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: fits.append(1))
    monkeypatch.setenv("WANDB_MODE", "offline")
    report([str(root), "--wandb"])
    assert "wandb: 2 runs logged" in capsys.readouterr().out and not fits  # nothing trained
    for adapter in ("lora", "frozen"):
        res = json.loads((root / "main" / adapter / "results.json").read_text())
        run = wandb_run(root / "main" / adapter)
        assert res["wandb_id"] and f"strategy:{adapter}" in run["tags"] and run["group"] == "main-adhoc"
        assert run["summary"]["best/epoch"] == res["best"]["epoch"]
        assert [h["epoch"] for h in run["history"]] == [h["epoch"] for h in res["history"]]
    report([str(root), "--wandb"])  # again: they have their runs now
    assert "wandb: 0 runs logged" in capsys.readouterr().out


def test_peft_predict_without_ids_and_with_probabilities(wandb_trained, tmp_path, capsys):
    from peft_lightning.predict import main as predict

    data, out, _ = wandb_trained
    rows = tmp_path / "rows.tsv"
    rows.write_text("sentence1\tsentence2\nis it raining\tis it wet outside\nwho won\twho lost\nA\tB\n")
    assert (
        predict([str(out), "--task", "qqp", "--input", str(rows), "--out", str(tmp_path / "p.tsv"), "--probabilities"])
        == 0
    )
    lines = [line.split("\t") for line in (tmp_path / "p.tsv").read_text().splitlines()]
    assert lines[0] == ["id", "prediction", "prob_0", "prob_1"]
    assert [line[0] for line in lines[1:]] == ["1", "2", "3"]  # row numbers where the input has no ids
    for line in lines[1:]:
        probs = [float(p) for p in line[2:]]
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-5) and int(line[1]) == probs.index(max(probs))
    # the same rows without --probabilities: the same classes
    assert predict([str(out), "--task", "qqp", "--input", str(rows), "--out", str(tmp_path / "c.tsv")]) == 0
    classes = [line.split("\t")[1] for line in (tmp_path / "c.tsv").read_text().splitlines()[1:]]
    assert classes == [line[1] for line in lines[1:]]


def test_peft_predict_checks_the_rows_before_loading_the_model(wandb_trained, tmp_path, monkeypatch, capsys):
    from peft_lightning import predict as predict_module

    _, out, _ = wandb_trained
    loads = []
    monkeypatch.setattr(predict_module, "load_run", lambda *a, **k: loads.append(1))
    rows = tmp_path / "rows.tsv"
    rows.write_text("id\tsentence\n1\tfine\n2\t\n")
    assert (
        predict_module.main([str(out), "--task", "sst5", "--input", str(rows), "--out", str(tmp_path / "p.tsv")]) == 2
    )
    assert "rows.tsv:3: field 'sentence': empty; expected a sentence" in capsys.readouterr().err and not loads
    assert predict_module.main([str(out), "--task", "stsb", "--input", str(rows), "--out", "-", "--probabilities"]) == 2
    assert "--probabilities: stsb is a regression" in capsys.readouterr().err and not loads


def test_load_run_returns_probabilities(wandb_trained):
    from peft_lightning import load_run

    _, out, _ = wandb_trained
    run = load_run(out)
    probs = run.predict("sst5", ["a fine film", "a dull one"], return_probs=True)
    assert len(probs) == 2 and all(len(p) == 5 and math.isclose(sum(p), 1.0, abs_tol=1e-5) for p in probs)
    assert run.predict("sst5", ["a fine film", "a dull one"]) == [p.index(max(p)) for p in probs]
    with pytest.raises(ValueError, match="stsb is a regression"):
        run.predict("stsb", [("a", "b")], return_probs=True)
    assert Path(out / "results.json").is_file()
