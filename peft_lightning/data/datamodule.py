"""MultiTaskDataModule: reads, validates, tokenises (cached) and schedules SST-5, QQP and STS-B."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from peft_lightning.checks import real, whole
from peft_lightning.data.encoded import EncodedSplit, collate, encode_split, tokenizer_fingerprint
from peft_lightning.data.readers import detect_layout, read_split
from peft_lightning.data.schedules import Key, ScheduleSampler
from peft_lightning.data.selection import sample, selection_size, split_off
from peft_lightning.tasks import SPLITS, get_tasks

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PEFT_CACHE_DIR", Path.home() / ".cache" / "peft_lightning"))


class StepDataset(Dataset):
    """Turns a schedule key into `{task: collated batch}` for one training step."""

    def __init__(self, splits: dict[str, EncodedSplit], pad_id: int, multiple: int = 1):
        self.splits, self.pad_id, self.multiple = splits, pad_id, multiple

    def __getitem__(self, key: Key) -> dict[str, dict]:
        return {task: collate(self.splits[task], rows, self.pad_id, self.multiple) for task, rows in key}


class EvalDataset(Dataset):
    """Batches of one split in length-sorted order (less padding); `index` maps back to rows.

    Under DDP, rank r of W takes batches r, r + W, ...: every row once over all ranks, in the same
    batches as one process (no padding rows, so synchronised metrics equal one process's). A split
    of fewer than W batches is cut into smaller ones, so that every rank has one.
    """

    def __init__(
        self, split: EncodedSplit, batch_size: int, pad_id: int, multiple: int = 1, rank: int = 0, replicas: int = 1
    ):
        # each batch says which split it is of (`split`: dev, select, train_eval, test, ...)
        if len(split) < replicas:
            raise ValueError(
                f"{split.task} {split.split}: {len(split)} row(s) for {replicas} DDP processes; "
                "every process needs at least one (fewer trainer.devices, or a larger data.limit_eval)"
            )
        order = torch.argsort(split.lengths(), stable=True).tolist()
        batch_size = min(batch_size, -(-len(order) // replicas))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.batches = batches[rank::replicas]
        self.split, self.pad_id, self.multiple = split, pad_id, multiple

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, dict]:
        batch = collate(self.split, self.batches[i], self.pad_id, self.multiple)
        batch["split"] = self.split.split
        return {self.split.task: batch}


class MultiTaskDataModule(L.LightningDataModule):
    """Data for the three tasks, batched by a multi-task schedule.

    Args:
        dir: data directory (TSV or CS224N layout, see `readers`).
        tokenizer: a Hugging Face fast tokenizer of the backbone.
        tasks: task keys to use (default all three).
        batch_size: per-task training batch size, an int or a `{task: int}` mapping.
        eval_batch_size: batch size for dev/test inference.
        max_length: truncation length in tokens.
        pair_encoding: `separate` (each sentence its own pass, the study) or `cross`.
        schedule: `joint`, `round_robin`, `proportional` or `temperature` (see `schedules`).
        temperature: T for the `temperature` schedule.
        limit_train: if set, a seeded subsample of at most this many rows per training set.
        limit_eval: if set, a subsample of at most this many rows per dev set, drawn with
            `eval_seed` (the same rows for every seed of a study; dev metrics and dev predictions
            then cover that subsample; test is never subsampled).
        selection: rows (int) or fraction (float) of each training set held out as the selection
            split (see `selection`), which picks the best epoch; 0: none.
        select_on: `selection` (the best epoch by the selection split; dev is only reported) or
            `dev` (the study's protocol: by dev, and no selection split).
        score_dev: `best` (dev is scored once, by the chosen epoch's weights, when it does not
            choose the epoch: one pass instead of one an epoch) or `every_epoch` (dev in every
            epoch's record too: the epochs study's curves). With `select_on=dev`, every epoch.
        train_eval: training rows (a sample of those trained on) evaluated like dev every epoch.
        eval_seed: seed of the selection split, the train_eval sample and the dev subsample.
        seed: seed for the training subsample and batch order.
        cache_dir: token cache folder; default `$PEFT_CACHE_DIR` or `~/.cache/peft_lightning`.
        num_workers: DataLoader workers.
        on_bad_row: `raise` or `skip` (see `readers.read_split`).
        tokenizer_id: a stable name for the tokenizer in cache keys (default: its fingerprint).
        pad_to_multiple_of: round batch widths up to this multiple (bucketed shapes for compile).
        group_by_length: 0 (the study: random training batches), or training batches of similar
            lengths, grouped within runs of this many batches (`schedules.BatchStream`; less padding).
        epoch_parts: Lightning epochs one pass over the training data is cut into (1: an epoch is a
            pass). Each part is validated: peft-tune's Optuna trials use it to prune within a pass.
    """

    def __init__(
        self,
        dir: str | Path,
        tokenizer,
        tasks: list[str] | None = None,
        batch_size: int | dict[str, int] = 8,
        eval_batch_size: int = 64,
        max_length: int = 128,
        pair_encoding: str = "separate",
        schedule: str = "joint",
        temperature: float = 2.0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        selection: int | float = 500,
        select_on: str = "selection",
        score_dev: str = "best",
        train_eval: int = 500,
        eval_seed: int = 0,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        on_bad_row: str = "raise",
        tokenizer_id: str | None = None,
        pad_to_multiple_of: int = 1,
        group_by_length: int = 0,
        epoch_parts: int = 1,
    ):
        super().__init__()
        self.dir = Path(dir)
        self.tokenizer, self.tokenizer_id = tokenizer, tokenizer_id
        self.tasks = get_tasks(list(tasks) if tasks is not None else None)
        names = [t.name for t in self.tasks]
        if not isinstance(batch_size, Mapping):  # one size for every task
            batch_size = dict.fromkeys(names, batch_size)
        missing = [n for n in names if n not in batch_size]
        if missing:
            raise ValueError(f"data.batch_size has no entry for task(s) {missing}")
        self.batch_size = {n: whole(f"data.batch_size.{n}", batch_size[n], 1) for n in names}
        self.eval_batch_size = whole("data.eval_batch_size", eval_batch_size, 1)
        self.max_length = whole("data.max_length", max_length, 2)  # [CLS] and [SEP] at least
        self.pair_encoding, self.schedule = pair_encoding, schedule
        self.temperature = real("data.temperature", temperature, 0, low_open=True)
        self.limit_train, self.limit_eval = (
            None if n is None else whole(f"data.{name}", n, 1)
            for name, n in (("limit_train", limit_train), ("limit_eval", limit_eval))
        )
        if select_on not in ("selection", "dev"):
            raise ValueError(f"data.select_on={select_on!r} is unknown; expected selection or dev")
        selection_size(selection, 0)  # checks the option
        if select_on == "selection" and not selection:
            raise ValueError(
                "data.select_on=selection needs a selection split: data.selection > 0 (or data.select_on=dev)"
            )
        if score_dev not in ("best", "every_epoch"):
            raise ValueError(f"data.score_dev={score_dev!r} is unknown; expected best or every_epoch")
        self.selection, self.select_on, self.score_dev = selection, select_on, score_dev
        self.train_eval = whole("data.train_eval", train_eval, 0)
        self.eval_seed = whole("data.eval_seed", eval_seed, 0)
        self.seed, self.num_workers = seed, whole("data.num_workers", num_workers, 0)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.on_bad_row = on_bad_row
        self.multiple = whole("data.pad_to_multiple_of", pad_to_multiple_of, 1)
        self.group_by_length = whole("data.group_by_length", group_by_length, 0)
        self.epoch_parts = whole("data.epoch_parts", epoch_parts, 1)
        self.splits: dict[tuple[str, str], EncodedSplit] = {}
        self.sampler: ScheduleSampler | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        layout = detect_layout(self.dir)
        if self.tokenizer_id is None:  # the cache key's tokenizer part: once, not per split (~0.1 s each)
            self.tokenizer_id = tokenizer_fingerprint(self.tokenizer)
        for task in self.tasks:
            for split in SPLITS:
                raw = read_split(self.dir, task, split, layout, self.on_bad_row)
                if raw.skipped:
                    log.warning("%s: skipped %d bad row(s), first: %s", raw.path, len(raw.skipped), raw.skipped[0])
                enc = encode_split(
                    raw, self.tokenizer, self.max_length, self.pair_encoding, self.cache_dir, self.tokenizer_id
                )
                if split == "train" and self.select_on == "selection":  # held out before anything trains
                    size = selection_size(self.selection, len(enc))
                    keep, held = split_off(enc.labels, size, self.eval_seed, task.is_regression)
                    self.splits[(task.name, "select")] = dataclasses.replace(enc.subset(held), split="select")
                    enc = enc.subset(keep)
                if split == "train" and self.limit_train is not None and len(enc) > self.limit_train:
                    g = torch.Generator().manual_seed(self.seed)
                    enc = enc.subset(torch.randperm(len(enc), generator=g)[: self.limit_train].sort().values)
                if split == "dev" and self.limit_eval is not None:
                    enc = enc.subset(sample(len(enc), self.limit_eval, self.eval_seed))
                self.splits[(task.name, split)] = enc
                if split == "train" and self.train_eval:
                    rows = sample(len(enc), self.train_eval, self.eval_seed + 1)
                    self.splits[(task.name, "train_eval")] = dataclasses.replace(enc.subset(rows), split="train_eval")
        train = {t: self.splits[(t, "train")] for t in self.task_names}
        self.sampler = ScheduleSampler(
            {t: len(s) for t, s in train.items()},
            self.batch_size,
            self.schedule,
            self.temperature,
            self.seed,
            lengths={t: s.lengths() for t, s in train.items()} if self.group_by_length else None,
            group_by_length=self.group_by_length,
            parts=self.epoch_parts,
        )

    def split(self, task: str, split: str) -> EncodedSplit:
        return self.splits[(task, split)]

    def shard(self) -> tuple[int, int]:
        """(rank, processes) of the trainer this module is attached to; (0, 1) without one."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        train = {t: self.splits[(t, "train")] for t in self.task_names}
        self.sampler.shard(*self.shard())
        if self.epoch_parts > 1 and self.trainer is not None:
            # Parts a step apart: the trainer builds this loader every epoch (train.py) and takes the
            # epoch's length from it before it sets the sampler's epoch, so the length is set here.
            self.sampler.set_epoch(self.trainer.current_epoch)
        return DataLoader(
            StepDataset(train, self.pad_id, self.multiple),
            batch_size=None,
            sampler=self.sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._generator(),
        )

    def eval_dataloader(self, task: str, split: str) -> DataLoader:
        ds = EvalDataset(self.splits[(task, split)], self.eval_batch_size, self.pad_id, self.multiple, *self.shard())
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers, generator=self._generator())

    def _generator(self) -> torch.Generator:
        # A loader's own generator: creating its iterator then draws no number from the global RNG,
        # so dropout masks do not depend on when Lightning builds iterators (fresh run vs resume).
        return torch.Generator().manual_seed(self.seed)

    @property
    def dev_every_epoch(self) -> bool:
        """Whether validation scores dev every epoch (else once, at the end, by the chosen weights)."""
        return self.select_on == "dev" or self.score_dev == "every_epoch"

    def val_targets(self) -> list[tuple[str, str]]:
        """(task, split) of each validation pass: dev (when scored every epoch), then the selection
        split and the train_eval sample where there are ones."""
        splits = ("dev", "select", "train_eval") if self.dev_every_epoch else ("select", "train_eval")
        return [(t, s) for s in splits for t in self.task_names if (t, s) in self.splits]

    def selection_record(self) -> dict:
        """What results.json says of how this run chose its best epoch."""
        rows = {t: len(self.splits[(t, "select")]) for t in self.task_names if (t, "select") in self.splits}
        if self.select_on == "dev":
            return {
                "on": "dev",
                "rule": "best epoch by dev avg (the study's protocol: selection reads the reported rows)",
            }
        return {
            "on": "select",
            "rows": rows,
            "size": self.selection,
            "seed": self.eval_seed,
            "rule": "best epoch by the mean main metric on the selection split, held out of training "
            "(stratified); dev is only scored",
        }

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task over its dev rows, then its selection split and train_eval sample (each
        batch says its split): a loader each would triple Lightning's per-loader cost every epoch."""
        loaders = []
        for task in self.task_names:
            parts = [
                EvalDataset(self.splits[(t, s)], self.eval_batch_size, self.pad_id, self.multiple, *self.shard())
                for t, s in self.val_targets()
                if t == task
            ]
            data = ConcatDataset(parts) if len(parts) > 1 else parts[0]
            loaders.append(
                DataLoader(
                    data, batch_size=None, shuffle=False, num_workers=self.num_workers, generator=self._generator()
                )
            )
        return loaders

    def predict_targets(self, splits: tuple[str, ...] = ("dev", "test")) -> list[tuple[str, str]]:
        """(task, split) pairs that predictions are written for, in dataloader order."""
        return [(t, s) for s in splits for t in self.task_names if (t, s) in self.splits]

    def predict_dataloader(self, splits: tuple[str, ...] = ("dev", "test")) -> list[DataLoader]:
        return [self.eval_dataloader(t, s) for t, s in self.predict_targets(splits)]
