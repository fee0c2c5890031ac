"""Hydra sweeps end to end (subprocesses): joblib launcher, submitit local launcher, a failing job,
skipping complete jobs, wandb offline runs, and the report on top. Marked slow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from peft_lightning.report import build_report

pytestmark = pytest.mark.slow


def peft_train(
    tmp_path: Path, model_dir: Path, data_dir: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "peft_lightning.train",
        "-m",
        "model=local",
        f"model.source={model_dir}",
        f"data.dir={data_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "budget=smoke",
        f"sweep_root={tmp_path / 'multirun'}",
        "trainer.accelerator=cpu",
        "optim.lr=3e-3",
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def results(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.rglob("results.json")}


def test_joblib_sweep_then_report_then_rerun_skips(tiny_model_dir, data_dir, tmp_path):
    args = ("hydra/launcher=gpus", "hydra.launcher.n_jobs=2", "study=lora_rank", "adapter=lora", "adapter.rank=2,4")
    peft_train(tmp_path, tiny_model_dir, data_dir, *args)
    runs = results(tmp_path / "multirun" / "lora_rank")
    by_rank = {r["adapter"]["rank"]: r for r in runs.values()}
    assert len(runs) == 2 and set(by_rank) == {2, 4}
    assert all(name.startswith(f"adapter.rank={r['adapter']['rank']},adapter=lora,") for name, r in runs.items())
    assert all(r["status"] == "complete" for r in runs.values())
    assert by_rank[4]["params"]["encoder"]["trainable"] == 2 * by_rank[2]["params"]["encoder"]["trainable"]
    report = build_report(tmp_path / "multirun")
    text = report.read_text()
    assert "## LoRA rank: train and dev" in text and (report.parent / "lora_rank.csv").is_file()
    assert (report.parent / "lora_rank.png").stat().st_size > 1000
    csv_rows = (report.parent / "lora_rank.csv").read_text().splitlines()
    assert csv_rows[0].startswith("adapter.rank,train sst5 acc mean") and {r.split(",")[0] for r in csv_rows[1:]} == {
        "2",
        "4",
    }
    # rerunning the sweep skips the complete jobs: results.json files are left untouched
    stamps = {k: (tmp_path / "multirun" / "lora_rank" / k / "results.json").stat().st_mtime_ns for k in runs}
    proc = peft_train(tmp_path, tiny_model_dir, data_dir, *args)
    assert "is complete; skipping" in proc.stdout + proc.stderr
    assert stamps == {k: (tmp_path / "multirun" / "lora_rank" / k / "results.json").stat().st_mtime_ns for k in runs}


def test_submitit_local_launcher(tiny_model_dir, data_dir, tmp_path):
    peft_train(tmp_path, tiny_model_dir, data_dir, "hydra/launcher=local", "study=submitit", "adapter=frozen")
    runs = results(tmp_path / "multirun" / "submitit")
    assert [r["status"] for r in runs.values()] == ["complete"]
    assert list((tmp_path / "multirun" / "submitit").rglob("*_submitted.pkl")) or list(
        (tmp_path / "multirun" / "submitit").rglob(".submitit")
    )


def test_wandb_offline_run_per_job(tiny_model_dir, data_dir, tmp_path):
    peft_train(tmp_path, tiny_model_dir, data_dir, "study=wbstudy", "logger=wandb", "adapter=lora,prefix")
    root = tmp_path / "multirun" / "wbstudy"
    jobs = {d.name: d for d in root.iterdir() if d.is_dir() and d.name.startswith("adapter=")}
    assert len(jobs) == 2
    for kind in ("lora", "prefix"):
        job = next(n for n in jobs if n.startswith(f"adapter={kind},"))
        offline = list((root / job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, job  # one run per job, never one run for the sweep
        blob = next(offline[0].glob("*.wandb")).read_bytes()
        assert b"wbstudy" in blob and kind.encode() in blob and job.encode() in blob  # group, job_type, name


def test_wandb_run_resumes_under_its_id(tiny_model_dir, data_dir, tmp_path):
    """An interrupted run resumed from its checkpoint goes on as the same wandb run; force=true starts a new one."""
    from conftest import compose, tiny_overrides

    from peft_lightning.train import train

    out = tmp_path / "wb"

    def run(*extra):
        return train(compose(tiny_overrides(tiny_model_dir, data_dir, out, "adapter=lora", "logger=wandb", *extra)))

    first = run("trainer.max_epochs=1", "checkpoints=last")
    wid = first["wandb_id"]
    res = json.loads((out / "results.json").read_text())
    res["status"] = "running"  # as if a 2-epoch run were killed after epoch 1
    res["config"]["trainer"]["max_epochs"] = 2
    (out / "results.json").write_text(json.dumps(res))
    second = run("trainer.max_epochs=2", "ckpt_path=last")
    assert second["wandb_id"] == wid and [h["epoch"] for h in second["history"]] == [1, 2]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    # `wandb sync` joins them (two starts within one second: wandb names the second folder `...-<id>-1`)
    assert len(runs) == 2 and all(f"-{wid}" in r.name for r in runs)
    third = run("trainer.max_epochs=2", "force=true")
    assert third["wandb_id"] != wid


def test_ray_launcher_two_jobs_then_report(tiny_model_dir, data_dir, tmp_path):
    """hydra/launcher=ray as the README shows it, on a local Ray without a GPU (a GPU request would
    wait forever: the launcher asks for none here), then the report over it."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    args = (
        "hydra/launcher=ray",
        "hydra.launcher.ray.init.num_cpus=2",  # no num_gpus: a local Ray without a GPU asks for none
        "study=raystudy",
        "adapter=lora,frozen",
    )
    proc = peft_train(tmp_path, tiny_model_dir, data_dir, *args)
    assert "Ray Launcher is launching 2 jobs" in proc.stdout + proc.stderr
    runs = results(tmp_path / "multirun" / "raystudy")
    assert sorted(r["adapter"]["name"] for r in runs.values()) == ["frozen", "lora"]
    assert all(r["status"] == "complete" and r["steps"] == 4 for r in runs.values())  # smoke: 16 rows, batch 4
    assert len({r["run_name"] for r in runs.values()}) == 2  # one folder a job
    text = build_report(tmp_path / "multirun").read_text()
    assert "raystudy" in text and "lora" in text and "frozen" in text


