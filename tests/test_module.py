"""The LightningModule and whole runs on the tiny model: heads, fast_dev_run, checkpoints,
resume, results.json and predictions."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose, tiny_overrides

from peft_lightning.adapters import IA3, DoRA, Full, LoRA, Prefix
from peft_lightning.backbone import load_backbone
from peft_lightning.data import MultiTaskDataModule
from peft_lightning.heads import build_heads
from peft_lightning.model import MultiTaskModel
from peft_lightning.module import MultiTaskModule
from peft_lightning.optim import Optim
from peft_lightning.tasks import TASKS, get_tasks
from peft_lightning.train import train

ADAPTERS = ["frozen", "full", "lora", "prefix", "ia3", "dora"]


def test_head_shapes():
    heads = build_heads(get_tasks(None), hidden=16)
    u, v = torch.randn(5, 16), torch.randn(5, 16)
    assert heads["sst5"]([u]).shape == (5, 5)
    assert heads["qqp"]([u, v]).shape == (5, 2)
    assert heads["stsb"]([u, v]).shape == (5,)
    lin = [m for m in heads["sst5"].modules() if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in lin] == [16, 16]  # 2-layer MLP on the pooled vector
    lin = [m for m in heads["qqp"].modules() if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in lin] == [32, 16, 16]  # 3-layer MLP on [u; v]
    sb = build_heads(get_tasks(["qqp"]), hidden=16, pair_features="sbert")
    assert sb["qqp"]([u, v]).shape == (5, 2) and sb["qqp"].net[0].in_features == 64  # [u; v; |u-v|; u*v]
    cross = build_heads(get_tasks(["qqp"]), hidden=16, pair_encoding="cross")
    assert cross["qqp"]([u]).shape == (5, 2)
    cos = build_heads(get_tasks(["stsb"]), hidden=16, sts_head="cosine")
    assert torch.allclose(cos["stsb"]([u, u]), torch.full((5,), 5.0), atol=1e-5)
    with pytest.raises(ValueError, match="cosine needs data.pair_encoding=separate"):
        build_heads(get_tasks(["stsb"]), hidden=16, pair_encoding="cross", sts_head="cosine")


def test_heads_run_in_fp32_under_mixed_precision(tiny_model_dir):
    """bf16 autocast: the encoder in bf16, the heads in fp32 (an STS score is not rounded to bf16)."""
    from peft_lightning.bench import make_batches

    torch.manual_seed(0)
    bb = load_backbone(str(tiny_model_dir), "mean")
    module = MultiTaskModel(bb.encoder, LoRA(rank=2), pooling="mean").eval()
    batch = make_batches(4, 16, bb.encoder.config.vocab_size, torch.device("cpu"), cls_id=bb.tokenizer.cls_token_id)
    passes = [enc for sub in batch.values() for enc in sub["inputs"]]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(batch)
        pooled = module.encode(passes)
    assert {t: o.dtype for t, o in out.items()} == {t: torch.float32 for t in ("sst5", "qqp", "stsb")}
    with torch.no_grad():
        want = module.heads["stsb"]([p.float() for p in pooled[3:5]])  # fp32 heads on the same vectors
    assert torch.equal(out["stsb"], want)
    assert not torch.equal(out["stsb"], out["stsb"].bfloat16().float())  # not bf16-rounded


def run(tiny_model_dir, data_dir, out, *extra):
    return train(compose(tiny_overrides(tiny_model_dir, data_dir, out, *extra)))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_fast_dev_run_per_strategy(tiny_model_dir, data_dir, tmp_path, adapter):
    res = run(tiny_model_dir, data_dir, tmp_path / adapter, f"adapter={adapter}", "+trainer.fast_dev_run=true")
    assert res["status"] == "complete" and res["steps"] == 1
    p = res["params"]
    assert p["with_heads"]["trainable"] - p["encoder"]["trainable"] == p["heads"] > 0
    if adapter == "frozen":
        assert p["encoder"]["trainable"] == 0
    if adapter == "full":
        assert p["encoder"]["trainable"] == p["encoder"]["total"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def test_run_writes_results_and_predictions(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    res = run(tiny_model_dir, data_dir, out, "adapter=lora", "adapter.rank=2", "trainer.max_epochs=2")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["status"] == "complete" and on_disk == json.loads(json.dumps(res, default=float))
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    # dev is scored once, by the chosen epoch's weights (data.score_dev=best): only its record has dev
    assert [("dev" in h) for h in res["history"]] == [h["epoch"] == res["best"]["epoch"] for h in res["history"]]
    for h in [res["best"]]:
        assert set(h["dev"]) == {"sst5", "qqp", "stsb"} == set(h["train"])
        assert set(h["dev"]["qqp"]) == {"acc", "f1"} and set(h["dev"]["stsb"]) == {"pearson", "spearman"}
        avg = (h["dev"]["sst5"]["acc"] + h["dev"]["qqp"]["acc"] + h["dev"]["stsb"]["pearson"]) / 3
        assert h["dev_avg"] == pytest.approx(avg)
    # the best epoch is chosen on the selection split (9 of each task's 48 training rows, held out), never on dev
    assert res["selection"]["on"] == "select" and res["selection"]["rows"] == {"sst5": 9, "qqp": 9, "stsb": 9}
    for h in res["history"]:
        assert set(h["select"]) == set(h["train_eval"]) == {"sst5", "qqp", "stsb"}
        avg = (h["select"]["sst5"]["acc"] + h["select"]["qqp"]["acc"] + h["select"]["stsb"]["pearson"]) / 3
        assert h["select_avg"] == pytest.approx(avg)
    assert res["best"]["select_avg"] == max(h["select_avg"] for h in res["history"])
    assert res["adapter"]["name"] == "lora" and res["adapter"]["rank"] == 2
    assert res["steps"] == 2 * 5 and res["step_time_ms"] > 0 and res["peak_memory_mb"] > 0  # 39 rows, batches of 8
    # steady step time leaves out the fit's first 10 (warm-up) steps: none of 10 steps count
    last = res["history"][-1]
    assert last["train_steps"] == 10 and last["steady_steps"] == 0
    for task in ("sst5", "qqp", "stsb"):  # the selection split and the train_eval sample, written like dev
        select = read_tsv(out / "predictions" / f"{task}-select.tsv")
        train_eval = read_tsv(out / "predictions" / f"{task}-train_eval.tsv")
        assert select[0] == train_eval[0] == ["id", "prediction", "label"]
        assert len(select) == 9 + 1 and len(train_eval) == 39 + 1
        assert not {r[0] for r in select[1:]} & {r[0] for r in train_eval[1:]}  # held out of training
    assert res["params"]["encoder"]["trainable"] == sum(2 * (i + o) for i, o in lora_shapes(res))
    for task, id_col in (("sst5", 0), ("qqp", 0), ("stsb", 0)):
        for split, n in (("dev", 16), ("test", 12)):
            rows = read_tsv(out / "predictions" / f"{task}-{split}.tsv")
            src = read_tsv(data_dir / task / f"{split}.tsv")
            # dev files carry the label beside the prediction (the reports' paired bootstrap)
            assert rows[0] == ["id", "prediction"] + (["label"] if split == "dev" else []) and len(rows) == n + 1
            assert [r[0] for r in rows[1:]] == [r[id_col] for r in src[1:]]
            if split == "dev":
                assert [float(r[2]) for r in rows[1:]] == [float(r[-1]) for r in src[1:]]
            if task == "stsb":
                float(rows[1][1])
            else:
                assert {int(r[1]) for r in rows[1:]} <= set(range(5 if task == "sst5" else 2))
    # a complete run keeps best.ckpt, trained weights only (no optimizer state): last.ckpt is removed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt"]
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora_" in k or k.startswith("heads.") for k in keys)  # only what trains
    assert ckpt["peft_lightning"]["identity"]["adapter"]["name"] == "lora"
    assert "optimizer_states" not in ckpt and "lr_schedulers" not in ckpt
    # where the time went: every part, and the rest, add up to the wall time
    timing = res["timing"]
    assert set(timing) == {"startup", "features", "train", "validation", "checkpoint", "predict", "write", "other"}
    assert timing["features"] == 0  # only a frozen encoder's
    assert timing["train"] == pytest.approx(res["train_time_s"], abs=1e-3)
    assert min(timing.values()) >= 0 and timing["startup"] > 0 and timing["validation"] > 0 and timing["predict"] > 0
    assert sum(timing.values()) == pytest.approx(res["wall_time_s"], abs=0.05)
    # where it trained (its times hold for that machine): the CPU and its cores, the GPU if any, torch
    where = res["machine"]
    assert where["cpu"] and where["cores"] >= 1 and where["torch"] == torch.__version__
    assert where["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert set(where["bf16"]) <= {"amx_bf16", "avx512_bf16"}


def test_dev_scored_once_equals_dev_scored_every_epoch(tiny_model_dir, data_dir, tmp_path):
    """data.score_dev=best scores dev once, by the chosen weights: the same scores and predictions as
    scoring it every epoch, with one dev pass instead of one an epoch."""
    common = ("adapter=lora", "adapter.rank=2", "trainer.max_epochs=3")
    once = run(tiny_model_dir, data_dir, tmp_path / "once", *common)
    every = run(tiny_model_dir, data_dir, tmp_path / "every", *common, "data.score_dev=every_epoch")
    assert all("dev" in h for h in every["history"]) and sum("dev" in h for h in once["history"]) == 1
    assert once["best"]["epoch"] == every["best"]["epoch"]
    assert once["best"]["dev_avg"] == pytest.approx(every["best"]["dev_avg"], abs=1e-6)
    for task in ("sst5", "qqp", "stsb"):
        for metric, value in every["best"]["dev"][task].items():
            assert once["best"]["dev"][task][metric] == pytest.approx(value, abs=1e-6)
        a = read_tsv(tmp_path / "once" / "predictions" / f"{task}-dev.tsv")
        b = read_tsv(tmp_path / "every" / "predictions" / f"{task}-dev.tsv")
        assert [r[0] for r in a] == [r[0] for r in b]
        assert [float(r[1]) for r in a[1:]] == pytest.approx([float(r[1]) for r in b[1:]], abs=1e-5)
    # the logged dev metrics: once, at the end, at the last step
    rows = [r for r in read_csv(tmp_path / "once" / "csv" / "metrics.csv") if r.get("val/avg")]
    assert len(rows) == 1 and float(rows[0]["val/avg"]) == pytest.approx(once["best"]["dev_avg"])


def test_checkpoints_option_keeps_what_it_says(tiny_model_dir, data_dir, tmp_path):
    for keep, files in (("last", ["best.ckpt", "last.ckpt"]), ("none", [])):
        out = tmp_path / keep
        res = run(tiny_model_dir, data_dir, out, "adapter=lora", "adapter.rank=2", f"checkpoints={keep}")
        assert res["status"] == "complete" and sorted(p.name for p in (out / "checkpoints").iterdir()) == files
        assert (out / "predictions" / "sst5-dev.tsv").is_file()
    last = torch.load(tmp_path / "last" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "optimizer_states" in last  # the file to train on
    with pytest.raises(ValueError, match="checkpoints='some' is unknown"):
        run(tiny_model_dir, data_dir, tmp_path / "bad", "checkpoints=some")


def lora_shapes(res):
    # tiny model: hidden 32, intermediate 64, 2 layers; pooling=cls so no pooler
    per_layer = [(32, 32)] * 4 + [(32, 64), (64, 32)]
    return per_layer * 2


def test_dev_predictions_match_best_checkpoint_metrics(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    res = run(tiny_model_dir, data_dir, out, "adapter=full", "trainer.max_epochs=2")
    rows = read_tsv(out / "predictions" / "sst5-dev.tsv")[1:]
    gold = {r[0]: int(r[2]) for r in read_tsv(data_dir / "sst5" / "dev.tsv")[1:]}
    acc = sum(int(p) == gold[i] for i, p, _ in rows) / len(rows)
    assert acc == pytest.approx(res["best"]["dev"]["sst5"]["acc"])


def test_rerun_skips_complete_and_resume_matches_uninterrupted(tiny_model_dir, data_dir, tmp_path, caplog):
    args = (
        "adapter=lora",
        "adapter.dropout=0.1",
        "optim.lr=1e-2",
        "trainer.deterministic=true",
        "data.select_on=dev",
        "checkpoints=last",  # the finished two-epoch run keeps last.ckpt, to train on
    )
    full = run(tiny_model_dir, data_dir, tmp_path / "a", *args, "trainer.max_epochs=3")
    # an interrupted run: two epochs done and checkpointed, then killed (results.json still 'running')
    out = tmp_path / "b"
    run(tiny_model_dir, data_dir, out, *args, "trainer.max_epochs=2")
    res = json.loads((out / "results.json").read_text())
    res["status"] = "running"
    res["config"]["trainer"]["max_epochs"] = 3  # as a 3-epoch run's record, killed after epoch 2
    (out / "results.json").write_text(json.dumps(res))
    caplog.set_level("INFO", logger="peft_lightning")
    resumed = run(tiny_model_dir, data_dir, out, *args, "trainer.max_epochs=3", "ckpt_path=last")
    assert any("resuming from" in r.message for r in caplog.records)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(full["history"], resumed["history"]):
        for part in ("dev", "train"):
            flat_a = {(t, m): v for t, ms in a[part].items() for m, v in ms.items()}
            flat_b = {(t, m): v for t, ms in b[part].items() for m, v in ms.items()}
            assert flat_a == pytest.approx(flat_b, abs=1e-6)

    # metrics.csv after the resume holds all three epochs, as the uninterrupted run's does
    def val_rows(run_dir):
        return [r for r in read_csv(run_dir / "csv" / "metrics.csv") if r["val/avg"]]

    ref, got = val_rows(tmp_path / "a"), val_rows(out)
    assert [float(r["epoch"]) for r in got] == [float(r["epoch"]) for r in ref] == [1, 2, 3]  # from 1, as results.json
    assert [float(r["val/avg"]) for r in got] == pytest.approx([float(r["val/avg"]) for r in ref], abs=1e-6)
    assert len(read_csv(out / "csv" / "metrics.csv")) == len(read_csv(tmp_path / "a" / "csv" / "metrics.csv"))
    # a complete run is not run again
    again = run(tiny_model_dir, data_dir, out, *args, "trainer.max_epochs=3")
    assert again == json.loads((out / "results.json").read_text())
    # force=true trains again from scratch (it does not resume the finished run's last.ckpt)
    caplog.set_level("INFO", logger="peft_lightning")
    caplog.clear()
    forced = run(tiny_model_dir, data_dir, out, *args, "trainer.max_epochs=3", "force=true")
    assert not any("resuming from" in r.message for r in caplog.records)
    assert [h["epoch"] for h in forced["history"]] == [1, 2, 3] and forced["steps"] == 18
    assert forced["history"][0]["dev"] == full["history"][0]["dev"]
    assert [float(r["epoch"]) for r in val_rows(out)] == [1, 2, 3]  # a fresh run's file, not appended to


def build(tiny_model_dir, adapter, seed=0, fuse=False):
    bb = load_backbone(str(tiny_model_dir), "cls", random_init=seed != 0, seed=seed)
    return MultiTaskModule(
        MultiTaskModel(bb.encoder, adapter, pooling="cls", identity=bb.identity, fuse_passes=fuse)
    ), bb


def test_checkpoint_of_another_adapter_or_backbone_is_refused(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    run(tiny_model_dir, data_dir, out, "adapter=lora", "trainer.max_epochs=1")
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)
    module, _ = build(tiny_model_dir, Prefix(2))
    with pytest.raises(ValueError, match="adapter: checkpoint has .*'lora'.*this run has .*'prefix'"):
        module.on_load_checkpoint(ckpt)
    module, _ = build(tiny_model_dir, LoRA(rank=4))
    with pytest.raises(ValueError, match="adapter: checkpoint has .*'rank': 8"):
        module.on_load_checkpoint(ckpt)
    other, _ = build(tiny_model_dir, LoRA(rank=8), seed=3)  # same shape, other weights
    with pytest.raises(ValueError, match="backbone: checkpoint has"):
        other.on_load_checkpoint(ckpt)
    same, _ = build(tiny_model_dir, LoRA(rank=8))
    same.on_load_checkpoint(ckpt)  # the matching module accepts it


def test_fused_passes_give_the_same_losses(tiny_model_dir, data_dir, tmp_path):
    plain, bb = build(tiny_model_dir, LoRA(rank=4))
    fused, _ = build(tiny_model_dir, LoRA(rank=4), fuse=True)
    fused.load_state_dict(plain.state_dict())
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    plain.eval(), fused.eval()
    a, b = plain(batch), fused(batch)
    for task in a:
        la = TASKS[task].loss(a[task], batch[task]["labels"])
        lb = TASKS[task].loss(b[task], batch[task]["labels"])
        assert torch.allclose(la, lb, atol=1e-5), task


def test_train_losses_are_logged_as_means_over_each_logging_interval(tiny_model_dir, data_dir, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    module, bb = build(tiny_model_dir, LoRA(rank=2))
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path, select_on="dev")
    steps: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="log"),
        log_every_n_steps=3,
        callbacks=[Record()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, dm)
    assert len(steps) == 6
    rows = [r for r in csv.DictReader(open(tmp_path / "log" / "version_0" / "metrics.csv")) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [2, 5]
    for r, window in zip(rows, (steps[:3], steps[3:])):
        assert float(r["train/loss"]) == pytest.approx(sum(window) / 3, rel=1e-5)
        assert float(r["train/sst5/loss"]) > 0 and float(r["train/stsb/loss"]) > 0


def test_bf16_mixed_lora_run_with_packed_casts(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """bf16-mixed on CPU: frozen weights stored in bf16 once, LoRA's A and B kept beside them (its
    Arena, built once) and written there once a step, through training, validation and prediction."""
    import peft_lightning.adapters.lora as lora

    calls, arenas = [], []
    real_cast, real_move = lora.cast_packed, lora.move_into_arena
    monkeypatch.setattr(
        lora, "cast_packed", lambda *a, **k: calls.append(torch.is_grad_enabled()) or real_cast(*a, **k)
    )
    monkeypatch.setattr(lora, "move_into_arena", lambda *a: arenas.append(1) or real_move(*a))
    out = tmp_path / "bf16"
    args = (
        "adapter=lora",
        "adapter.rank=2",
        "trainer.max_epochs=1",
        "trainer.precision=bf16-mixed",
        "data.select_on=dev",
    )
    res = run(tiny_model_dir, data_dir, out, *args, "model.fuse_passes=true")
    assert res["status"] == "complete" and res["steps"] == 6
    assert calls.count(True) == 6  # every training step writes the A and B the optimizer changed
    assert len(arenas) == 1
    assert all(0.0 <= res["history"][0]["dev"][t]["acc"] <= 1.0 for t in ("sst5", "qqp"))
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)
    lora_b = [v for k, v in ckpt["state_dict"].items() if k.endswith("lora_B")]
    assert lora_b and all(v.dtype == torch.float32 for v in lora_b)  # trainable weights stay fp32
    assert all(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: every one of them was trained
    assert len(read_tsv(out / "predictions" / "stsb-test.tsv")) == 13


def test_precision_auto_and_bf16_on_a_cpu_without_native_bf16(monkeypatch, caplog):
    """auto: 32-true on the CPU; bf16-mixed asked for on a CPU that emulates bf16 is kept, with a warning."""
    import peft_lightning.train as train_mod

    monkeypatch.setattr(train_mod.torch.cuda, "is_available", lambda: False)
    assert train_mod.precision_for("auto", "auto") == "32-true"
    assert train_mod.precision_for("auto", "gpu") == "bf16-mixed"
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)  # as train.py imported it
    with caplog.at_level("WARNING", logger="peft_lightning"):
        assert train_mod.precision_for("bf16-mixed", "cpu") == "bf16-mixed"
    assert not caplog.records
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="peft_lightning"):
        assert train_mod.precision_for("bf16-mixed", "cpu") == "bf16-mixed"
        assert train_mod.precision_for("32-true", "cpu") == "32-true"
    assert len(caplog.records) == 1 and "without native bf16" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_compile_mode_reaches_training(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """peft-train's model.compile reaches the encoder's compile call, in a run that completes (the
    compiled numerics: test_fastpath's same-losses tests; the eager backend keeps this one short)."""
    modes = []
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, mode=None: modes.append(mode) or compile_(self, backend="eager")
    )
    res = run(
        tiny_model_dir,
        data_dir,
        tmp_path / "ro",
        "adapter=lora",
        "model.compile=reduce-overhead",
        "data.pad_to_multiple_of=16",
        "+trainer.fast_dev_run=true",
    )
    assert res["status"] == "complete" and res["steps"] == 1 and modes == ["reduce-overhead"]


