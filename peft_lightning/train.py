"""`peft-train`: the Hydra app that trains one multi-task run (or a sweep with `-m`).

Wiring only: data module, backbone, adapter, module, trainer, loggers, then predictions from the
best checkpoint and `results.json`. Every run directory is named from its overrides, so the same
command finds its own earlier run: a complete run is skipped (`force=true` reruns it) and an
interrupted one resumes from `checkpoints/last.ckpt` (`ckpt_path=auto`, the default).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import uuid
from contextlib import ExitStack
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from peft_lightning import sweep
from peft_lightning.build import build
from peft_lightning.checks import whole
from peft_lightning.config import VERSION_BASE, conf_dir
from peft_lightning.dashboards import build_loggers, replay, set_summary, uses_wandb
from peft_lightning.data import DataError, MultiTaskDataModule
from peft_lightning.distributed import JobDDPStrategy, gather, watch_parent
from peft_lightning.fastpath.precision import cpu_has_native_bf16
from peft_lightning.features import FrozenFeatures
from peft_lightning.files import WriteError, atomic_write_text, describe_os_error
from peft_lightning.gpus import gpu_slot
from peft_lightning.interrupt import Interrupted, exit_interrupted, on_signals
from peft_lightning.module import DivergedError, MultiTaskModule, average, score_predictions
from peft_lightning.quiet import quiet
from peft_lightning.results import (
    Clock,
    ResultsWriter,
    best_epoch,
    checkpoint_step,
    collect_predictions,
    in_row_order,
    machine,
    read_results,
    selection_score,
    summary,
    write_predictions,
)
from peft_lightning.rundir import (
    AtomicCheckpointIO,
    RunDirError,
    RunDirUnavailable,
    RunLock,
    prepare_run_dir,
    process_rank,
    read_checkpoint_meta,
    remove_partial_files,
)
from peft_lightning.search import worker_job
from peft_lightning.sharing import config_differences, describe_differences, find_shared, source_dir, take_shared

log = logging.getLogger("peft_lightning")


def resolve_ckpt(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from, checked to be readable (see `rundir.read_checkpoint_meta`)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpt_path in (None, "null", "none"):
        return None
    if ckpt_path == "auto":
        path = last if last.is_file() else None
    elif ckpt_path == "last":
        if not last.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {last} does not exist")
        path = last
    else:
        path = Path(to_absolute_path(ckpt_path))
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file")
    if path is not None:
        read_checkpoint_meta(path)
    return None if path is None else str(path)


def check_trainer(trainer: DictConfig) -> None:
    """`trainer.*` holds options of Lightning's Trainer, and a GPU only where there is one: checked
    before the run folder is touched (Hydra's own hint `+trainer.max_epoch=1` would otherwise end in
    a TypeError from Trainer.__init__ after the data was read)."""
    import difflib
    import inspect

    options = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in trainer:
        if key not in options:
            near = difflib.get_close_matches(str(key), sorted(options), n=1)
            hint = f"; did you mean trainer.{near[0]}?" if near else ""
            raise ValueError(f"trainer.{key} is not an option of Lightning's Trainer{hint}")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator} (trainer=gpu_fast asks for it) but this machine has no CUDA device; "
            "use trainer=default, which runs on the CPU"
        )


def precision_for(cfg_precision: str, accelerator: str) -> str:
    """The Trainer's precision: `auto` is bf16-mixed on a GPU and 32-true on the CPU.

    bf16-mixed on the CPU (budget=cpu) is fast where the CPU multiplies bf16 natively (AMX or
    AVX512-BF16: oneDNN's bf16 GEMMs were ~12x its fp32 ones on this project's 2-core CPU, and a
    MiniLM LoRA run 1.8x faster end to end, docs/speed.md); elsewhere bf16 is emulated and slower
    than fp32, which is said once here.
    """
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cfg_precision == "auto":
        return "bf16-mixed" if gpu else "32-true"
    if str(cfg_precision).startswith("bf16") and not gpu and not cpu_has_native_bf16():
        log.warning(
            "trainer.precision=%s on a CPU without native bf16 (AMX or AVX512-BF16): bf16 is emulated here "
            "and slower than trainer.precision=32-true",
            cfg_precision,
        )
    return cfg_precision


def train(cfg: DictConfig, callbacks: list | None = None) -> dict:
    """Train, predict and write results for one configuration; returns results.json's content.
    `callbacks`: more Lightning callbacks (peft-tune's Optuna pruning: a run it stops is `pruned`).

    Before anything trains: the config's epochs are checked, the run directory is made and proven
    writable, and this process takes the directory's lock (rank 0 only under DDP; the other ranks
    run inside the same directory for the same job).
    """
    epochs = cfg.trainer.max_epochs
    whole("trainer.max_epochs", epochs, 1)
    check_trainer(cfg.trainer)
    t0 = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    watch_parent()  # a DDP child ends with its rank 0
    with ExitStack() as stack:
        if process_rank() == 0:
            prepare_run_dir(run_dir)
            stack.enter_context(RunLock(run_dir))
            for partial in remove_partial_files(run_dir):
                log.info("removed %s, left by a write that did not finish", partial)
        return _train(cfg, run_dir, t0, callbacks or [])


def _train(cfg: DictConfig, run_dir: Path, t0: float, callbacks: list) -> dict:
    previous = None if cfg.force else read_results(run_dir)
    if previous is not None:
        same_run_or_stop(cfg, run_dir, previous)
    if previous is not None and previous.get("status") == "complete":
        log.info("%s is complete; skipping (force=true reruns it)", run_dir)
        return finish_complete(cfg, run_dir, previous)
    if process_rank() == 0:
        save_hydra_files(run_dir)
    if not cfg.force and process_rank() == 0:  # another study's run with this training config
        config = OmegaConf.to_container(cfg, resolve=True)
        root = Path(to_absolute_path(str(cfg.sweep_root)))
        found = find_shared(config, run_dir, root)
        if found is not None:
            meta = {
                "run_name": cfg.get("run_name") or run_dir.name,
                "study": cfg.study,
                "overrides": list(cfg.get("overrides") or []),
                "config": config,
            }
            return take_shared(run_dir, root, *found, meta)
    L.seed_everything(whole("seed", cfg.seed), workers=True, verbose=False)
    backbone, dm, module = build(cfg)
    dm.setup()  # the data's errors before anything is written, and the selection split's size for results.json
    adapter = module.model.adapter
    run_name = cfg.get("run_name") or run_dir.name
    meta = {
        "run_name": run_name,
        "study": cfg.study,
        "adapter": adapter.describe(),
        "model": {"name": cfg.model.name, "source": cfg.model.source, "pooling": cfg.model.pooling},
        "schedule": cfg.data.schedule,
        "selection": dm.selection_record(),  # how the best epoch is chosen (dev is only scored, by default)
        "tasks": dm.task_names,
        "epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        "lr": module.optim.learning_rates(),  # what each parameter group trains at (optim.tuned_lr applied)
        "mtl": module.mtl.describe(),  # how the tasks' gradients combine (sum: the study's)
        "machine": machine(),  # where it trained: its times hold for that machine
        "overrides": list(cfg.get("overrides") or []),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    # force=true reruns from scratch: an old last.ckpt is not resumed (an explicit path still is)
    ckpt = None if cfg.force and cfg.ckpt_path == "auto" else resolve_ckpt(cfg.ckpt_path, run_dir)
    if uses_wandb(cfg):  # a resumed run goes on as the same wandb run
        previous = (read_results(run_dir) or {}).get("wandb_id") if ckpt else None
        meta["wandb_id"] = previous or uuid.uuid4().hex[:16]
    writer = ResultsWriter(run_dir, meta, t0=t0)
    if ckpt:
        writer.resumed_from = read_results(run_dir)
    checkpoints_kept(cfg)  # the option checked before anything trains
    ckpt_cb = ModelCheckpoint(  # best.ckpt: the trained weights of the best epoch, no optimizer state
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="select/avg" if dm.select_on == "selection" else "val/avg",  # dev is only scored
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
    )
    # last.ckpt: everything a resume needs (optimizer, schedule, loops), written each epoch
    last_cb = ModelCheckpoint(  # the latest epoch's, each epoch (save_last would wait for a top-k save)
        dirpath=run_dir / "checkpoints",
        filename="last",
        save_top_k=1,
        save_on_train_epoch_end=False,  # after validation, as best.ckpt: the epoch's record is in it
        enable_version_counter=False,
    )
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    tcfg["precision"] = precision_for(tcfg.get("precision", "auto"), tcfg.get("accelerator", "auto"))
    if tcfg.get("strategy") == "ddp":  # children run this job, not the command line (distributed.py)
        # one task a step (round_robin, ...) leaves the other heads without gradients
        tcfg["strategy"] = JobDDPStrategy(find_unused_parameters=cfg.data.schedule != "joint")
    tcfg.setdefault("use_distributed_sampler", False)  # the data module deals batches to ranks itself
    tcfg["log_every_n_steps"] = log_interval(tcfg.get("log_every_n_steps", 50), dm, cfg.trainer.max_epochs)
    if dm.epoch_parts > 1:
        # A pass that the parts do not divide gives parts a step apart. Lightning validates when
        # (batch + 1) % the length it took at the loader's last build == 0, so a part shorter than the
        # one it measured would end unvalidated (and unseen by Optuna's pruner): it builds the loader,
        # and takes its length, every epoch (the data module sets the epoch's part first).
        tcfg["reload_dataloaders_every_n_epochs"] = 1
    if ckpt:
        log.info("resuming from %s", ckpt)
    with ExitStack() as stack:
        if use_gpu_lock(cfg):
            gpu = stack.enter_context(gpu_slot(torch.cuda.device_count(), cfg.gpus.jobs_per_gpu, cfg.gpus.lock_dir))
            log.info("job pinned to GPU %d", gpu)
            tcfg.update(accelerator="gpu", devices=[gpu])
        cbs = (ckpt_cb, last_cb, *callbacks)
        return fit_and_predict(cfg, tcfg, module, dm, writer, cbs, run_dir, run_name, adapter.name, ckpt)


def same_run_or_stop(cfg: DictConfig, run_dir: Path, previous: dict) -> None:
    """A folder holding a complete run, or an unfinished one this command would resume, holds this
    command's training config, or the command stops (RunDirError) before anything there changes.
    Folders are named by the overrides less budget, data.dir, logger, ...: `budget=quick` after
    `budget=smoke` lands in the smoke run's folder, whose results are not this command's."""
    if "config" not in previous:
        return  # written before results.json kept the config: nothing to compare
    complete = previous.get("status") == "complete"
    resumes = cfg.ckpt_path in ("auto", "last") and (run_dir / "checkpoints" / "last.ckpt").is_file()
    if not (complete or resumes):
        return  # nothing to skip or resume: this command starts the folder over
    diffs = config_differences(previous["config"], OmegaConf.to_container(cfg, resolve=True))
    if diffs:
        what = "complete run" if complete else f"{previous.get('status', 'unfinished')} run this command would resume"
        raise RunDirError(
            f"{run_dir} holds a {what} of another training config ({describe_differences(diffs)}); "
            "its results are not this command's. force=true trains this config there, replacing that run; "
            "or give it a folder of its own: output_dir=... (peft-train), sweep_root=... or study=... (a sweep)"
        )


def save_hydra_files(run_dir: Path) -> None:
    """Hydra's record of the command (`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`), written
    here, once the folder's lock is held and its run is this command's (train.yaml sets
    `hydra.output_subdir: null`, so Hydra does not write them before the lock)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    root = HydraConfig.instance().cfg
    task = OmegaConf.masked_copy(root, [k for k in root if k != "hydra"])
    folder = run_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(task))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.masked_copy(root, ["hydra"])))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(root.hydra.overrides.task))


