"""Pin a sweep job to a free GPU slot with per-GPU lock files.

Jobs launched side by side (Hydra's joblib launcher) each call `gpu_slot`; it takes an exclusive,
non-blocking `flock` on `gpu<i>-slot<j>.lock` for the first free slot, filling every GPU's first
slot before any second one, and waits when all are taken. The kernel drops the lock when the
process ends, even on a crash, so a dead job never keeps a GPU. Unlike `job.num % n_gpus`, two
jobs cannot land on one GPU by accident, and a fast job's GPU goes to the next waiting job.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def gpu_slot(
    n_gpus: int, jobs_per_gpu: int = 1, lock_dir: str | Path = "/tmp/peft_lightning_gpu_locks", poll_s: float = 2.0
) -> Iterator[int]:
    """Hold a slot on one of `n_gpus` GPUs for the duration of the block; yields the GPU index."""
    if n_gpus < 1 or jobs_per_gpu < 1:
        raise ValueError(f"gpu_slot needs n_gpus >= 1 and jobs_per_gpu >= 1, got {n_gpus}, {jobs_per_gpu}")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(jobs_per_gpu):
            for gpu in range(n_gpus):
                fd = os.open(lock_dir / f"gpu{gpu}-slot{slot}.lock", os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    yield gpu
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                return
        time.sleep(poll_s)