def test_unknown_compile_mode_is_a_config_error(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.compile='turbo' is unknown"):
        run(tiny_model_dir, data_dir, tmp_path / "bad", "adapter=lora", "model.compile=turbo", "raise_errors=true")


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lr=abc", r"optim.lr must be a number > 0, got 'abc'"),
        ("optim.head_lr=0", r"optim.head_lr must be a number > 0, got 0"),
        ("optim.weight_decay=-1", r"optim.weight_decay must be a number >= 0, got -1"),
        ("optim.warmup_ratio=2", r"optim.warmup_ratio must be a number >= 0 and < 1, got 2"),
        ("model.head_dropout=1.5", r"model.head_dropout must be a number >= 0 and < 1, got 1.5"),
        ("data.max_length=65", r"data.max_length=65 is more than the backbone's 64 positions"),
        ("data.max_length=abc", r"data.max_length must be a whole number >= 2, got 'abc'"),
        ("data.eval_batch_size=0", r"data.eval_batch_size must be a whole number >= 1, got 0"),
        ("data.limit_train=-5", r"data.limit_train must be a whole number >= 1, got -5"),
        ("seed=abc", r"seed must be a whole number >= 0, got 'abc'"),
    ],
)
def test_bad_numbers_are_config_errors_naming_the_option(tiny_model_dir, data_dir, tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        run(tiny_model_dir, data_dir, tmp_path / "bad", override, "raise_errors=true")
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before any training


@pytest.mark.parametrize(
    "make,adapter_names",
    [
        (lambda: LoRA(rank=2), {"lora_A", "lora_B"}),
        (lambda: IA3(), {"ia3_l"}),
        (lambda: DoRA(rank=2), {"lora_A", "lora_B", "magnitude"}),
        (lambda: Prefix(2, mlp=False), {"prefix"}),
        (lambda: Full(), set()),
    ],
    ids=["lora", "ia3", "dora", "prefix", "full"],
)
def test_adapter_parameters_get_the_adapter_lr(tiny_model_dir, make, adapter_names):
    bb = load_backbone(str(tiny_model_dir), "mean")
    module = MultiTaskModule(
        MultiTaskModel(bb.encoder, make(), pooling="mean"), Optim(lr=1e-5, adapter_lr=5e-4, head_lr=1e-3)
    )
    (encoder, lr), (adapter, adapter_lr), (heads, head_lr) = zip(module.model.parts(), module.optim.part_lrs())
    assert (lr, adapter_lr, head_lr) == (1e-5, 5e-4, 1e-3)
    assert {n.rsplit(".", 1)[-1] for n, _ in adapter} == adapter_names
    assert all(n.startswith("heads.") for n, _ in heads) and heads
    assert bool(encoder) == isinstance(module.adapter, Full)  # encoder weights train only in full fine-tuning
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert {n for part in (encoder, adapter, heads) for n, _ in part} == trainable