def finish_complete(cfg: DictConfig, run_dir: Path, res: dict) -> dict:
    """A complete run of this training config, and what this command asks of it that it lacks:
    test predictions (`predict=true` after `predict=false`) and a wandb run (`logger=wandb` added
    to a finished sweep). Neither trains again."""
    if process_rank() != 0:
        return res
    have_test = any(str(k).endswith("-test") for k in (res.get("predictions") or {}))
    ran_without = (res.get("config") or {}).get("predict") is False  # else its data has no test split
    if cfg.predict and not have_test and ran_without:
        res = predict_test(cfg, run_dir, res)
    if uses_wandb(cfg) and not res.get("wandb_id"):
        res = replay(cfg, run_dir, res)
    return res


def predict_test(cfg: DictConfig, run_dir: Path, res: dict) -> dict:
    """Test predictions of a complete run from its best.ckpt (the run trained with predict=false)."""
    best = source_dir(run_dir, res) / "checkpoints" / "best.ckpt"
    if not best.is_file():
        raise RunDirError(
            f"{run_dir} is complete without test predictions (it ran with predict=false) and keeps no "
            f"{best.relative_to(best.parent.parent.parent)} to predict with (checkpoints=none); "
            "force=true trains it again with them"
        )
    read_checkpoint_meta(best)
    L.seed_everything(whole("seed", cfg.seed), workers=True, verbose=False)
    _, dm, module = build(cfg)
    dm.setup()
    targets = dm.predict_targets(("test",))
    if not targets:
        return res
    log.info("%s is complete; predicting test from %s (it ran with predict=false)", run_dir, best.name)
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)),
        enable_model_summary=False,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=precision_for(cfg.trainer.get("precision", "auto"), cfg.trainer.accelerator),
    )
    outputs = trainer.predict(module, dataloaders=[dm.eval_dataloader(t, s) for t, s in targets], ckpt_path=str(best))
    if len(targets) == 1:
        outputs = [outputs]
    files = write_predictions(run_dir, dm, collect_predictions(dm, targets, outputs))
    res = {**res, "predictions": {**(res.get("predictions") or {}), **files}}
    res["config"] = {**res["config"], "predict": True}
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2, default=float))
    return res


