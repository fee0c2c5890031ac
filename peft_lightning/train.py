"""`peft-train`: the Hydra app that trains one multi-task run (or a sweep with `-m`).

Wiring only: data module, backbone, adapter, module, trainer, loggers, then predictions from the
best checkpoint and `results.json`. Every run directory is named from its overrides, so the same
command finds its own earlier run: a complete run is skipped (`force=true` reruns it) and an
interrupted one resumes from `checkpoints/last.ckpt` (`ckpt_path=auto`, the default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import traceback
import uuid
from contextlib import ExitStack
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from peft_lightning.backbone import load_backbone
from peft_lightning.checks import whole
from peft_lightning.data import DataError, MultiTaskDataModule
from peft_lightning.distributed import JobDDPStrategy, gather, watch_parent
from peft_lightning.gpus import gpu_slot
from peft_lightning.module import MultiTaskModule
from peft_lightning.results import (
    ResultsWriter,
    ResumableCSVLogger,
    atomic_write_text,
    checkpoint_step,
    collect_predictions,
    in_row_order,
    is_complete,
    read_results,
    summary,
    write_predictions,
)
from peft_lightning.rundir import (
    AtomicCheckpointIO,
    RunDirError,
    RunLock,
    prepare_run_dir,
    process_rank,
    read_checkpoint_meta,
    remove_partial_files,
)

log = logging.getLogger("peft_lightning")


def conf_dir() -> str:
    """`conf/` of a source checkout, or the copy packaged inside the wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "train.yaml").is_file():
            return str(cand)
    raise FileNotFoundError(f"no conf/train.yaml next to {here}")


MAX_RUN_NAME = 200  # bytes; a file name may have 255


def _run_name(dirname: str) -> str:
    """A run folder's name: the job's overrides (`a=1,b=2`). Over 200 bytes it is cut after a whole
    override and ends in `sha1=<10 hex>` of the full name, so the same overrides name the same folder
    (and resume it) and no file system refuses it."""
    name = dirname.replace("/", "_") if dirname else "default"
    raw = name.encode()
    if len(raw) <= MAX_RUN_NAME:
        return name
    head = raw[: MAX_RUN_NAME - len(",sha1=") - 10].decode(errors="ignore")
    if "," in head:
        head = head.rsplit(",", 1)[0]
    return f"{head},sha1={hashlib.sha1(raw).hexdigest()[:10]}"


OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
OmegaConf.register_new_resolver("join", lambda xs: ",".join(str(x) for x in xs), replace=True)


def build_adapter(adapter_cfg: DictConfig):
    """Instantiate `adapter=...`; an unknown option or bad value becomes one clear ValueError."""
    import inspect

    from hydra.errors import InstantiationException
    from hydra.utils import get_class

    target = adapter_cfg.get("_target_")
    cls = get_class(target)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in adapter_cfg if k != "_target_" and k not in accepted]
    if unknown:
        raise ValueError(f"adapter.{unknown[0]} is not an option of {cls.__name__}; options are {accepted}")
    try:
        return instantiate(adapter_cfg, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(str(cause)) from err


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


def precision_for(cfg_precision: str, accelerator: str) -> str:
    if cfg_precision != "auto":
        return cfg_precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def build_loggers(
    cfg: DictConfig,
    run_dir: Path,
    run_name: str,
    adapter_name: str,
    resume_step: int = 0,
    wandb_id: str | None = None,
) -> list:
    kind = cfg.logger.get("kind", "csv")
    loggers: list = []
    if kind in ("csv", "wandb"):
        loggers.append(ResumableCSVLogger(resume_step=resume_step, save_dir=str(run_dir), name="csv", version=""))
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        if cfg.logger.mode == "auto":
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
            mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        else:
            mode = cfg.logger.mode
        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                entity=cfg.logger.get("entity"),
                group=cfg.logger.get("group") or cfg.study,
                job_type=cfg.logger.get("job_type") or adapter_name,
                name=run_name,
                id=wandb_id,
                resume="allow",  # the same id again (a resumed run) continues that wandb run
                save_dir=str(run_dir),
                offline=mode == "offline",
                mode=mode,
                tags=list(cfg.logger.get("tags") or []),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def train(cfg: DictConfig) -> dict:
    """Train, predict and write results for one configuration; returns results.json's content.

    Before anything trains: the config's epochs are checked, the run directory is made and proven
    writable, and this process takes the directory's lock (rank 0 only under DDP; the other ranks
    run inside the same directory for the same job).
    """
    epochs = cfg.trainer.max_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"trainer.max_epochs must be a whole number >= 1, got {epochs!r} (a run must train)")
    run_dir = Path(cfg.output_dir)
    watch_parent()  # a DDP child ends with its rank 0
    with ExitStack() as stack:
        if process_rank() == 0:
            prepare_run_dir(run_dir)
            stack.enter_context(RunLock(run_dir))
            for partial in remove_partial_files(run_dir):
                log.info("removed %s, left by a write that did not finish", partial)
        return _train(cfg, run_dir)


