"""A sweep's outcome: `peft-train -m` ends with "k of N complete" and exits 1 unless all are.

Hydra's launchers return every job's result to the process that started the sweep and drop it;
our jobs catch their own errors (one failed job must not stop a sweep), so a sweep whose every job
failed used to exit 0. `SweepTally` (a Hydra callback, `hydra.callbacks.tally` in train.yaml)
notes each job's folder and status as it ends, in whichever process runs it (the basic launcher's,
a joblib worker, a SLURM node), in `<sweep dir>/.jobs/<job number>.json`; when the sweep ends it
prints the tally and keeps it for `train.main`, which sets the exit code.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from peft_lightning.files import atomic_write_text
from peft_lightning.results import read_results

log = logging.getLogger("peft_lightning")

JOBS = ".jobs"
last_tally: dict | None = None  # the last sweep of this process (train.main reads it)


def _sweep_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir))


class SweepTally(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global last_tally
        last_tally = None
        shutil.rmtree(_sweep_dir(config) / JOBS, ignore_errors=True)  # this sweep's jobs only

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        run_dir = Path(str(config.output_dir))
        res = read_results(run_dir) or {}
        status = res.get("status") or "failed"
        if (config.get("tune") or {}).get("worker") is not None:  # a search worker: its trials are runs of their own
            status, res = "complete", {}
        if job_return is not None and str(getattr(job_return, "status", "")) == "JobStatus.FAILED":
            status = "failed"
        note = {"run": str(run_dir), "status": status, "error": res.get("error")}
        folder = _sweep_dir(config) / JOBS
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / f"{config.hydra.job.num}.json", json.dumps(note))
        except OSError as err:  # the tally is a convenience: never a job's failure
            log.warning("could not note the job's outcome in %s: %s", folder, err)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        global last_tally
        notes = []
        for path in sorted((_sweep_dir(config) / JOBS).glob("*.json")):
            try:
                notes.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        last_tally = tally(notes)
        log.info("%s", tally_line(last_tally))
        for note in last_tally["not_complete"]:
            log.info("  %s: %s%s", note["status"], note["run"], f" ({note['error']})" if note.get("error") else "")


def tally(notes: list[dict]) -> dict:
    complete = sum(n["status"] == "complete" for n in notes)
    return {
        "total": len(notes),
        "complete": complete,
        "not_complete": [n for n in notes if n["status"] != "complete"],
    }


def tally_line(t: dict) -> str:
    line = f"sweep: {t['complete']} of {t['total']} complete"
    counts: dict[str, int] = {}
    for n in t["not_complete"]:
        counts[n["status"]] = counts.get(n["status"], 0) + 1
    return line + (" (" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")" if counts else "")
