"""What every run leaves behind: `results.json`, `predictions/{task}-{split}.tsv`, `csv/metrics.csv`.

`results.json` is rewritten atomically after every validation epoch (status `running`) and at the
end (status `complete`, or `failed` with the error's first line), so a killed run never leaves a
half-written file and a sweep can tell finished jobs from unfinished ones. A resumed run keeps the
metrics.csv rows it logged before its checkpoint (`ResumableCSVLogger`).
"""

from __future__ import annotations

import csv
import io
import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from peft_lightning.files import atomic_write, atomic_write_text
from peft_lightning.tasks import TASKS

RESULTS = "results.json"


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at (memory-mapped: a big checkpoint is not read;
    tensors and plain data only: loading a checkpoint never runs code)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("global_step", 0))


def _row_step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")  # a torn last line of a killed run: never kept


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it keeps the rows of steps before `keep_before`."""

    def __init__(self, log_dir: str, keep_before: int):
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _row_step(r) < self.keep_before and None not in r.values()]
        if not rows:
            path.unlink()  # a fresh start, as Lightning does
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, out.getvalue())
        self.metrics_keys = keys  # appended rows use the same header


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger` that keeps what an interrupted run already logged.

    Lightning's writer deletes an existing `metrics.csv` when it starts, so a resumed run would lose
    every row from before the interruption. This one keeps the rows of the steps before the
    checkpoint the run resumes from (`resume_step`, its global step) and appends after them. It drops
    the rows of later steps, which the resumed run logs again, and any torn line. A fresh run
    (`resume_step=0`) starts a new file, as Lightning does.

    Args:
        resume_step: the global step of the checkpoint the run resumes from; 0 for a fresh run.
        **kwargs: `CSVLogger`'s.
    """

    def __init__(self, resume_step: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.resume_step)
        return self._experiment


def read_results(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RESULTS
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(run_dir: str | Path) -> bool:
    res = read_results(run_dir)
    return bool(res) and res.get("status") == "complete"


def machine() -> dict:
    """Where a run trained, for its times: the CPU (model name, family and model numbers, cores, whether
    it multiplies bf16 natively: AMX or AVX512-BF16), the GPU if one is used, torch's version. Times are
    comparable only within one machine: a 2-core VM may land on another CPU from one sitting to the next."""
    import os
    import platform

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:  # the first processor's block is enough
                    break
    except OSError:  # not Linux
        pass
    flags = set(info.get("flags", "").split())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']}, model {info['model']})"
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "bf16": sorted(f for f in ("amx_bf16", "avx512_bf16") if f in flags),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def strategy_kind(adapter: str, mtl: dict | None) -> str:
    """`lora`, or `lora+upgrad` under a torchjd aggregator (`mtl`: a config's or results.json's `mtl`
    section): what a run's time is compared with. An aggregated step backpropagates each task on its
    own (about 1.8x the summed loss's step on the CPU, docs/speed.md), so the plan prices, and the
    report's cost table groups, its runs apart from the strategy's summed-loss runs."""
    name = (mtl or {}).get("name")
    return adapter if name in (None, "sum") else f"{adapter}+{name}"


def machine_label(res: dict) -> str:
    """A run's machine in one cell: its CPU and cores, or its GPU; `not recorded` for runs from before."""
    m = res.get("machine")
    if not isinstance(m, dict):
        return "not recorded"
    if m.get("gpu"):
        return str(m["gpu"])
    amx = " AMX" if "amx_bf16" in (m.get("bf16") or []) else ""
    return f"{m.get('cpu', '?')}{amx}, {m.get('cores', '?')} cores"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def selection_score(record: dict) -> float | None:
    """What an epoch is chosen by: the selection split's avg where the run has one, else dev's."""
    return record.get("select_avg") if "select" in record else record.get("dev_avg")


def as_logged(score: float) -> float:
    """A score as Lightning's ModelCheckpoint sees it (`self.log` keeps fp32): the best epoch, the
    best checkpoint and the best predictions are chosen on these, so that they never disagree over
    a difference below fp32's resolution."""
    return float(torch.tensor(score, dtype=torch.float32))


def best_epoch(history: list[dict]) -> dict | None:
    """The epoch the run chose (and predicts with): the best by `selection_score` (as logged, fp32),
    the first of ties."""
    scored = [h for h in history if selection_score(h) is not None]
    return max(scored, key=lambda h: as_logged(selection_score(h))) if scored else None


def restore_best_score(trainer, history: list[dict]) -> None:
    """A resumed run whose folder was moved or copied: Lightning reloads the best score only when the
    checkpoint's folder has the same path, and would otherwise let the next epoch overwrite best.ckpt
    with a worse one. The score comes from the record (results.json's history) instead."""
    best = best_epoch(history)
    for cb in trainer.checkpoint_callbacks:
        if cb.monitor is None or best is None or cb.best_model_score is not None or cb.dirpath is None:
            continue
        path = Path(cb.dirpath) / f"{cb.filename}.ckpt"
        if path.is_file():
            score = torch.tensor(selection_score(best), dtype=torch.float32)  # as the logged scores
            cb.best_model_path = cb.kth_best_model_path = str(path)
            cb.best_model_score = cb.kth_value = score
            cb.best_k_models = {str(path): score}


class Clock:
    """Seconds spent in each part of a run, summed over its processes (a resume adds to them).

    startup: from the job's start to the start of training (backbone, data); features: a frozen
    encoder's vectors (features.py); train: the
    training epochs; validation: every validation pass; checkpoint: writing checkpoints; predict:
    the final prediction pass; write: results.json and the predictions files. `other` in
    results.json is the wall time none of these covers.
    """

    PARTS = ("startup", "features", "train", "validation", "checkpoint", "predict", "write")

    def __init__(self, seconds: dict | None = None):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.seconds.update({k: float(v) for k, v in (seconds or {}).items() if k in self.PARTS})

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    @contextmanager
    def part(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - t0)

    def record(self, wall: float) -> dict:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(0.0, wall - sum(self.seconds.values())), 3)
        return out