def test_wandb_under_ddp_logs_one_run(tiny_model_dir, data_dir, tmp_path):
    """Two DDP processes, one wandb run (rank 0's), in the job's one folder."""
    cmd = [
        sys.executable,
        "-m",
        "peft_lightning.train",
        "model=local",
        f"model.source={tiny_model_dir}",
        f"data.dir={data_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=64",
        "trainer.max_epochs=1",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "logger=wandb",
        "predict=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert res["status"] == "complete" and len(offline) == 1 and offline[0].name.endswith(res["wandb_id"])
    assert not list(tmp_path.rglob("wandb/offline-run-*"))[1:]  # none elsewhere either


def test_tune_searches_each_strategys_lr_then_retrains_the_best_over_seeds(tiny_model_dir, data_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "peft_lightning.tune",
        "budget=smoke",
        "tune.grid=[1e-4,3e-2]",
        "tune.grids={lora:[3e-3,3e-2]}",  # LoRA's own grid; frozen searches tune.grid
        "tune.strategies=[frozen,lora]",
        "budget.seeds=[1,2]",
        f"sweep_root={tmp_path / 'multirun'}",
        "model=local",
        f"model.source={tiny_model_dir}",
        f"data.dir={data_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.accelerator=cpu",
        "optim.lr=3e-3",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    search = results(tmp_path / "multirun" / "tune_lr")
    assert len(search) == 4 and all(r["status"] == "complete" and r["seed"] == 1 for r in search.values())
    searched = {(r["adapter"]["name"], r["config"]["optim"]["tuned_lr"]) for r in search.values()}
    assert searched == {("frozen", 1e-4), ("frozen", 3e-2), ("lora", 3e-3), ("lora", 3e-2)}
    assert all(not name.startswith("tune.") and ",tune." not in name for name in search)  # folders as before
    chosen = json.loads((tmp_path / "multirun" / "tuned" / "tuned_lr.json").read_text())["strategies"]
    for name, role in (("frozen", "head_lr"), ("lora", "adapter_lr")):
        grid = {
            r["config"]["optim"]["tuned_lr"]: r["best"]["select_avg"]  # chosen on the selection split, not dev
            for r in search.values()
            if r["adapter"]["name"] == name
        }
        assert chosen[name]["lr"] == max(grid, key=grid.get) and chosen[name]["sets"] == f"optim.{role}"
        # the search runs set that lr, and only that one
        for r in search.values():
            if r["adapter"]["name"] == name:
                assert r["lr"][role] == r["config"]["optim"]["tuned_lr"]
                assert all(v == r["config"]["optim"][k] for k, v in r["lr"].items() if k != role)
    final = results(tmp_path / "multirun" / "tuned")
    assert sorted((r["adapter"]["name"], r["seed"]) for r in final.values()) == [
        ("frozen", 1),
        ("frozen", 2),
        ("lora", 1),
        ("lora", 2),
    ]
    for r in final.values():
        assert r["status"] == "complete" and r["config"]["optim"]["tuned_lr"] == chosen[r["adapter"]["name"]]["lr"]
        assert {"sst5-test", "qqp-test", "stsb-test"} <= set(r["predictions"])
    text = (tmp_path / "multirun" / "report" / "report.md").read_text()
    assert (
        "## Each strategy at its own tuned learning rate (dev)" in text and "Tuned learning rates (`peft-tune`)" in text
    )
    assert f"| lora | {chosen['lora']['lr']:g} | optim.adapter_lr |" in text


def test_reproduce_plans_shares_runs_between_studies_and_reports_progress(tiny_model_dir, data_dir, tmp_path):
    """The plan's jobs are the sweeps' jobs; a run two studies share is trained once and in both
    reports; the report goes where `hydra.sweep.dir` put the runs."""
    root = tmp_path / "multirun"
    moved = root / "elsewhere"
    cmd = [
        sys.executable,
        "-m",
        "peft_lightning.reproduce",
        "budget=smoke",
        "studies=[main,prefix_length]",
        f"sweep_root={root}",
        f"hydra.sweep.dir={moved}/${{study}}",
        "model=local",
        f"model.source={tiny_model_dir}",
        f"data.dir={data_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.accelerator=cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}

    def reproduce(*extra):
        proc = subprocess.run([*cmd, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    planned = reproduce("plan=true")
    # main: 4 strategies; prefix_length: P = 1, 2, 4, 8, of which P=4 is main's prefix run
    assert "8 jobs: 1 shared, 7 to run" in planned and not root.exists()  # a plan runs nothing
    assert re.search(r"shared   prefix_length/adapter\.length=4,\S+ <- \S+/main/adapter=prefix,", planned)
    out = reproduce()
    runs = {p.parent.relative_to(moved).as_posix(): json.loads(p.read_text()) for p in moved.rglob("results.json")}
    runs = {k: r for k, r in runs.items() if r["study"] != "floor"}
    assert not (root / "main").exists()  # where hydra.sweep.dir put them
    assert len(runs) == 8 and all(r["status"] == "complete" for r in runs.values())  # the plan's count
    progress = [line for line in out.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert len(progress) == 8 and progress[-1].startswith("[8/8] ") and "ETA done" in progress[-1]
    assert re.search(r"^8 of 8 jobs complete in ", out, re.M)  # the last line before the report
    ((name, shared),) = [(k, r) for k, r in runs.items() if r.get("shared_from")]
    assert name.startswith("prefix_length/adapter.length=4,")
    assert shared["shared_from"].startswith("elsewhere/main/adapter=prefix,")  # relative to the sweep root
    assert not (moved / name / "checkpoints").exists() and (root / shared["shared_from"] / "checkpoints").is_dir()
    floor = json.loads((moved / "floor" / "bow" / "results.json").read_text())  # fitted on data.dir for the report
    assert floor["status"] == "complete" and set(floor["best"]["dev"]) == {"sst5", "qqp", "stsb"}
    assert f"report: {moved / 'report' / 'report.md'}" in out
    text = (moved / "report" / "report.md").read_text()
    assert "## Main comparison" in text and "## Prefix length" in text and "1 more taken" in text
    assert "8 jobs: 8 complete" in reproduce("plan=true")