TUNED_ROLE = {"full": "lr", "frozen": "head_lr"}  # what optim.tuned_lr sets; every other strategy: adapter_lr


def learning_rates(cfg: DictConfig, strategy: str) -> dict:
    """lr, adapter_lr and head_lr of a run. `optim.tuned_lr` (the lr search of `peft-tune`) sets the
    one that moves the strategy's own parameters: the encoder's for full fine-tuning, the heads' for
    the frozen backbone, the adapter's for the others."""
    lrs = {"lr": cfg.optim.lr, "adapter_lr": cfg.optim.adapter_lr, "head_lr": cfg.optim.head_lr}
    tuned = cfg.optim.get("tuned_lr")
    if tuned is not None:
        lrs[TUNED_ROLE.get(strategy, "adapter_lr")] = tuned
    return lrs


def build(cfg: DictConfig) -> tuple:
    """The backbone, data module and module a run's (resolved) config describes, as `peft-train`
    builds them; `load_run` builds a finished run's the same way."""
    backbone = load_backbone(
        cfg.model.source,
        cfg.model.pooling,
        cfg.model.random_init,
        OmegaConf.to_container(cfg.model.config_overrides) if cfg.model.get("config_overrides") else None,
        cfg.seed,
    )
    positions = backbone.encoder.config.max_position_embeddings
    if isinstance(cfg.data.max_length, int) and cfg.data.max_length > positions:
        raise ValueError(f"data.max_length={cfg.data.max_length} is more than the backbone's {positions} positions")
    data_kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    data_dir = to_absolute_path(data_kwargs.pop("dir"))
    dm = MultiTaskDataModule(data_dir, backbone.tokenizer, seed=cfg.seed, **data_kwargs)
    adapter = build_adapter(cfg.adapter)
    lrs = learning_rates(cfg, adapter.name)
    module = MultiTaskModule(
        backbone.encoder,
        adapter,
        tasks=dm.task_names,
        pooling=cfg.model.pooling,
        pair_encoding=cfg.data.pair_encoding,
        sts_head=cfg.model.sts_head,
        head_dropout=cfg.model.head_dropout,
        pair_features=cfg.model.pair_features,
        **lrs,
        weight_decay=cfg.optim.weight_decay,
        lr_schedule=cfg.optim.lr_schedule,
        warmup_ratio=cfg.optim.warmup_ratio,
        seed=cfg.seed,
        fuse_passes=cfg.model.fuse_passes,
        compile=cfg.model.get("compile", False),
        identity=backbone.identity,
    )
    return backbone, dm, module


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    if not cfg.force and is_complete(run_dir):
        log.info("%s is complete; skipping (force=true reruns it)", run_dir)
        return read_results(run_dir)
    L.seed_everything(whole("seed", cfg.seed), workers=True, verbose=False)
    backbone, dm, module = build(cfg)
    adapter = module.adapter
    run_name = cfg.get("run_name") or run_dir.name
    meta = {
        "run_name": run_name,
        "study": cfg.study,
        "adapter": adapter.describe(),
        "model": {"name": cfg.model.name, "source": cfg.model.source, "pooling": cfg.model.pooling},
        "schedule": cfg.data.schedule,
        "tasks": dm.task_names,
        "epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        "lr": learning_rates(cfg, adapter.name),  # what each parameter group trains at (optim.tuned_lr applied)
        "overrides": list(cfg.get("overrides") or []),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    # force=true reruns from scratch: an old last.ckpt is not resumed (an explicit path still is)
    ckpt = None if cfg.force and cfg.ckpt_path == "auto" else resolve_ckpt(cfg.ckpt_path, run_dir)
    if cfg.logger.get("kind") == "wandb":  # a resumed run goes on as the same wandb run
        previous = (read_results(run_dir) or {}).get("wandb_id") if ckpt else None
        meta["wandb_id"] = previous or uuid.uuid4().hex[:16]
    writer = ResultsWriter(run_dir, meta)
    ckpt_cb = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/avg",
        mode="max",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    tcfg["precision"] = precision_for(tcfg.get("precision", "auto"), tcfg.get("accelerator", "auto"))
    if tcfg.get("strategy") == "ddp":  # children run this job, not the command line (distributed.py)
        # one task a step (round_robin, ...) leaves the other heads without gradients
        tcfg["strategy"] = JobDDPStrategy(find_unused_parameters=cfg.data.schedule != "joint")
    tcfg.setdefault("use_distributed_sampler", False)  # the data module deals batches to ranks itself
    if ckpt:
        log.info("resuming from %s", ckpt)
    with ExitStack() as stack:
        if use_gpu_lock(cfg):
            gpu = stack.enter_context(gpu_slot(torch.cuda.device_count(), cfg.gpus.jobs_per_gpu, cfg.gpus.lock_dir))
            log.info("job pinned to GPU %d", gpu)
            tcfg.update(accelerator="gpu", devices=[gpu])
        return fit_and_predict(cfg, tcfg, module, dm, writer, ckpt_cb, run_dir, run_name, adapter.name, ckpt)


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


def fit_and_predict(cfg, tcfg, module, dm, writer, ckpt_cb, run_dir, run_name, adapter_name, ckpt) -> dict:
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        logger=build_loggers(
            cfg, run_dir, run_name, adapter_name, checkpoint_step(ckpt) if ckpt else 0, writer.meta.get("wandb_id")
        )
        or False,
        callbacks=[ckpt_cb, writer],
        plugins=[AtomicCheckpointIO()],
        **tcfg,
    )
    try:
        trainer.fit(module, dm, ckpt_path=ckpt)
        if trainer.interrupted:
            raise KeyboardInterrupt
        extra = {}
        extra.update(predict(trainer, module, dm, ckpt_cb.best_model_path or None, run_dir, test=cfg.predict))
        result = writer.write(trainer, module, status="complete", **extra)
    except KeyboardInterrupt:
        writer.write(trainer, module, status="interrupted")
        raise
    except Exception as err:
        writer.write(
            trainer,
            module,
            status="failed",
            error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
        )
        raise
    finally:
        if cfg.logger.get("kind") == "wandb":
            import wandb

            wandb.finish()
    return result


