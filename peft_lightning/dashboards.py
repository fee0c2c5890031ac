"""What a run puts on a dashboard: its loggers (CSV, wandb), the names it logs under, and the summary.

- `build_loggers`: the CSV log and the `logger` group's `_target_` (wandb), with what only the run
  knows: its name, folder, id (a resumed run goes on as the same wandb run), config, a group that
  keeps studies and budgets apart (`<study>-<budget>`) and tags `budget:`, `model:`, `strategy:`,
  `study:`.
- `record_metrics`: a results.json epoch record under the names training logs (`val/sst5/acc`,
  `select/avg`, ..., `epoch` counted from 1 as everywhere else).
- `run_summary`: the wandb summary of a finished run: the best epoch's metrics (under the logged
  names, so a dashboard's table shows the epoch the run chose, not the last one), `best/epoch`,
  parameter counts, step times, peak memory, wall time and the prediction files.
- `replay`: a finished run's recorded epochs logged to a new wandb run, without training
  (`logger=wandb` added to a finished run, `peft-report --wandb`).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from peft_lightning.config import conf_dir
from peft_lightning.files import atomic_write_text
from peft_lightning.module import STAGE as EVAL_STAGE
from peft_lightning.results import ResumableCSVLogger, best_epoch

log = logging.getLogger("peft_lightning")

STAGE = {**EVAL_STAGE, "train": "train"}  # the prefixes training logs each split's metrics under
AVERAGES = {
    "dev_avg": "val/avg",
    "select_avg": "select/avg",
    "train_avg": "train/avg",
    "train_eval_avg": "train_eval/avg",
}


def uses_wandb(cfg: DictConfig) -> bool:
    return str(cfg.logger.get("_target_", "")).endswith("WandbLogger")


def tags(cfg: DictConfig, adapter_name: str) -> list[str]:
    budget = (cfg.get("budget") or {}).get("name", "adhoc")
    return [f"budget:{budget}", f"model:{cfg.model.name}", f"strategy:{adapter_name}", f"study:{cfg.study}"]


def build_loggers(
    cfg: DictConfig,
    run_dir: Path,
    run_name: str,
    adapter_name: str,
    resume_step: int = 0,
    wandb_id: str | None = None,
) -> list:
    """The run's loggers (see the module doc); `logger.csv: false` leaves out the CSV log."""
    options = OmegaConf.to_container(cfg.logger, resolve=True)
    loggers: list = []
    if options.pop("csv", True):
        loggers.append(ResumableCSVLogger(resume_step=resume_step, save_dir=str(run_dir), name="csv", version=""))
    target = options.pop("_target_", None)
    if target is None:
        return loggers
    if uses_wandb(cfg):
        budget = (cfg.get("budget") or {}).get("name", "adhoc")
        options.update(
            group=options.get("group") or f"{cfg.study}-{budget}",
            job_type=options.get("job_type") or adapter_name,
            name=run_name,
            id=wandb_id,
            resume="allow",
            save_dir=str(run_dir),
            offline=options.get("mode") == "offline",
            tags=[*tags(cfg, adapter_name), *(options.get("tags") or [])],
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    loggers.append(get_class(target)(**options))
    return loggers


def record_metrics(record: dict) -> dict[str, float]:
    """An epoch record of results.json under the names training logs them."""
    flat = {}
    for split, stage in STAGE.items():
        for task, metrics in (record.get(split) or {}).items():
            flat.update({f"{stage}/{task}/{m}": v for m, v in metrics.items()})
    flat.update({name: record[key] for key, name in AVERAGES.items() if record.get(key) is not None})
    flat = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and v == v}
    if record.get("epoch") is not None:
        flat["epoch"] = float(record["epoch"])
    return flat


def run_summary(res: dict) -> dict:
    """A finished run's wandb summary (see the module doc)."""
    best = res.get("best") or best_epoch(res.get("history") or []) or {}
    out = record_metrics(best)
    if best.get("epoch") is not None:
        out["best/epoch"] = best["epoch"]
    params = res.get("params") or {}
    for part in ("encoder", "with_heads"):
        for kind, value in (params.get(part) or {}).items():
            out[f"params/{part}/{kind}"] = value
    for key in ("step_time_ms", "steady_step_ms", "peak_memory_mb", "wall_time_s", "steps"):
        if isinstance(res.get(key), (int, float)):
            out[key] = res[key]
    for name, path in (res.get("predictions") or {}).items():
        out[f"predictions/{name}"] = path
    out["status"] = res.get("status")
    return out


def set_summary(loggers: list, res: dict) -> None:
    """The wandb summary of each wandb logger: the best epoch's, not the last one's."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(run_summary(res))


def replay(cfg: DictConfig, run_dir: Path, res: dict) -> dict:
    """A finished run's recorded epochs logged to a new wandb run, at their steps, with its summary;
    the run's id goes into results.json (returned)."""
    import wandb

    res = {**res, "wandb_id": uuid.uuid4().hex[:16]}
    options = OmegaConf.merge(cfg, {"logger": {"csv": False}})  # the CSV log is there already
    adapter = (res.get("adapter") or {}).get("name") or "adapter"
    loggers = build_loggers(options, run_dir, res.get("run_name") or run_dir.name, adapter, 0, res["wandb_id"])
    try:
        for record in res.get("history") or []:
            step = int(record.get("step") or record.get("epoch") or 0)
            for logger in loggers:
                logger.log_metrics(record_metrics(record), step=step)
        set_summary(loggers, res)
        for logger in loggers:
            logger.finalize("success")
    finally:
        wandb.finish()
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2, default=float))
    log.info("%s: its %d epochs logged to wandb run %s", run_dir, len(res.get("history") or []), res["wandb_id"])
    return res


def wandb_logger_config(project: str | None = None) -> DictConfig:
    """`conf/logger/wandb.yaml` (with `project`), for runs that trained without it."""
    cfg = OmegaConf.load(Path(conf_dir()) / "logger" / "wandb.yaml")
    if project:
        cfg.project = project
    return cfg


def replay_runs(runs: list[dict], project: str | None = None) -> list[str]:
    """`peft-report --wandb`: every complete run (`runs.load_runs` records) that has no wandb run yet,
    logged to one; returns their folders."""
    logger = wandb_logger_config(project)
    done = []
    for r in runs:
        if r.get("status") != "complete" or r.get("wandb_id") or not isinstance(r.get("config"), dict):
            continue
        run_dir = Path(r["path"])
        stored = json.loads((run_dir / "results.json").read_text())  # without the report's own keys
        cfg = OmegaConf.create(stored["config"])
        cfg.logger = logger
        replay(cfg, run_dir, stored)
        done.append(str(run_dir))
    return done
