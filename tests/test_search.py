"""peft-tune search=optuna: TPE over a strategy's space, losing trials pruned, a journal that resumes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_data_dir

from peft_lightning import search
from peft_lightning.config import ConfigError, compose

ROOT = Path(__file__).resolve().parents[1]


def tune_args(model_dir: Path, data: Path, tmp: Path, *extra: str) -> list[str]:
    # frozen heads only, lr log-uniform over [1e-9, 0.1]: the lower half of the range trains nothing
    return [
        "budget=smoke",
        "search=optuna",
        "tune.strategies=[frozen]",
        "tune.space.frozen.lr.low=1e-9",
        "tune.space.frozen.lr.high=0.1",
        "trainer.max_epochs=3",
        "data.limit_train=96",
        "data.selection=24",
        "budget.seeds=[1]",
        f"sweep_root={tmp / 'multirun'}",
        "model=local",
        f"model.source={model_dir}",
        f"data.dir={data}",
        f"data.cache_dir={tmp / 'cache'}",
        "trainer.accelerator=cpu",
        *extra,
    ]


def trials(root: Path, strategy: str = "frozen"):
    import optuna

    return optuna.load_study(study_name=strategy, storage=search.journal(root)).get_trials()


def env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


def test_a_value_near_the_end_of_its_range_is_flagged():
    import optuna.distributions as d

    dists = {"lr": d.FloatDistribution(1e-4, 1e-2, log=True), "dropout": d.FloatDistribution(0.0, 0.3)}
    assert search.at_edge(dists, {"lr": 9.5e-3, "dropout": 0.15}) == ["lr=0.0095 at the high end of [0.0001, 0.01]"]
    assert search.at_edge(dists, {"lr": 1e-3, "dropout": 0.005}) == ["dropout=0.005 at the low end of [0, 0.3]"]
    assert search.at_edge(dists, {"lr": 1e-3, "dropout": 0.15}) == []


def test_search_spaces_are_checked_before_anything_runs(capsys):
    from peft_lightning.tune import main

    with pytest.raises(SystemExit) as err:
        main(["budget=smoke", "search=optuna", "tune.space.lora.lr.low=1e-2", "tune.space.lora.lr.high=1e-3"])
    assert err.value.code == 2
    assert "tune.space.lora.lr: expected low < high" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["budget=smoke", "search=optuna", "tune.pruner=hyperband"])
    assert "tune.pruner='hyperband' is unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["budget=smoke", "search=optuna", "tune.search_seed=42"])  # smoke's seed
    assert "the final runs' seeds must not be the search's" in capsys.readouterr().err


def test_budget_cpu_trials_cut_their_pass_into_four_validated_parts(tmp_path):
    """budget=cpu trains one pass: its trials are four quarter-passes, each scored on the selection
    split alone, so the pruner can stop a trial after a quarter; other budgets' trials are plain runs."""
    overrides = ["adapter=lora", "optim.adapter_lr=0.001", "seed=4"]
    cut = search.trial_config("cpu", [], tmp_path, overrides)
    assert (cut.data.epoch_parts, cut.trainer.max_epochs, cut.data.train_eval) == (4, 4, 0)
    assert cut.data.limit_train == 5000 and cut.predict is False and cut.optim.adapter_lr == 0.001
    assert cut.output_dir == str(tmp_path / search.STUDY / search.run_name(overrides))
    plain = search.trial_config("smoke", [], tmp_path, overrides)
    smoke = compose(["budget=smoke"])
    assert plain.data.epoch_parts == 1 and plain.trainer.max_epochs == smoke.trainer.max_epochs
    assert plain.data.train_eval == smoke.data.train_eval
    doubled = search.trial_config("smoke", ["tune.epoch_parts=2"], tmp_path, overrides)
    assert doubled.trainer.max_epochs == 2 * smoke.trainer.max_epochs
    with pytest.raises(ConfigError, match="tune.epoch_parts must be a whole number >= 1, got 0"):
        search.trial_config("smoke", ["tune.epoch_parts=0"], tmp_path, overrides)
    with pytest.raises(ConfigError, match="tune.pruner_startup must be a whole number >= 1, got 0"):
        search.pruner("median", 0)