def predict(
    trainer: L.Trainer,
    module: MultiTaskModule,
    dm: MultiTaskDataModule,
    best: str | None,
    run_dir: Path,
    test: bool = True,
) -> dict:
    """Dev and test predictions of the best checkpoint.

    Dev predictions come from the best epoch's own validation pass when this process saw it (no
    extra pass: they are written even with `predict=false`, for the reports' paired bootstrap);
    test (and dev after a resume that did not see the best epoch) take one predict pass, with
    `predict=true` only.
    """
    preds = {}
    dev = module.best_dev_predictions if best else None
    if dev is not None and set(dev) == set(dm.task_names):
        for task, (index, values) in dev.items():
            preds[(task, "dev")] = in_row_order(len(dm.split(task, "dev")), index, values, f"{task}-dev")
    if not test:
        if not preds:
            return {}
        return {
            "predictions": write_predictions(run_dir, dm, preds) if trainer.is_global_zero else {},
            "predicted_from": Path(best).name,
        }
    splits = ("test",) if preds else ("dev", "test")
    targets = dm.predict_targets(splits)
    outputs = trainer.predict(module, dataloaders=dm.predict_dataloader(splits), ckpt_path=best)
    if len(targets) == 1:
        outputs = [outputs]  # one dataloader: Lightning returns its batches as a flat list
    per_rank = gather(outputs)  # DDP: each rank predicted its own batches
    merged = [[b for rank_outputs in per_rank for b in rank_outputs[k]] for k in range(len(targets))]
    preds.update(collect_predictions(dm, targets, merged))
    return {
        "predictions": write_predictions(run_dir, dm, preds) if trainer.is_global_zero else {},
        "predicted_from": Path(best).name if best else "last weights",
    }


def record_failure(cfg: DictConfig, err: BaseException) -> None:
    """Make sure results.json says the run failed, with the error's first line (reports show it)."""
    if isinstance(err, RunDirError) or process_rank() != 0:
        return  # the run directory is another run's, or broken: leave what it holds as it is
    run_dir = Path(cfg.output_dir)
    res = read_results(run_dir) or {"run_name": run_dir.name, "study": cfg.get("study"), "history": []}
    if res.get("status") in ("failed", "interrupted"):
        return
    first = str(err).splitlines()[0] if str(err) else ""
    res.update(status="failed", error=f"{type(err).__name__}: {first}")
    res.setdefault("overrides", list(cfg.get("overrides") or []))
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2, default=float))


def rank_note() -> str:
    rank = process_rank()
    return f" on rank {rank}" if rank else ""


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = train(cfg)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        record_failure(cfg, err)
        known = isinstance(err, (DataError, ValueError, FileNotFoundError))
        if known and process_rank() != 0:  # the same config or data error stops rank 0, which says it
            sys.exit(2)
        where = Path(cfg.output_dir) / "results.json"
        kept = f"\n  results: {where}" if where.is_file() and not isinstance(err, RunDirError) else ""
        log.error("run failed%s: %s: %s%s", rank_note(), type(err).__name__, err, kept)
        if multirun:  # one failed job must not stop the sweep; results.json records it
            log.debug(traceback.format_exc())
            return None
        if known and not cfg.get("raise_errors"):
            sys.exit(2)
        raise
    if process_rank() == 0 and result:
        log.info("%s", summary(result, cfg.output_dir))
    best = (result or {}).get("best") or {}
    return best.get("dev_avg")


if __name__ == "__main__":
    main()