class ResultsWriter(L.Callback):
    """Keeps `results.json` current: meta, params, per-epoch history, best epoch, timing, memory.

    Two step times: `step_time_ms`, all training time over all steps, and `steady_step_ms`, which
    leaves out the first `warm_steps` steps of each fit (a resume is a new fit): torch.compile,
    CUDA-graph capture and allocator growth happen there, and they would otherwise weigh on a short
    run's step time, differently for each strategy.
    """

    def __init__(self, run_dir: str | Path, meta: dict, warm_steps: int = 10, t0: float | None = None):
        self.path = Path(run_dir) / RESULTS
        self.clock = Clock()
        self._job_t0 = time.perf_counter() if t0 is None else t0  # the job's start (perf_counter)
        self._val_t0: float | None = None
        self.meta = dict(meta)
        self.train_s = 0.0
        self.train_steps = 0
        self.warm_steps = warm_steps
        self.steady_s = 0.0
        self.steady_steps = 0
        self._fit_step0 = 0
        self._steady_t0: float | None = None
        self._steady_step0 = 0
        self._epoch_t0: float | None = None
        self._epoch_step0 = 0
        self._fit_t0 = time.perf_counter()
        self._elapsed_before = 0.0
        self.status = "running"
        self.extra: dict = {}
        # the record of the run this process resumes (set by peft-train when it resumes one)
        self.resumed_from: dict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_t0 = time.perf_counter()
        hist = getattr(pl_module, "history", [])
        if hist:  # resumed: continue the clocks where the checkpoint left them
            self.clock = Clock(hist[-1].get("timing"))
            self._elapsed_before = hist[-1].get("elapsed_s", 0.0)
            self.train_s = hist[-1].get("train_s", 0.0)
            self.train_steps = hist[-1].get("train_steps", 0)
            self.steady_s = hist[-1].get("steady_s", 0.0)
            self.steady_steps = hist[-1].get("steady_steps", 0)
        self._fit_step0, self._steady_t0 = trainer.global_step, None
        self.clock.add("startup", self._fit_t0 - self._job_t0)
        self.meta["params"] = pl_module.model.param_counts()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        restore_best_score(trainer, pl_module.history)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_t0, self._epoch_step0 = time.perf_counter(), trainer.global_step
        if self._warm(trainer):
            self._steady_t0, self._steady_step0 = self._epoch_t0, trainer.global_step

    def _warm(self, trainer) -> bool:
        return trainer.global_step - self._fit_step0 >= self.warm_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._steady_t0 is None and self._epoch_t0 is not None and self._warm(trainer):
            if pl_module.device.type == "cuda":  # once a fit: the warm-up steps end here
                torch.cuda.synchronize(pl_module.device)
            self._steady_t0, self._steady_step0 = time.perf_counter(), trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = time.perf_counter()
        if self._epoch_t0 is not None and not trainer.sanity_checking:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            now = time.perf_counter()
            self._val_t0 = now
            self.train_s += now - self._epoch_t0
            self.train_steps += trainer.global_step - self._epoch_step0
            self._epoch_t0 = None
            if self._steady_t0 is not None:
                self.steady_s += now - self._steady_t0
                self.steady_steps += trainer.global_step - self._steady_step0
                self._steady_t0 = None

    def on_validation_end(self, trainer, pl_module) -> None:
        # checkpoint callbacks run after this one (Lightning puts them last): their writes are not in it
        seconds = time.perf_counter() - self._val_t0 if self._val_t0 is not None else 0.0
        self.clock.add("validation", seconds)
        if trainer.sanity_checking or not pl_module.history:
            return
        last = pl_module.history[-1]
        self.clock.seconds["train"] = self.train_s
        last.update(
            elapsed_s=self.elapsed(),
            train_s=self.train_s,
            train_steps=self.train_steps,
            steady_s=self.steady_s,
            steady_steps=self.steady_steps,
            eval_s=round(seconds, 3),
            timing={k: round(v, 3) for k, v in self.clock.seconds.items()},
        )
        self.write(trainer, pl_module)

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._job_t0

    def write(self, trainer, pl_module, status: str | None = None, **extra) -> dict:
        with self.clock.part("write"):
            return self._write(trainer, pl_module, status, **extra)

    def _keep_record(self, status: str, **extra) -> dict:
        """A resume that failed before its checkpoint was restored: the record it resumed from stays,
        with the failure beside it (never an empty history over an interrupted run's epochs)."""
        out = {**self.resumed_from, "status": status, **extra}
        out["resume_failed"] = extra.get("error", status)
        atomic_write_text(self.path, json.dumps(out, indent=2, default=float))
        return out

    def _write(self, trainer, pl_module, status: str | None = None, **extra) -> dict:
        if status:
            self.status = status
        self.extra.update(extra)
        history = list(getattr(pl_module, "history", []))
        if not history and status in ("failed", "interrupted") and self.resumed_from:
            return self._keep_record(status, **extra)
        best = best_epoch(history)
        self.clock.seconds["train"] = self.train_s
        out = {
            "status": self.status,
            **self.meta,
            "history": history,
            "best": best,
            "steps": trainer.global_step if trainer is not None else 0,
            "wall_time_s": round(self.elapsed(), 3),
            "train_time_s": round(self.train_s, 3),
            "timing": self.clock.record(self.elapsed()),
            "step_time_ms": round(1000 * self.train_s / self.train_steps, 3) if self.train_steps else None,
            "steady_step_ms": round(1000 * self.steady_s / self.steady_steps, 3) if self.steady_steps else None,
            "peak_memory_mb": round(peak_memory_mb(pl_module.device), 1),
            **self.extra,
        }
        if trainer is None or trainer.is_global_zero:  # DDP: one writer
            atomic_write_text(self.path, json.dumps(out, indent=2, default=float))
        return out


