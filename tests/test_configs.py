"""Every config in conf/ composes, and the CLI-level errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf

GROUPS = {
    g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml"))
    for g in ("data", "model", "adapter", "mtl", "trainer", "logger", "budget", "experiment")
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"output_dir={tmp_path}", "overrides=[]"]
    if group == "model" and option == "local":
        overrides.append("model.source=/some/folder")
    cfg = compose(overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.data.batch_size and cfg.model.source and cfg.trainer.max_epochs >= 1


def test_expected_options_exist():
    assert {"frozen", "full", "lora", "prefix", "ia3", "dora", "bitfit", "bottleneck", "bottleneck_pfeiffer"} <= set(
        GROUPS["adapter"]
    )
    assert {"sum", "upgrad", "pcgrad", "cagrad", "nashmtl", "mgda"} <= set(GROUPS["mtl"])
    assert {"paper", "quick", "smoke"} <= set(GROUPS["budget"])
    assert {
        "main",
        "epochs",
        "lora_rank",
        "prefix_length",
        "prefix_mlp",
        "lora_scaling",
        "lora_targets",
        "multitask_vs_single",
        "sts_head",
        "peft_methods",
        "mtl_methods",
    } <= set(GROUPS["experiment"])
    assert {"gpus", "slurm", "local"} <= {p.stem for p in (ROOT / "conf" / "hydra" / "launcher").glob("*.yaml")}


def test_defaults_are_the_studys():
    cfg = compose(["output_dir=/tmp/x", "overrides=[]"])
    assert cfg.data.batch_size == 8 and cfg.data.schedule == "joint" and cfg.data.pair_encoding == "separate"
    assert cfg.optim.lr == 1e-5 and cfg.adapter.rank == 8 and cfg.adapter.scaling == "fixed"
    paper = compose(["budget=paper", "output_dir=/tmp/x", "overrides=[]"])
    assert paper.model.name == "bert_base" and paper.model.pooling == "pooler" and paper.trainer.max_epochs == 25
    assert paper.optim.adapter_lr is None and paper.optim.head_lr is None  # every parameter at 1e-5, as the study


@pytest.mark.parametrize(
    "study,expected",
    [
        ("main", {"adapter": "frozen,full,lora,prefix"}),
        ("lora_rank", {"adapter.rank": "2,4,8,16,32,64"}),
        ("prefix_length", {"adapter.length": "1,2,4,8"}),
        ("prefix_mlp", {"adapter.mlp": "true,false", "adapter.length": "2,4,8"}),
        ("epochs", {"adapter": "full,lora,prefix"}),
        ("peft_methods", {"adapter": "frozen,full,lora,prefix,ia3,dora,bitfit,bottleneck,bottleneck_pfeiffer"}),
        ("mtl_methods", {"adapter": "lora,full", "mtl": "sum,upgrad,pcgrad,cagrad,nashmtl"}),
    ],
)
def test_experiments_hold_their_sweeps(study, expected):
    from hydra import compose as hc
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hc(config_name="train", overrides=[f"experiment={study}", "budget=quick"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    for k, v in expected.items():
        assert params[k] == v
    assert str(params["seed"]) in ("42", "${join:${budget.seeds}}")
    assert cfg.study == study and cfg.sweep_root == "multirun/quick"
    if study == "epochs":
        assert cfg.trainer.max_epochs == 4  # quick budget's long run: marks 1/2/3/4


def test_conf_dir_is_found():
    from peft_lightning.config import conf_dir

    assert Path(conf_dir()) == ROOT / "conf"


def test_run_folder_names_fit_a_file_system():
    from peft_lightning.config import MAX_RUN_NAME, _run_name

    assert _run_name("") == "default"
    assert _run_name("adapter=lora,model/x=1") == "adapter=lora,model_x=1"
    many = ",".join(f"data.option_{i}=value_{i}" for i in range(20))  # 20 overrides, ~420 bytes
    name = _run_name(many)
    assert len(name.encode()) <= MAX_RUN_NAME <= 255
    head, digest = name.rsplit(",sha1=", 1)
    assert many.startswith(head + ",") and len(digest) == 10  # cut after a whole override
    assert _run_name(many) == name  # the same overrides name the same folder: a rerun resumes it
    assert _run_name(many[:-1] + "X") != name  # the hash covers what was cut off
    wide = "model.note=" + "é" * 150  # 300 bytes in one override: cut on a character boundary
    assert len(_run_name(wide).encode()) <= MAX_RUN_NAME and _run_name(wide).startswith("model.note=é")


def test_budget_cpu_runs_main_over_five_seeds_and_the_other_studies_over_three():
    from peft_lightning.plan import job_overrides
    from peft_lightning.search import search_seed

    def seeds(study: str, *rest: str) -> list[int]:
        jobs = job_overrides(study, "cpu", list(rest))
        return sorted({int(o.split("=")[1]) for job in jobs for o in job if o.startswith("seed=")})

    assert seeds("main") == [1, 2, 3, 4, 5] and seeds("lora_rank") == [1, 2, 3] and seeds("epochs") == [1, 2, 3]
    assert seeds("main", "budget.main_seeds=null") == [1, 2, 3]
    assert seeds("main", "budget.seeds=[7]", "budget.main_seeds=null") == [7]
    # Optuna's trials train with a seed no report shows: past main's five too
    assert search_seed(compose(["budget=cpu"])) == 6 and search_seed(compose(["budget=smoke"])) == 43
