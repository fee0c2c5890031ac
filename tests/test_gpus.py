"""Per-GPU slot locks: concurrent jobs never share a slot, and a finished job frees its GPU."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from peft_lightning.gpus import gpu_slot


def hold(lock_dir: str, n_gpus: int, per_gpu: int, seconds: float, log) -> None:
    with gpu_slot(n_gpus, per_gpu, lock_dir, poll_s=0.02) as gpu:
        t0 = time.time()
        time.sleep(seconds)
        log.put((gpu, t0, time.time()))


@pytest.mark.parametrize("n_gpus,per_gpu,jobs", [(2, 1, 5), (1, 2, 4)])
def test_jobs_never_share_a_slot(tmp_path, n_gpus, per_gpu, jobs):
    ctx = mp.get_context("fork")
    log = ctx.Queue()
    procs = [ctx.Process(target=hold, args=(str(tmp_path), n_gpus, per_gpu, 0.3, log)) for _ in range(jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    spans = [log.get(timeout=5) for _ in range(jobs)]
    assert {g for g, _, _ in spans} == set(range(n_gpus))  # every GPU used
    for gpu in range(n_gpus):
        mine = sorted((a, b) for g, a, b in spans if g == gpu)
        # at any moment at most `per_gpu` jobs hold this GPU
        events = sorted([(a, 1) for a, _ in mine] + [(b, -1) for _, b in mine])
        level = peak = 0
        for _, d in events:
            level += d
            peak = max(peak, level)
        assert peak <= per_gpu


def test_slots_fill_every_gpu_before_doubling_up(tmp_path):
    with gpu_slot(3, 2, tmp_path) as a, gpu_slot(3, 2, tmp_path) as b, gpu_slot(3, 2, tmp_path) as c:
        assert sorted([a, b, c]) == [0, 1, 2]
        with gpu_slot(3, 2, tmp_path) as d:
            assert d == 0  # second slot of GPU 0 only once every GPU has a job
    with gpu_slot(3, 2, tmp_path) as again:
        assert again == 0  # released on exit


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_gpus >= 1"):
        with gpu_slot(0, 1, tmp_path):
            pass