def log_interval(most: int, dm: MultiTaskDataModule, epochs: int, points: int = 100) -> int:
    """How often the training losses are logged: `trainer.log_every_n_steps` at most, and often enough
    for about `points` points over the run (a 40-step run logs every step, not never)."""
    if not isinstance(most, int) or most < 1:
        return most
    try:
        steps = len(dm.sampler) * epochs  # the schedule's steps (not the loader: building it draws from its generator)
    except (AttributeError, TypeError):  # no schedule with a length: the configured interval
        return most
    return max(1, min(most, steps // points))


def use_gpu_lock(cfg: DictConfig) -> bool:
    """`gpus.lock=auto`: a GPU slot lock for the jobs of a sweep run by processes on this machine
    (joblib, or Hydra's basic launcher), which all see every GPU. SLURM and Ray give each job its
    own GPUs (CUDA_VISIBLE_DEVICES), where a lock on "GPU 0" would serialise jobs on different ones."""
    lock = cfg.gpus.lock
    if lock == "auto":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun:
            launcher = str(HydraConfig.get().launcher.get("_target_", ""))
            multirun = "joblib" in launcher or "basic" in launcher.lower()
        one_device = cfg.trainer.get("strategy", "auto") != "ddp" and cfg.trainer.devices in (1, "1")
        return bool(
            multirun and one_device and torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
        )
    return bool(lock)


def fit_and_predict(cfg, tcfg, module, dm, writer, checkpoint_cbs, run_dir, run_name, adapter_name, ckpt) -> dict:
    ckpt_cb = checkpoint_cbs[0]
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        logger=build_loggers(
            cfg, run_dir, run_name, adapter_name, checkpoint_step(ckpt) if ckpt else 0, writer.meta.get("wandb_id")
        )
        or False,
        callbacks=[*checkpoint_cbs, writer, *feature_callbacks(cfg, module, dm, writer.clock)],
        plugins=[AtomicCheckpointIO(writer.clock)],
        **tcfg,
    )
    try:
        trainer.fit(module, dm, ckpt_path=ckpt)
        if trainer.interrupted:
            raise KeyboardInterrupt
        extra = {}
        best = ckpt_cb.best_model_path or None
        extra.update(
            predict(
                trainer,
                module,
                dm,
                best,
                run_dir,
                writer.clock,
                test=cfg.predict,
                last=cfg.get("last_predictions", False),
            )
        )
        result = writer.write(trainer, module, status="complete", **extra)
        if trainer.is_global_zero:
            prune_checkpoints(run_dir, checkpoints_kept(cfg))
            set_summary(trainer.loggers, result)  # wandb: the best epoch's metrics, params, cost, files
    except (KeyboardInterrupt, Interrupted) as err:
        record_end(writer, trainer, module, "interrupted", str(err) or "interrupted")
        raise
    except Exception as err:
        if pruned(err):  # peft-tune's pruner stopped a losing trial: not a failure
            record_end(
                writer,
                trainer,
                module,
                "pruned",
                f"stopped by the search's pruner after epoch {trainer.current_epoch + 1}",
            )
        else:
            record_end(writer, trainer, module, "failed", describe_os_error(err))
        raise
    finally:
        if uses_wandb(cfg):
            import wandb

            wandb.finish()
    return result


def pruned(err: BaseException) -> bool:
    """Whether `err` is Optuna's TrialPruned (raised by its Lightning pruning callback)."""
    module = sys.modules.get("optuna")
    return module is not None and isinstance(err, module.TrialPruned)


def record_end(writer: ResultsWriter, trainer, module, status: str, error: str) -> None:
    """results.json says how the run ended; a failure to write it (a full disk) is logged, never
    raised over the error that ended the run."""
    try:
        writer.write(trainer, module, status=status, error=error)
    except Exception as failure:  # noqa: BLE001
        log.warning("could not record the run's end (%s) in %s: %s", status, writer.path, describe_os_error(failure))


def feature_callbacks(cfg: DictConfig, module: MultiTaskModule, dm: MultiTaskDataModule, clock: Clock) -> list:
    """A frozen encoder's vectors computed once and cached (`feature_cache=true`, the default)."""
    if not (module.model.adapter.freeze_encoder and cfg.get("feature_cache", True)):
        return []
    return [FrozenFeatures(dm.cache_dir / "features", clock, skip=() if cfg.predict else ("test",))]


CHECKPOINTS = {"best": ("best.ckpt",), "last": ("best.ckpt", "last.ckpt"), "none": ()}


def checkpoints_kept(cfg: DictConfig) -> str:
    keep = cfg.get("checkpoints", "best")
    if keep not in CHECKPOINTS:
        raise ValueError(f"checkpoints={keep!r} is unknown; expected one of {list(CHECKPOINTS)}")
    return keep


def prune_checkpoints(run_dir: Path, keep: str) -> list[str]:
    """Once a run is complete: remove the checkpoints `checkpoints=<keep>` does not keep (by default
    last.ckpt, the only file with optimizer state, needed to resume an unfinished run and nothing else)."""
    removed = []
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        if path.name not in CHECKPOINTS[keep]:
            path.unlink()
            removed.append(path.name)
    return removed


def predict(
    trainer: L.Trainer,
    module: MultiTaskModule,
    dm: MultiTaskDataModule,
    best: str | None,
    run_dir: Path,
    clock: Clock,
    test: bool = True,
    last: bool = False,
) -> dict:
    """Dev (and selection split, train_eval sample) and test predictions of the best checkpoint.

    The splits validation evaluated come from the best epoch's own pass when this process saw it
    (no extra pass). One predict pass covers the rest: dev when it is scored once, by the chosen
    weights (`data.score_dev=best`, whose scores then go into the best epoch's record), the
    evaluated splits after a resume that did not see the best epoch, and test with `predict=true`.
    Dev predictions are written even with `predict=false`, for the reports' paired bootstrap. With
    `last`, the last epoch's evaluated splits also go to `predictions/last/` (the epochs study).
    """

    def in_order(outputs: dict) -> dict[tuple[str, str], list]:
        return {
            (t, s): in_row_order(len(dm.split(t, s)), index, values, f"{t}-{s}")
            for (t, s), (index, values) in outputs.items()
        }

    written = {}
    if last and module.last_eval_predictions and trainer.is_global_zero:  # the last epoch's, for the epochs study
        with clock.part("write"):
            written = write_predictions(run_dir, dm, in_order(module.last_eval_predictions), "predictions/last")
    preds = {}
    evaluated = module.best_eval_predictions if best else None
    if evaluated is not None and set(dm.val_targets()) <= set(evaluated):
        preds = in_order({k: evaluated[k] for k in dm.val_targets()})
    targets = [k for k in dm.predict_targets(("dev", "select", "train_eval")) if k not in preds]
    targets += dm.predict_targets(("test",)) if test else []
    if targets:
        with clock.part("predict"):
            loaders = [dm.eval_dataloader(t, s) for t, s in targets]
            outputs = trainer.predict(module, dataloaders=loaders, ckpt_path=best)
            if len(targets) == 1:
                outputs = [outputs]  # one dataloader: Lightning returns its batches as a flat list
            per_rank = gather(outputs)  # DDP: each rank predicted its own batches
            merged = [[b for rank_outputs in per_rank for b in rank_outputs[k]] for k in range(len(targets))]
            preds.update(collect_predictions(dm, targets, merged))
    if not dm.dev_every_epoch:
        score_dev(trainer, module, dm, preds)
    if not preds:
        return {"predictions": written} if written else {}
    with clock.part("write"):
        files = write_predictions(run_dir, dm, preds) if trainer.is_global_zero else {}
    return {"predictions": {**written, **files}, "predicted_from": Path(best).name if best else "last weights"}


def score_dev(trainer: L.Trainer, module: MultiTaskModule, dm: MultiTaskDataModule, preds: dict) -> None:
    """Dev scored once, by the chosen weights: into the best epoch's record and the loggers."""
    chosen = best_epoch(module.history)
    dev = {t: score_predictions(t, preds[(t, "dev")], dm.split(t, "dev").labels) for t in dm.task_names}
    if chosen is None:
        return
    chosen["dev"], chosen["dev_avg"] = dev, average(dev)
    flat = {f"val/{t}/{m}": v for t, ms in dev.items() for m, v in ms.items()}
    flat["val/avg"] = chosen["dev_avg"]
    for logger in trainer.loggers if trainer.is_global_zero else []:
        logger.log_metrics(flat, step=trainer.global_step)
        logger.save()


def record_failure(cfg: DictConfig, err: BaseException, status: str = "failed") -> None:
    """Make sure results.json says the run failed (or was interrupted), with the error's first line
    (reports show it). A complete record is never turned into a failed one, and recording never
    raises: a full disk or a gone folder is logged, and the error that stopped the run is the one said."""
    if isinstance(err, RunDirError) or process_rank() != 0:
        return  # the run directory is another run's, or broken: leave what it holds as it is
    run_dir = Path(cfg.output_dir)
    try:
        res = read_results(run_dir) or {"run_name": run_dir.name, "study": cfg.get("study"), "history": []}
        if res.get("status") in ("failed", "interrupted") or (res.get("status") == "complete" and not cfg.force):
            return  # a complete run stays complete when the work this command adds to it fails
        first = str(err).splitlines()[0] if str(err) else ""
        res.update(status=status, error=first if isinstance(err, Interrupted) else f"{type(err).__name__}: {first}")
        res.setdefault("overrides", list(cfg.get("overrides") or []))
        atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2, default=float))
    except Exception as failure:  # noqa: BLE001 - recording must not hide the run's own error
        log.warning(
            "could not record the run's %s in %s: %s", status, run_dir / "results.json", describe_os_error(failure)
        )