def collect_predictions(datamodule, targets: list[tuple[str, str]], outputs) -> dict[tuple[str, str], list]:
    """Per (task, split), predictions in row order from `trainer.predict` outputs."""
    if targets and outputs and isinstance(outputs[0], dict):
        outputs = [outputs]  # a single dataloader returns a flat list
    preds = {}
    for (task, split), batches in zip(targets, outputs):
        index = torch.cat([b["index"] for b in batches])
        values = torch.cat([b["prediction"] for b in batches])
        preds[(task, split)] = in_row_order(len(datamodule.split(task, split)), index, values, f"{task}-{split}")
    return preds


def in_row_order(n: int, index: torch.Tensor, values: torch.Tensor, what: str) -> list:
    out: list = [None] * n
    for i, p in zip(index.tolist(), values.tolist()):
        out[i] = p
    missing = sum(p is None for p in out)
    if missing:
        raise RuntimeError(f"{what}: {missing} of {n} rows have no prediction")
    return out


def format_prediction(p: float | int) -> str:
    """A prediction as the TSV files hold it: a class id, or a score with six decimals."""
    return f"{p:.6f}" if isinstance(p, float) else str(int(p))


def write_predictions(
    run_dir: str | Path, datamodule, preds: dict[tuple[str, str], list], folder: str = "predictions"
) -> dict[str, str]:
    """Write `<folder>/{task}-{split}.tsv` with columns id and prediction (and, for a split with
    labels, the label: a dev file is then all a paired bootstrap needs), ids as in the input."""
    folder = Path(run_dir) / folder
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for (task, split), values in sorted(preds.items()):
        data = datamodule.split(task, split)
        if data.labels is None:
            lines = [["id", "prediction"]]
            lines += [[id_, format_prediction(p)] for id_, p in zip(data.ids, values)]
        else:
            as_label = float if TASKS[task].is_regression else int
            labels = [format_prediction(as_label(y)) for y in data.labels.tolist()]
            lines = [["id", "prediction", "label"]]
            lines += [[id_, format_prediction(p), y] for id_, p, y in zip(data.ids, values, labels)]
        path = folder / f"{task}-{split}.tsv"
        atomic_write(path, lambda f, lines=lines: csv.writer(f, delimiter="\t", lineterminator="\n").writerows(lines))
        written[str(path.relative_to(Path(run_dir) / "predictions").with_suffix(""))] = str(path.relative_to(run_dir))
    return written


