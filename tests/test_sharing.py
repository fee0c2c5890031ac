"""Studies share runs: a job with a complete run's training config is taken from it, trained once."""

import json

import lightning as L
import pytest
import torch
from conftest import compose, tiny_overrides

from peft_lightning import load_run
from peft_lightning.plan import Costs, Job, describe, share_within
from peft_lightning.report import build_report
from peft_lightning.results import machine_label
from peft_lightning.sharing import covers, training_identity
from peft_lightning.train import train


def job(tiny_model_dir, data_dir, root, study, name, *extra):
    args = tiny_overrides(tiny_model_dir, data_dir, root / study / name, "adapter=lora", "adapter.rank=2", *extra)
    return train(compose([*args, f"study={study}", f"sweep_root={root}", f"data.cache_dir={root.parent / 'cache'}"]))


def test_a_job_with_another_studys_training_config_is_taken_not_retrained(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    root = tmp_path / "multirun"
    fits = []
    real_fit = L.Trainer.fit
    monkeypatch.setattr(L.Trainer, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    first = job(tiny_model_dir, data_dir, root, "main", "lora")
    taken = job(tiny_model_dir, data_dir, root, "lora_rank", "rank2")
    assert len(fits) == 1  # trained once
    shared = root / "lora_rank" / "rank2"
    assert taken["status"] == "complete" and taken["shared_from"] == "main/lora"
    assert taken["study"] == "lora_rank" and taken["run_name"] == "rank2"
    assert taken["best"] == first["best"] and taken["history"] == first["history"]
    on_disk = json.loads((shared / "results.json").read_text())
    assert on_disk["shared_from"] == "main/lora" and on_disk["config"]["study"] == "lora_rank"
    for path in sorted((root / "main" / "lora" / "predictions").glob("*.tsv")):
        assert (shared / "predictions" / path.name).read_bytes() == path.read_bytes()
    assert not (shared / "checkpoints").exists()  # they stay in the source; load_run follows the reference
    mine, theirs = load_run(shared), load_run(root / "main" / "lora")
    for (k, a), (_, b) in zip(mine.model.state_dict().items(), theirs.model.state_dict().items()):
        assert torch.equal(a, b), k
    # both studies report it; the cost table counts it once
    text = build_report(root).read_text()
    assert "## Main comparison" in text and "## LoRA rank" in text
    assert "1 trained, 1 more taken from another study's run with the same training config" in text
    # another seed is another run; force=true trains a shared job anew
    job(tiny_model_dir, data_dir, root, "lora_rank", "rank2-seed7", "seed=7")
    assert len(fits) == 2
    forced = job(tiny_model_dir, data_dir, root, "lora_rank", "rank2", "force=true")
    assert len(fits) == 3 and "shared_from" not in forced


def test_training_identity_leaves_out_what_does_not_change_a_run(tiny_model_dir, data_dir, tmp_path):
    from omegaconf import OmegaConf

    def ident(*extra):
        cfg = compose(tiny_overrides(tiny_model_dir, data_dir, tmp_path, *extra))
        return training_identity(OmegaConf.to_container(cfg, resolve=True))

    base = ident()
    assert ident("study=other", "checkpoints=none", "feature_cache=false", "logger=none") == base
    assert ident("data.cache_dir=/elsewhere", "trainer.enable_progress_bar=true") == base
    for changed in ("seed=3", "adapter.rank=4", "trainer.max_epochs=2", "predict=false", "data.score_dev=every_epoch"):
        assert ident(changed) != base, changed
    # peft-tune's final run at the lr a budget already gives the strategy is that run (tuned_lr folded in)
    assert ident("optim.tuned_lr=3e-4") == ident("optim.adapter_lr=3e-4") != base
    assert ident("adapter=full", "optim.tuned_lr=3e-5") == ident("adapter=full", "optim.lr=3e-5")
    assert ident("adapter=frozen", "optim.tuned_lr=3e-4") == ident("adapter=frozen", "optim.head_lr=3e-4")
    assert ident("adapter=full", "optim.tuned_lr=3e-5") != ident("adapter=full", "optim.adapter_lr=3e-5")
    # a run from before mtl, optim.loraplus_ratio and data.epoch_parts existed is the same run as one at their defaults
    old = compose(tiny_overrides(tiny_model_dir, data_dir, tmp_path))
    old = OmegaConf.to_container(old, resolve=True)
    del old["mtl"], old["optim"]["loraplus_ratio"], old["data"]["epoch_parts"]
    assert training_identity(old) == base
    assert ident("mtl=upgrad") != base and ident("optim.loraplus_ratio=4") != base
    assert ident("data.epoch_parts=2") != base


def test_a_run_with_test_predictions_covers_a_job_that_asks_for_none(tiny_model_dir, data_dir, tmp_path):
    from omegaconf import OmegaConf

    def config(*extra):
        return OmegaConf.to_container(compose(tiny_overrides(tiny_model_dir, data_dir, tmp_path, *extra)), resolve=True)

    studys, search = config("predict=true"), config("predict=false", "study=tune_lr", "optim.tuned_lr=5e-4")
    assert config()["optim"]["adapter_lr"] == 5e-4  # the search's lr is the study's: the same run
    assert covers(studys, search) and not covers(search, studys)  # the search run has no test predictions
    assert not covers(studys, config("predict=false", "optim.tuned_lr=1e-3"))
    jobs = [
        Job("main", [], tmp_path / "a", "lora", 1, config=studys),
        Job("tune_lr", [], tmp_path / "b", "lora", 1, config=search),
    ]
    assert [j.state for j in share_within(jobs)] == ["to run", "shared"]
    jobs = [
        Job("tune_lr", [], tmp_path / "b", "lora", 1, config=search),
        Job("main", [], tmp_path / "a", "lora", 1, config=studys),
    ]
    assert [j.state for j in share_within(jobs)] == ["to run", "to run"]


def test_the_plan_shares_a_later_job_with_an_earlier_one_and_counts_every_job(tmp_path):
    config = {"seed": 1, "adapter": {"rank": 8}, "study": "main"}
    jobs = [
        Job("main", [], tmp_path / "main" / "adapter=lora", "lora", 3, config=dict(config)),
        Job("lora_rank", [], tmp_path / "lora_rank" / "adapter.rank=8", "lora", 3, config={**config, "study": "x"}),
        Job("lora_rank", [], tmp_path / "lora_rank" / "adapter.rank=4", "lora", 3, config={**config, "adapter": {}}),
    ]
    share_within(jobs)
    assert [j.state for j in jobs] == ["to run", "shared", "to run"] and jobs[1].source == jobs[0].run_dir
    text = describe(jobs, Costs([]))
    assert "3 jobs: 1 shared, 2 to run" in text and "with no measured run of their strategy" in text


@pytest.mark.parametrize("epochs", [1, 3])
def test_the_estimate_scales_the_measured_cost_of_a_strategy_with_epochs(tmp_path, epochs):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    timing = {"startup": 5.0, "train": 20.0, "validation": 4.0, "checkpoint": 0.0, "predict": 3.0, "write": 0.0}
    res = {"status": "complete", "adapter": {"name": "lora"}, "history": [{}, {}], "wall_time_s": 33.0}
    (run / "results.json").write_text(json.dumps({**res, "timing": timing, "config": {}}))
    costs = Costs([tmp_path / "runs"])
    est = costs.estimate(Job("main", [], tmp_path / "x", "lora", epochs))
    assert est == pytest.approx(9.0 + 12.0 * epochs)  # 24 s over 2 epochs, 9 s once
    assert costs.estimate(Job("main", [], tmp_path / "x", "full", epochs)) is None


def test_the_estimate_prices_jobs_from_this_machines_runs_where_it_has_any(tmp_path):
    """A VM that landed on a slower CPU: the plan prices from the runs measured on this machine,
    and says when it has only other machines' runs to go by."""
    intel = {"cpu": "Intel Xeon (family 6, model 143)", "cores": 2, "bf16": ["amx_bf16"], "gpu": None}
    amd = {"cpu": "AMD EPYC (family 25, model 17)", "cores": 2, "bf16": ["avx512_bf16"], "gpu": None}
    for i, (where, wall) in enumerate([(intel, 200.0), (intel, 210.0), (intel, 220.0), (amd, 300.0)]):
        run = tmp_path / "runs" / f"r{i}"
        run.mkdir(parents=True)
        res = {"status": "complete", "adapter": {"name": "lora"}, "history": [{}], "wall_time_s": wall}
        res |= {"timing": {"train": wall - 10, "validation": 0.0}, "config": {}, "machine": where}
        (run / "results.json").write_text(json.dumps(res))
    job = Job("main", [], tmp_path / "x", "lora", 1)
    assert Costs([tmp_path / "runs"], here=machine_label({"machine": amd})).estimate(job) == pytest.approx(300.0)
    assert Costs([tmp_path / "runs"], here=machine_label({"machine": intel})).estimate(job) == pytest.approx(210.0)
    elsewhere = Costs([tmp_path / "runs"], here="a GPU")
    assert elsewhere.estimate(job) == pytest.approx(215.0)  # every run's median, said to be others'
    assert "lora 3m25s/epoch + 0m10s (4 runs on other machines than this one)" in describe([job], elsewhere)


def test_a_job_is_priced_by_the_runs_of_its_own_adapter_settings(tmp_path):
    """lora_rank's jobs: r=2 and r=64 measured here are priced by their own runs, an unmeasured rank
    by LoRA's median, a rank measured only on another machine by this machine's LoRA runs; an Optuna
    trial's four validated parts are one pass over the data, not four epochs."""
    here = {"cpu": "AMD EPYC (family 25, model 17)", "cores": 2, "bf16": ["avx512_bf16"], "gpu": None}
    there = {**here, "cpu": "Intel Xeon (family 6, model 143)"}
    measured = [(2, here, 200.0, 1), (64, here, 300.0, 1), (32, there, 900.0, 1), (8, here, 260.0, 4)]
    for i, (rank, where, wall, parts) in enumerate(measured):
        run = tmp_path / "runs" / f"r{i}"
        run.mkdir(parents=True)
        config = {"adapter": {"rank": rank}, "data": {"epoch_parts": parts}}
        res = {"status": "complete", "adapter": {"name": "lora"}, "history": [{}] * parts, "wall_time_s": wall}
        res |= {"timing": {"train": wall - 10, "validation": 0.0}, "config": config, "machine": where}
        (run / "results.json").write_text(json.dumps(res))
    costs = Costs([tmp_path / "runs"], here=machine_label({"machine": here}))

    def job(rank: int) -> Job:
        return Job("lora_rank", [], tmp_path / "x", "lora", 1, config={"adapter": {"rank": rank}})

    assert costs.estimate(job(2)) == pytest.approx(200.0)
    assert costs.estimate(job(64)) == pytest.approx(300.0)
    assert costs.estimate(job(8)) == pytest.approx(260.0)  # the trial: 250 s of training over one pass
    assert costs.estimate(job(16)) == pytest.approx(260.0)  # this machine's LoRA median (200, 260, 300)
    assert costs.estimate(job(32)) == pytest.approx(260.0)  # measured only on the other machine
    assert costs.estimate(Job("lora_rank", [], tmp_path / "x", "lora", 3, config=job(2).config)) == pytest.approx(580.0)


def test_an_aggregated_job_is_priced_by_aggregated_runs_not_by_the_summed_loss(tmp_path):
    """LoRA under UPGrad steps about 1.8x LoRA under the summed loss: the plan prices an aggregated
    job by its own kind's runs, an unmeasured aggregator by the strategy's other aggregators, and a
    strategy measured only under the summed loss has no price for its aggregated jobs."""
    for i, (adapter, mtl, wall) in enumerate(
        [("lora", "sum", 200.0), ("lora", "upgrad", 560.0), ("lora", "pcgrad", 580.0)]
    ):
        run = tmp_path / "runs" / f"r{i}"
        run.mkdir(parents=True)
        res = {"status": "complete", "adapter": {"name": adapter}, "mtl": {"name": mtl}, "history": [{}]}
        res |= {"wall_time_s": wall, "timing": {"train": wall - 20, "validation": 0.0}, "config": {}}
        (run / "results.json").write_text(json.dumps(res))
    costs = Costs([tmp_path / "runs"])

    def job(adapter: str, mtl: str) -> Job:
        return Job("mtl_methods", [], tmp_path / "x", adapter, 1, config={"mtl": {"name": mtl}})

    assert costs.estimate(job("lora", "sum")) == pytest.approx(200.0)
    assert costs.estimate(job("lora", "upgrad")) == pytest.approx(560.0)
    assert costs.estimate(job("lora", "cagrad")) == pytest.approx(570.0)  # the median of upgrad's and pcgrad's
    assert costs.estimate(Job("main", [], tmp_path / "x", "lora", 1)) == pytest.approx(200.0)  # no mtl: the sum
    assert costs.estimate(job("full", "upgrad")) is None
    assert "lora+upgrad 9m00s/epoch + 0m20s (1 runs" in describe([job("lora", "upgrad")], costs)


def test_an_unknown_budget_stops_reproduce_and_tune_at_once(capsys):
    from peft_lightning.reproduce import main as reproduce
    from peft_lightning.tune import main as tune

    for main, prog in ((reproduce, "peft-reproduce"), (tune, "peft-tune")):
        with pytest.raises(SystemExit, match=rf"{prog}: budget='smoek' is unknown; budgets: cpu, paper, quick, smoke"):
            main(["budget=smoek", "plan=true"])
    with pytest.raises(SystemExit, match="plan='maybe': expected true or false"):
        reproduce(["budget=smoke", "plan=maybe"])