def rank_note() -> str:
    rank = process_rank()
    return f" on rank {rank}" if rank else ""


@hydra.main(version_base=VERSION_BASE, config_path=conf_dir(), config_name="train")
def run(cfg: DictConfig) -> float | None:
    """The Hydra task: one run (a job of a sweep with `-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    quiet()
    if cfg.get("tune", {}).get("worker") is not None:  # a worker of peft-tune's parallel Optuna search
        worker_job(cfg, train)
        return None
    try:
        result = train(cfg)
    except Interrupted as err:  # recorded; the sweep stops here too, and main exits 143 / 130
        record_failure(cfg, err, status="interrupted")
        log.error("run interrupted%s: %s (the same command resumes it)", rank_note(), err)
        raise
    except Exception as err:
        record_failure(cfg, err)
        known = isinstance(err, (DataError, ValueError, FileNotFoundError, DivergedError, WriteError))
        if known and process_rank() != 0:  # the same config or data error stops rank 0, which says it
            sys.exit(2)
        where = Path(cfg.output_dir) / "results.json"
        if isinstance(err, RunDirUnavailable):
            detach_run_log(Path(cfg.output_dir))  # another command's folder, or none: write nothing there
        kept = f"\n  results: {where}" if where.is_file() and not isinstance(err, RunDirError) else ""
        what = str(err) if isinstance(err, WriteError) else f"{type(err).__name__}: {err}"
        log.error("run failed%s: %s%s", rank_note(), what, kept)
        if multirun:  # one failed job must not stop the sweep; results.json records it
            log.debug(traceback.format_exc())
            return None
        if known and not cfg.get("raise_errors"):
            sys.exit(1 if isinstance(err, (DivergedError, WriteError)) else 2)
        raise
    if process_rank() == 0 and result:
        log.info("%s", summary(result, cfg.output_dir))
    best = (result or {}).get("best") or {}
    return selection_score(best)  # what a Hydra sweeper optimises: the selection split's score, not dev's


def detach_run_log(run_dir: Path) -> None:
    """Stop logging into `run_dir/train.log` (opened at its first line: nothing was written yet)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name and Path(name).resolve().parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()


def main() -> None:
    """`peft-train`: the Hydra task with SIGTERM / SIGINT recorded as `interrupted` (exit 143 / 130)
    and a sweep's tally: exit 1 unless every job of a `-m` sweep is complete."""
    sweep.last_tally = None
    with on_signals():
        try:
            run()
        except Interrupted as err:
            exit_interrupted(err, "peft-train")
    if sweep.last_tally is not None and sweep.last_tally["complete"] < sweep.last_tally["total"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
