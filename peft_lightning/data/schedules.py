"""Multi-task batch schedules: which task(s) each training step sees, and what an epoch is.

Every task has a stream of batches: a seeded permutation of its rows cut into batches (the last
one may be short); when a stream runs out mid-epoch it starts a new permutation (smaller tasks
cycle). Streams restart at every epoch, and every draw depends only on (seed, epoch), so an epoch
is reproducible on its own, which is what lets a resumed run match an uninterrupted one.

Schedules (N_t = batches of task t per pass over its data):
- `joint` (the study's): each step holds one batch of every task, losses summed.
  An epoch is max_t N_t steps: the largest task is seen once, smaller ones cycle.
- `round_robin`: one task per step, in turn. An epoch is (#tasks * max_t N_t) steps.
- `proportional`: one task per step, drawn with probability proportional to its number of rows.
  An epoch is sum_t N_t steps (every row once in expectation).
- `temperature`: like proportional with probability proportional to rows ** (1 / T);
  T=1 is proportional, large T approaches uniform. An epoch is sum_t N_t steps.

Under DDP with W processes an epoch is the same schedule, dealt out: rank r takes steps r, r + W,
r + 2W, ... of it, ceil(S / W) steps each (S the steps above; a rank short of a step repeats the
epoch's first ones, so every rank takes as many steps and none waits in a collective). Each
optimizer step then sees W batches of each scheduled task (W x the batch size), and an epoch
has about S / W optimizer steps: the same rows, in fewer, larger steps.

With `parts` = K > 1, one pass over the data (the epoch above) is cut into K consecutive parts and
each is a Lightning epoch of its own: Lightning epoch e is part e mod K of pass e // K, drawn exactly
as that pass's steps, so K Lightning epochs train on what one epoch trains on without parts.
Validation (and Optuna's pruner, `peft-tune search=optuna` with `tune.epoch_parts`) then sees the
run K times a pass, without validating mid-epoch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from peft_lightning.checks import real, whole

SCHEDULES = ("joint", "round_robin", "proportional", "temperature")

Key = tuple[tuple[str, tuple[int, ...]], ...]  # ((task, rows), ...) for one step


class BatchStream:
    """Endless seeded batches of one task's rows for one epoch.

    With `lengths` and `group` > 0, batches are grouped by length (less padding): the permutation
    is cut into runs of `group` batches, each run is sorted by length and cut into batches, and
    the batches are put in a seeded random order. Rows meet other rows of similar length; which
    rows a pass over the data holds, and how many batches, is unchanged.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        seed: int,
        epoch: int,
        task_idx: int,
        lengths: torch.Tensor | None = None,
        group: int = 0,
    ):
        self.n_rows, self.batch_size = n_rows, batch_size
        self.lengths, self.group = lengths, group
        self.seed = (seed * 1_000_003 + epoch * 7_919 + task_idx * 104_729) % (2**62)
        self.cycle = 0
        self.pending: list[tuple[int, ...]] = []

    def __next__(self) -> tuple[int, ...]:
        if not self.pending:
            g = torch.Generator().manual_seed(self.seed + self.cycle)
            perm = torch.randperm(self.n_rows, generator=g)
            bs = self.batch_size
            if self.lengths is not None and self.group > 0:
                run = self.group * bs  # a multiple of the batch size: only the last batch can be short
                runs = [perm[i : i + run] for i in range(0, self.n_rows, run)]
                runs = [r[torch.argsort(self.lengths[r], stable=True)].tolist() for r in runs]
                batches = [tuple(r[i : i + bs]) for r in runs for i in range(0, len(r), bs)]
                self.pending = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            else:
                order = perm.tolist()
                self.pending = [tuple(order[i : i + bs]) for i in range(0, self.n_rows, bs)]
            self.pending.reverse()
            self.cycle += 1
        return self.pending.pop()


