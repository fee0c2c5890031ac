"""results.py: what a run leaves behind survives an interruption."""

from __future__ import annotations

import csv

from peft_lightning.results import ResumableCSVLogger


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_csv_logger_keeps_the_rows_before_its_checkpoint(tmp_path):
    metrics = tmp_path / "csv" / "metrics.csv"
    metrics.parent.mkdir()
    # an interrupted run: epoch 0 (steps 0-5, validated at 5), then part of epoch 1, then a torn line
    metrics.write_text("epoch,step,train/loss,val/avg\n0,1,2.0,\n0,3,1.8,\n0,5,,0.3\n0,4\n1,7,1.2,\n1,9,1.1,\n1,1")
    logger = ResumableCSVLogger(resume_step=6, save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 0.9}, step=7)  # the resumed run logs step 7 again
    logger.save()
    got = rows(metrics)
    assert [(r["epoch"], r["step"]) for r in got] == [("0", "1"), ("0", "3"), ("0", "5"), ("", "7")]
    assert got[2]["val/avg"] == "0.3" and got[3]["train/loss"] == "0.9"
    logger.log_metrics({"val/avg": 0.4, "val/new": 1.0}, step=11)  # a key the file has not seen
    logger.save()
    got = rows(metrics)
    assert list(got[0]) == ["epoch", "step", "train/loss", "val/avg", "val/new"] and len(got) == 5
    assert got[0]["train/loss"] == "2.0" and got[4]["val/new"] == "1.0"


def test_fresh_csv_logger_starts_a_new_file(tmp_path):
    metrics = tmp_path / "csv" / "metrics.csv"
    metrics.parent.mkdir()
    metrics.write_text("epoch,step,train/loss\n0,1,2.0\n")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")  # resume_step=0
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.save()
    assert [(r["step"], r["train/loss"]) for r in rows(metrics)] == [("1", "0.5")]
