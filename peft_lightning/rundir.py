"""A run directory that survives faults: one writer at a time, whole files only, readable checkpoints.

- `prepare_run_dir` makes the folder and proves it can be written before anything trains.
- `RunLock` holds an exclusive `flock` on `<run>/.lock` (holding the PID) for the life of the
  process: a second command into the same run directory stops with the PID of the first. The
  kernel drops the lock when the process ends, however it ends (kill -9 too), so a lock file left
  by a dead process is stale by construction and is simply taken.
- `AtomicCheckpointIO` writes each checkpoint to a temporary file beside it, syncs it and renames
  it into place: a kill during the write leaves the previous `last.ckpt` / `best.ckpt` whole.
  `remove_partial_files` deletes the temporaries such a kill leaves behind.
- `read_checkpoint_meta` reads a checkpoint to resume from, or says which file is broken and the
  way out.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from peft_lightning.files import atomic_write

LOCK = ".lock"


class RunDirError(ValueError):
    """The run directory cannot be used as it is; the run stops before writing anything."""


class RunDirUnavailable(RunDirError):
    """The folder cannot be taken (in use by another command, or not writable): nothing is written there."""


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside distributed runs)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def prepare_run_dir(run_dir: Path) -> None:
    """Create `run_dir` and check that a file can be written in it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RunDirUnavailable(
            f"output folder {run_dir} cannot be written ({reason}); choose another with output_dir=... "
            "(a sweep: sweep_root=... or hydra.sweep.dir=...)"
        ) from None


class RunLock:
    """An exclusive lock on a run directory for as long as this process runs (see module doc)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = self.path.read_text().strip() or "unknown"
            raise RunDirUnavailable(
                f"run directory {self.path.parent} is in use by PID {holder} (lock {self.path}); "
                "wait for that run to end, or stop it, and run again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # released: no PID to report
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, except that a checkpoint appears whole or not at all.

    Args:
        clock: a `results.Clock`, whose `checkpoint` part gets the time of each write.
    """

    def __init__(self, clock=None):
        super().__init__()
        self.clock = clock

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        t0 = time.perf_counter()
        atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True, fsync=True)
        if self.clock is not None:
            self.clock.add("checkpoint", time.perf_counter() - t0)


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed run did not finish; returns them."""
    partial = [p for folder in (run_dir, run_dir / "checkpoints", run_dir / "predictions") for p in _tmp_in(folder)]
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def _tmp_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.tmp") if p.is_file()) if folder.is_dir() else []


def read_checkpoint_meta(path: str | Path) -> dict:
    """A checkpoint's top-level entries (tensors memory-mapped, not read), or a RunDirError naming
    the file and the way out when it is truncated, corrupt or not ours."""
    try:
        # tensors and plain data only: a shared or downloaded run folder must never run code on load
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            raise RunDirError(
                f"{path}: refused: it holds objects other than tensors and plain data (loading it would run "
                "code, or needs classes this project never saves). peft-lightning writes no such checkpoint; "
                "do not load it. ckpt_path=null starts the run over"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(
            f"{path}: cannot be read as a checkpoint, it is truncated or corrupt ({first}). "
            "Start this run over with ckpt_path=null (or force=true); best.ckpt and results.json are "
            "left as they are until the new run writes its own"
        ) from None
    if not isinstance(ckpt, dict) or "peft_lightning" not in ckpt:
        raise RunDirError(
            f"{path}: not a peft-lightning checkpoint (no 'peft_lightning' entry); ckpt_path=null starts over"
        )
    return ckpt
