"""`peft-train` and friends as a user runs them (subprocesses). Marked slow."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA

pytestmark = pytest.mark.slow


def cli(args: list[str], cwd, module: str = "peft_lightning.train") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def tiny(model_dir, data_dir, tmp_path) -> list[str]:
    return [
        "model=local",
        f"model.source={model_dir}",
        f"data.dir={data_dir}",
        f"data.cache_dir={tmp_path / 'c'}",
        "data.max_length=64",  # the tiny model's positions
        "trainer.max_epochs=1",
    ]


@pytest.mark.parametrize(
    "corrupt,expect",
    [
        (
            lambda d: (d / "sst5" / "dev.tsv").write_text("id\tsentence\tlabel\na\tfine\t7\n"),
            "dev.tsv:2: field 'label': '7' is not a valid class; expected an integer class 0..4",
        ),
        (
            lambda d: (d / "stsb" / "train.tsv").write_text("id\tsentence1\tsentence2\tscore\nx\ta\tb\tNaN\n"),
            "train.tsv:2: field 'score': 'NaN' is not finite",
        ),
        (lambda d: (d / "qqp" / "test.tsv").unlink(), "qqp/test.tsv: file not found"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_model_dir, data_dir, tmp_path, corrupt, expect):
    corrupt(data_dir)
    proc = cli(tiny(tiny_model_dir, data_dir, tmp_path), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and expect in out and "Traceback" not in out


def test_config_errors_are_clear(tiny_model_dir, data_dir, tmp_path):
    proc = cli([*tiny(tiny_model_dir, data_dir, tmp_path), "adapter=prefix", "+adapter.depth=3"], tmp_path)
    assert proc.returncode == 2 and "adapter.depth is not an option of Prefix" in proc.stdout + proc.stderr
    proc = cli([*tiny(tiny_model_dir, data_dir, tmp_path), "adapter=prefix", "adapter.length=0"], tmp_path)
    assert proc.returncode == 2 and "adapter.length must be an integer >= 1" in proc.stdout + proc.stderr
    proc = cli([*tiny(tiny_model_dir, data_dir, tmp_path), "data.dir=/nonexistent"], tmp_path)
    assert proc.returncode == 2 and "data directory /nonexistent does not exist" in proc.stdout + proc.stderr


@pytest.mark.skipif(not (SHARED_DATA / "sst5").is_dir(), reason="no shared data beside the checkout")
def test_minilm_on_real_data_writes_every_prediction(tmp_path):
    proc = cli(
        [
            f"data.dir={SHARED_DATA}",
            f"data.cache_dir={tmp_path / 'c'}",
            "adapter=lora",
            "data.limit_train=24",
            "data.limit_eval=48",
            "data.selection=48",  # a small selection split: this test is about the prediction files
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "data.max_length=48",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "adhoc").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and res["model"]["name"] == "minilm"
    for task, n in (("sst5", 2210), ("qqp", 5000), ("stsb", 1378)):
        with open(run / "predictions" / f"{task}-test.tsv", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        with open(SHARED_DATA / task / "test.tsv", newline="") as f:
            ids = [r[0] for r in list(csv.reader(f, delimiter="\t"))[1:]]
        assert len(rows) == n + 1 and [r[0] for r in rows[1:]] == ids
        with open(run / "predictions" / f"{task}-dev.tsv", newline="") as f:
            assert len(list(csv.reader(f, delimiter="\t"))) == 48 + 1  # limit_eval subsample of dev
