"""One run over several processes (Lightning DDP) inside a Hydra job.

Lightning starts ranks 1..N-1 of a node by running the script again. Under Hydra it would rerun
the whole command line (a `-m` sweep included: every child would start the sweep again) with
`hydra.output_subdir=.pl_ddp_hydra_*`. `JobDDPStrategy` starts each child as this one job
instead: `python -m peft_lightning.train <the job's own overrides>` in Hydra's single-run mode,
with `hydra.run.dir` set to the job's run directory, no `.hydra` copy and no log file of its own,
so every rank works in the same folder and only rank 0 writes there (results.json, predictions,
checkpoints; `train.py`, `results.py`). A child whose parent dies (kill -9 of the run) ends
itself instead of waiting in a collective until the backend's timeout.

On SLURM (submitit) every rank is started by SLURM; Lightning reads its environment and starts no
children, and each rank runs the job's function in the same job folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

log = logging.getLogger(__name__)

PARENT_ENV = "PEFT_DDP_PARENT"


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj) -> list:
    """`obj` of every rank, in rank order (a list of one outside distributed runs)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list = [None] * size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on some rank (a collective: every rank must call it)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def job_command() -> tuple[list[str], str]:
    """The command line and folder that run this Hydra job again as a single run in its own run dir."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    command = [sys.executable, "-m", "peft_lightning.train", *hc.overrides.task]
    command += [
        f"hydra.run.dir={_quoted(run_dir)}",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    return command, hc.runtime.cwd


def _quoted(value: str) -> str:
    """A Hydra override value that keeps `,`, `=` and brackets of a run folder's name literal."""
    return "'" + value.replace("'", "\\'") + "'"


class JobScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, starting each child as this Hydra job (see module doc)."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ.update(
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
            NODE_RANK=str(env.node_rank()),
            LOCAL_RANK=str(env.local_rank()),
            WORLD_SIZE=str(self.num_processes * self.num_nodes),
        )
        command, cwd = job_command()
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank), PARENT_ENV: str(os.getpid())}
            if os.environ.get("PL_GLOBAL_SEED") is None:
                child_env.pop("PL_GLOBAL_SEED", None)
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd))


class JobDDPStrategy(DDPStrategy):
    """DDP whose children run this Hydra job (`JobScriptLauncher`)."""

    def __init__(self, find_unused_parameters: bool = False, timeout_s: float = 1800, **kwargs):
        super().__init__(find_unused_parameters=find_unused_parameters, timeout=timedelta(seconds=timeout_s), **kwargs)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method == "popen":
            self._launcher = JobScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


def watch_parent(period_s: float = 1.0) -> None:
    """In a child started by `JobScriptLauncher`: end this process when the parent (rank 0) is gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not parent.isdigit():
        return

    def watch() -> None:
        while True:
            if os.getppid() != int(parent):
                log.error("rank 0 (PID %s) has ended; this rank stops too", parent)
                os._exit(1)
            time.sleep(period_s)

    threading.Thread(target=watch, name="peft-ddp-parent-watch", daemon=True).start()