def test_every_part_of_a_pass_is_validated_when_the_parts_differ_in_length(tiny_model_dir, tmp_path):
    """A pass of 7 steps in 3 Lightning epochs: parts of 3, 2 and 2 steps, each one validated and in
    the record (Lightning checks for validation by the length it measured when it built the loader:
    a part shorter than the first would end unvalidated, and the pruner would see one score a pass)."""
    from conftest import tiny_overrides

    from peft_lightning.config import compose as compose_run
    from peft_lightning.train import train

    data = make_data_dir(tmp_path / "data", n_train=64)  # 56 rows trained on, batch 8: 7 steps a pass
    extra = ("adapter=lora", "adapter.rank=2", "data.selection=8", "data.limit_train=56", "data.batch_size=8")
    extra += ("data.epoch_parts=3", "trainer.max_epochs=6", "data.train_eval=0", "predict=false")
    res = train(compose_run(tiny_overrides(tiny_model_dir, data, tmp_path / "run", *extra)))
    assert res["status"] == "complete" and res["steps"] == 14  # two passes
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in res["history"]] == [3, 5, 7, 10, 12, 14]
    assert all(h["select_avg"] is not None for h in res["history"])


@pytest.mark.slow
def test_a_search_killed_9_resumes_prunes_losing_trials_and_retrains_the_best(tiny_model_dir, tmp_path, capsys):
    """6 trials of one pass cut into three validated parts, half of the range training nothing: kill
    -9 part-way through the second trial, run the same command again; no trial lost or duplicated,
    losing trials pruned after a part, the best retrained."""
    from optuna.trial import TrialState

    from peft_lightning.tune import main

    # 400 rows trained on: 100 steps a pass, parts of 34, 33 and 33 (a pass the parts do not divide)
    data = make_data_dir(tmp_path / "data", n_train=432)
    args = tune_args(
        tiny_model_dir,
        data,
        tmp_path,
        "tune.trials=6",
        "tune.sampler_seed=0",
        "data.limit_train=400",
        "trainer.max_epochs=1",
        "tune.epoch_parts=3",
    )
    cmd = [sys.executable, "-m", "peft_lightning.tune", *args]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    root = tmp_path / "multirun"
    folder, deadline = root / "tune_optuna", time.time() + 300
    try:  # kill -9 once the second trial is part-way (its first epoch recorded)
        while time.time() < deadline and proc.poll() is None:
            states = [
                json.loads(p.read_text()).get("status") for p in folder.glob("*/results.json") if p.stat().st_size
            ]
            if states.count("complete") == 1 and "running" in states:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    cut = [t for t in trials(root) if t.state == TrialState.RUNNING]
    assert len(cut) == 1
    main(args)  # the same command again (in this process)
    out = capsys.readouterr().out
    found = trials(root)
    finished = [t for t in found if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in found if t.state == TrialState.FAIL]
    assert len(finished) == 6 and [t.number for t in failed] == [cut[0].number]  # the cut trial, once
    again = [t for t in finished if t.user_attrs.get("rerun_of") == cut[0].number]
    assert len(again) == 1 and again[0].params == cut[0].params  # asked again: its folder resumed
    res = json.loads((folder / again[0].user_attrs["run"] / "results.json").read_text())
    assert [h["epoch"] for h in res["history"]] == list(range(1, len(res["history"]) + 1))
    assert sorted(again[0].intermediate_values) == list(range(len(res["history"])))  # its whole curve
    # losing trials pruned: stopped early, below the best, each an ordinary run folder that says so
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    assert pruned and len(complete) >= 2
    best = max(complete, key=lambda t: t.value)
    for t in pruned:
        assert len(t.intermediate_values) < 3 and max(t.intermediate_values.values()) < best.value
        res = json.loads((folder / t.user_attrs["run"] / "results.json").read_text())
        assert res["status"] == "pruned" and "pruner" in res["error"]
    for t in complete:  # the trial's value is its run's chosen part on the selection split
        res = json.loads((folder / t.user_attrs["run"] / "results.json").read_text())
        assert res["status"] == "complete" and res["seed"] == 2  # one past budget.seeds: not a final run's seed
        assert res["best"]["select_avg"] == pytest.approx(t.value) and "test" not in json.dumps(res.get("predictions"))
        assert res["config"]["data"]["epoch_parts"] == 3 and len(res["history"]) == 3  # one pass, three parts
        assert [h["step"] for h in res["history"]] == [34, 67, 100] and "train_eval" not in res["history"][0]
    # the chosen configuration is the best complete trial's, retrained over the budget's seeds
    chosen = json.loads((root / "tuned" / "tuned_optuna.json").read_text())["strategies"]["frozen"]
    assert chosen["best"]["trial"] == best.number and chosen["overrides"] == [f"optim.head_lr={best.params['lr']:.3g}"]
    final = [json.loads(p.read_text()) for p in (root / "tuned").rglob("results.json")]
    assert len(final) == 1 and final[0]["seed"] == 1 and final[0]["status"] == "complete"
    assert final[0]["lr"]["head_lr"] == float(f"{best.params['lr']:.3g}")
    assert final[0]["config"]["data"]["epoch_parts"] == 1 and final[0]["history"][-1]["step"] == 100  # one whole pass
    assert f"frozen: trial {best.number} " in out and f"{len(pruned)} pruned, 1 failed of 7 trials" in out
    # the report's search section: the best configuration, the pruned count, every trial as numbers
    report = (root / "report" / "report.md").read_text()
    assert "Optuna search (`peft-tune search=optuna`" in report and f"{len(pruned)} pruned" in report
    with open(root / "report" / "search_trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and [r["state"] for r in rows].count("pruned") == len(pruned)  # and the failed one
    assert "pruned on the selection split's avg after each third-epoch (`tune.epoch_parts=3`)" in report
    for r in rows:  # numbers: a complete trial's score and one pass, a pruned one's last score and a part or two
        if r["state"] == "complete":
            assert float(r["select_avg"]) > 0 and float(r["passes"]) == 1
        if r["state"] == "pruned":
            assert r["select_avg"] == "" and float(r["last_reported"]) >= 0 and float(r["passes"]) < 1
    assert (root / "report" / "search.png").is_file()


@pytest.mark.slow
def test_two_workers_on_one_journal_never_run_the_same_trial(tiny_model_dir, tmp_path):
    from optuna.trial import TrialState

    from peft_lightning.tune import main

    data = make_data_dir(tmp_path / "data", n_train=96)
    args = tune_args(
        tiny_model_dir,
        data,
        tmp_path,
        "tune.trials=4",
        "tune.workers=2",
        "tune.pruner=none",
        "trainer.max_epochs=1",
        "hydra/launcher=gpus",
        "hydra.launcher.n_jobs=2",
    )
    main([*args, "tune.final=false"])  # the search alone: the kill test above retrains
    found = trials(tmp_path / "multirun")
    finished = [t for t in found if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 4 and not [t for t in found if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert {t.user_attrs["worker"] for t in finished} == {0, 1}  # both worked
    runs = [t.user_attrs["run"] for t in finished]
    assert len(set(runs)) == len(runs)  # no two trials in one run folder (each run trained once)
    for name in runs:
        res = json.loads((tmp_path / "multirun" / "tune_optuna" / name / "results.json").read_text())
        epochs = [h["epoch"] for h in res["history"]]
        assert res["status"] in ("complete", "pruned") and epochs == list(range(1, len(epochs) + 1))
