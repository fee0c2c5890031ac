"""`trainer=ddp` end to end on this CPU: two processes with the gloo backend (subprocesses; slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, SHARED_DATA, compose, make_data_dir

from peft_lightning.data.schedules import ScheduleSampler

pytestmark = pytest.mark.slow

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


def cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "peft_lightning.train", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def single_process_validate(overrides: list[str], ckpt: Path) -> tuple[dict, dict]:
    """Dev metrics and dev predictions of `ckpt` computed by one process, built from the same config."""
    from peft_lightning.build import build

    cfg = compose(overrides)
    L.seed_everything(cfg.seed, verbose=False)
    _, dm, module = build(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.validate(module, datamodule=dm, ckpt_path=str(ckpt), verbose=False)
    dev = module.history[-1]["dev"]
    preds = {}
    outputs = trainer.predict(module, dataloaders=dm.predict_dataloader(("dev",)))
    for (task, _), batches in zip(dm.predict_targets(("dev",)), outputs):
        for b in batches:
            for i, p in zip(b["index"].tolist(), b["prediction"].tolist()):
                preds[(task, dm.split(task, "dev").ids[i])] = p
    return dev, preds


@pytest.mark.skipif(not (SHARED_DATA / "sst5").is_dir(), reason="no shared data beside the checkout")
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """The issue's command: model=tiny, the real data, two gloo processes."""
    out = tmp_path / "run"
    args = [
        "model=tiny",
        f"data.dir={SHARED_DATA}",
        "adapter=lora",
        "data.limit_train=160",
        "data.limit_eval=64",
        "data.score_dev=every_epoch",  # dev in validation, as the single process below validates it
        "trainer.max_epochs=1",
        *DDP,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={out}",
        "trainer.enable_progress_bar=false",
    ]
    started = time.perf_counter()
    proc = cli(args, tmp_path)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete", res.get("error")
    # 160 rows a task, batch 8: the joint schedule's 20 steps dealt to two ranks, 10 each
    assert res["steps"] == 10
    # one folder for both ranks: nothing per rank, no .pl_ddp_hydra_* anywhere
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".hydra", ".lock", "checkpoints", "csv", "predictions", "results.json", "train.log"]
    )
    assert not list(tmp_path.rglob(".pl_ddp_hydra*")) and not list(tmp_path.rglob("*ddp_process*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt"]  # last.ckpt: removed when complete
    assert proc.stderr.count("run failed") == 0

    # every input row once, in input order (test: the whole file; dev: the seeded 64-row subsample)
    for task in ("sst5", "qqp", "stsb"):
        test_ids = [r[0] for r in read_tsv(SHARED_DATA / task / "test.tsv")[1:]]
        assert [r[0] for r in read_tsv(out / "predictions" / f"{task}-test.tsv")[1:]] == test_ids
        dev_rows = read_tsv(out / "predictions" / f"{task}-dev.tsv")[1:]
        all_dev = [r[0] for r in read_tsv(SHARED_DATA / task / "dev.tsv")[1:]]
        assert len(dev_rows) == 64 and len({r[0] for r in dev_rows}) == 64
        positions = [all_dev.index(r[0]) for r in dev_rows]
        assert positions == sorted(positions)

    # the dev metrics two processes synchronised equal one process's on the same checkpoint and rows
    single = [a for a in args if not a.startswith(("trainer=", "trainer.devices", "hydra."))]
    dev, preds = single_process_validate(
        [*single, f"output_dir={tmp_path / 'single'}"], out / "checkpoints" / "best.ckpt"
    )
    for task, metrics in res["best"]["dev"].items():
        for name, value in metrics.items():
            assert abs(value - dev[task][name]) < 1e-4, (task, name, value, dev[task][name])
    for task in ("sst5", "qqp", "stsb"):
        for id_, p, _ in read_tsv(out / "predictions" / f"{task}-dev.tsv")[1:]:
            assert abs(float(p) - preds[(task, id_)]) < 1e-4
    print(f"ddp run: {wall:.1f} s wall")


def _alive(marker: str) -> list[int]:
    """PIDs of processes whose command line holds `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_ddp_kill_9_in_epoch_2_then_rerun_resumes(tiny_model_dir, tmp_path):
    data = make_data_dir(tmp_path / "data", n_train=800, n_dev=32, n_test=8)
    out = tmp_path / "killed-run"
    args = [
        "model=local",
        f"model.source={tiny_model_dir}",
        f"data.dir={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=64",
        "data.select_on=dev",  # every training row trains: the step count below is the schedule's
        "trainer.max_epochs=3",
        *DDP,
        f"hydra.run.dir={out}",
        "trainer.enable_progress_bar=false",
        "predict=false",
    ]
    cmd = [sys.executable, "-m", "peft_lightning.train", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    last = out / "checkpoints" / "last.ckpt"
    while time.time() < deadline:  # epoch 1 is recorded and checkpointed: epoch 2 is under way
        try:
            if len(json.loads((out / "results.json").read_text())["history"]) == 1 and last.is_file():
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # rank 0 only, as a crashed node would
    proc.wait()
    first = json.loads((out / "results.json").read_text())
    assert first["status"] == "running" and len(first["history"]) == 1
    for _ in range(100):  # rank 1 sees its parent gone and ends, instead of hanging in a collective
        if not _alive(str(out)):
            break
        time.sleep(0.1)
    assert not _alive(str(out)), "a rank outlived its killed rank 0"

    rerun = cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert res["history"][0] == first["history"][0]  # epoch 1 as recorded before the kill, clocks too
    assert "resuming from" in (out / "train.log").read_text()
    steps_per_epoch = ScheduleSampler({"t": 800}, {"t": 8}).schedule_steps() // 2
    assert res["steps"] == 3 * steps_per_epoch


def test_a_data_error_under_ddp_is_one_message_and_no_hang(tiny_model_dir, tmp_path):
    data = make_data_dir(tmp_path / "data")
    (data / "sst5" / "dev.tsv").write_text("id\tsentence\tlabel\na\tfine\t7\n")
    args = [
        "model=local",
        f"model.source={tiny_model_dir}",
        f"data.dir={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=64",
        *DDP,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = cli(args, tmp_path, timeout=180)
    err = proc.stdout + proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert err.count("dev.tsv:2: field 'label': '7' is not a valid class") == 1, err[-3000:]
    assert "Traceback" not in err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_the_schedule_is_dealt_to_ranks_without_gaps():
    sizes, batch = {"sst5": 50, "qqp": 30}, {"sst5": 8, "qqp": 8}
    whole = list(ScheduleSampler(sizes, batch, "joint", seed=3))
    shards = []
    for rank in range(3):
        s = ScheduleSampler(sizes, batch, "joint", seed=3)
        s.shard(rank, 3)
        shards.append(list(s))
    assert [len(x) for x in shards] == [3, 3, 3]  # 7 steps: ceil(7 / 3) each
    dealt = [shards[r][i] for i in range(3) for r in range(3)]
    assert dealt[:7] == whole  # every step once, in order
    assert shards[1][2] == shards[2][2] == whole[0]  # the two short ranks repeat the epoch's first step
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        ScheduleSampler(sizes, batch).shard(3, 3)


def test_ddp_config_numbers_from_the_environment_are_numbers(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    cfg = compose(["trainer=ddp"])
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4
    monkeypatch.delenv("SLURM_NNODES")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    cfg = compose(["trainer=ddp", "trainer.devices=2"])
    assert cfg.trainer.num_nodes == 1 and cfg.trainer.devices == 2 and cfg.trainer.accelerator == "auto"
    assert torch.distributed.is_available()