class ScheduleSampler(Sampler[Key]):
    """Yields one key per training step; the dataset turns a key into collated batches.

    Args:
        sizes: rows per task, in task order.
        batch_sizes: batch size per task.
        schedule: one of SCHEDULES.
        temperature: T for the `temperature` schedule.
        seed: base seed; the epoch is mixed in through `set_epoch` (Lightning calls it).
        lengths: tokens of each row per task (its longest pass), for `group_by_length`.
        group_by_length: 0 (the study: random batches), or batches grouped by length within runs of
            this many batches (see `BatchStream`); needs `lengths`.
        parts: Lightning epochs a pass over the data is cut into (see the module doc); 1: an epoch
            is a pass.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        batch_sizes: dict[str, int],
        schedule: str = "joint",
        temperature: float = 1.0,
        seed: int = 0,
        lengths: dict[str, torch.Tensor] | None = None,
        group_by_length: int = 0,
        parts: int = 1,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"data.schedule={schedule!r} is unknown; expected one of {list(SCHEDULES)}")
        group_by_length = whole("data.group_by_length", group_by_length, 0)
        if group_by_length and (lengths is None or any(len(lengths.get(t, ())) != n for t, n in sizes.items())):
            raise ValueError("data.group_by_length needs every task's row lengths")
        self.lengths, self.group = lengths if group_by_length else None, group_by_length
        if schedule == "temperature":
            real("data.temperature", temperature, 0, low_open=True)
        self.sizes, self.batch_sizes = dict(sizes), dict(batch_sizes)
        self.schedule, self.seed, self.epoch = schedule, seed, 0
        self.temperature = 1.0 if schedule == "proportional" else temperature
        self.n_batches = {t: math.ceil(n / self.batch_sizes[t]) for t, n in self.sizes.items()}
        self.rank, self.replicas = 0, 1
        self.parts = whole("data.epoch_parts", parts, 1)
        if self.parts > self.schedule_steps():
            raise ValueError(
                f"data.epoch_parts={self.parts} is more than the {self.schedule_steps()} steps of a pass over the data"
            )

    @property
    def pass_index(self) -> int:
        """Which pass over the data this epoch is (of): the seeds' epoch."""
        return self.epoch // self.parts

    def part_steps(self) -> tuple[int, int]:
        """[start, stop) of this epoch's steps within its pass: consecutive parts whose lengths differ by
        at most one, the first ones the longest (Lightning sizes its epochs by the first), none empty."""
        steps, k = self.schedule_steps(), self.epoch % self.parts
        return -(-k * steps // self.parts), -(-(k + 1) * steps // self.parts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, replicas: int) -> None:
        """Deal this epoch's steps to `replicas` processes; this one is `rank` (see module doc)."""
        if not 0 <= rank < replicas:
            raise ValueError(f"rank {rank} is not in 0..{replicas - 1}")
        self.rank, self.replicas = rank, replicas

    def __len__(self) -> int:
        start, stop = self.part_steps()
        return math.ceil((stop - start) / self.replicas)

    def __iter__(self) -> Iterator[Key]:
        start, stop = self.part_steps()
        steps = itertools.islice(self._schedule(), start, stop)
        if self.replicas == 1:
            yield from steps
            return
        keys = list(steps)
        mine = keys[self.rank :: self.replicas]
        yield from mine + keys[: len(self) - len(mine)]

    def schedule_steps(self) -> int:
        """Steps of one epoch of the whole schedule, before it is dealt to processes."""
        most = max(self.n_batches.values())
        if self.schedule == "joint":
            return most
        if self.schedule == "round_robin":
            return most * len(self.sizes)
        return sum(self.n_batches.values())

    def task_probabilities(self) -> dict[str, float]:
        weights = {t: n ** (1.0 / self.temperature) for t, n in self.sizes.items()}
        total = sum(weights.values())
        return {t: w / total for t, w in weights.items()}

    def _schedule(self) -> Iterator[Key]:
        tasks = list(self.sizes)
        streams = {
            t: BatchStream(
                self.sizes[t],
                self.batch_sizes[t],
                self.seed,
                self.pass_index,
                i,
                self.lengths[t] if self.lengths is not None else None,
                self.group,
            )
            for i, t in enumerate(tasks)
        }
        steps = self.schedule_steps()
        if self.schedule == "joint":
            for _ in range(steps):
                yield tuple((t, next(streams[t])) for t in tasks)
        elif self.schedule == "round_robin":
            for s in range(steps):
                t = tasks[s % len(tasks)]
                yield ((t, next(streams[t])),)
        else:
            probs = self.task_probabilities()
            g = torch.Generator().manual_seed(self.seed * 31 + self.pass_index)
            draws = torch.multinomial(torch.tensor([probs[t] for t in tasks]), steps, replacement=True, generator=g)
            for i in draws.tolist():
                yield ((tasks[i], next(streams[tasks[i]])),)