def step_line(res: dict) -> str:
    """Steps and the time a step takes; a run too short for a steady step time says so."""
    steps = res.get("steps", 0)
    if res.get("steady_step_ms"):
        return f"{steps} steps, {res['steady_step_ms']:.0f} ms a step"
    if res.get("step_time_ms"):  # every step was a warm-up step: the mean includes start-up costs
        return f"{steps} steps: too few for a steady step time; {res['step_time_ms']:.0f} ms a step with warm-up"
    return f"{steps} steps"


def time_split_line(res: dict) -> str:
    """Where the wall time went (`timing`), as shares."""
    timing = res.get("timing") or {}
    wall = res.get("wall_time_s") or 0
    parts = [(k, v) for k, v in timing.items() if isinstance(v, (int, float)) and v > 0]
    if not parts or wall <= 0:
        return ""
    return "\n  time: " + ", ".join(f"{k} {v:.1f} s ({100 * v / wall:.0f}%)" for k, v in parts)


def summary(res: dict, run_dir: str | Path) -> str:
    """The block a finished run prints (and `train.log` keeps): best epoch, dev scores per task,
    test predictions, results.json, wall time."""
    run_dir = Path(run_dir)
    best = res.get("best") or {}
    lines = [f"run {res.get('status', '?')}: {run_dir}"]
    if best:
        chosen = f", chosen on select avg {best['select_avg']:.4f}" if best.get("select_avg") is not None else ""
        lines.append(
            f"  best epoch {best['epoch']} of {len(res.get('history', []))}, dev avg {best['dev_avg']:.4f}{chosen}"
        )
        for task, metrics in best.get("dev", {}).items():
            lines.append(f"  dev {task:<5} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    preds = res.get("predictions") or {}
    tests = [p for k, p in sorted(preds.items()) if k.endswith("-test")]
    if tests:
        lines.append(f"  test predictions (from {res.get('predicted_from', '?')}): " + ", ".join(tests))
    lines.append(f"  results: {run_dir / RESULTS}")
    wall = res.get("wall_time_s")
    if wall is not None:
        lines.append(f"  wall time {wall:.0f} s ({step_line(res)})" + time_split_line(res))
    return "\n".join(lines)
