"""Rows held out of training to choose with (the selection split), and training rows scored like dev.

Model selection (the best epoch, peft-tune's learning rate) must not read the dev rows that a
report then scores: choosing on them biases the reported score upwards, more so the more
settings are searched (Chen et al., EMNLP 2022, on PEFT evaluation). So each task's training set
gives up a selection split before anything trains on it: `data.selection` rows (an int) or a
fraction of the set (a float below 1), drawn with `data.eval_seed` and stratified by label for
classification (by whole score points for STS-B) with scikit-learn's `train_test_split`. It is
disjoint from the rows trained on, the same for every seed and setting of a study, and capped at
a fifth of the training set. `data.select_on=dev` keeps the study's own protocol (best epoch by dev).

`data.train_eval` training rows (a seeded sample of the rows trained on) are evaluated in eval mode
at every epoch like dev, so a train - dev gap compares like with like.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

MAX_FRACTION = 0.2  # of a training set, at most, for the selection split


def selection_size(spec: int | float, n: int) -> int:
    """How many of `n` training rows the selection split takes: `spec` rows (int) or that fraction of
    `n` (float in (0, 1)), at most a fifth of them."""
    if (
        isinstance(spec, bool)
        or not isinstance(spec, (int, float))
        or spec < 0
        or (isinstance(spec, float) and spec >= 1)
    ):
        raise ValueError(
            f"data.selection must be a number of rows (an integer >= 0) or a fraction in (0, 1), got {spec!r}"
        )
    rows = int(spec) if isinstance(spec, int) else int(round(spec * n))
    return min(rows, int(MAX_FRACTION * n))


def split_off(labels: torch.Tensor | None, size: int, seed: int, regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept rows, selection rows) of a training set, both sorted: `size` rows drawn with `seed`,
    stratified by label (classification) or by whole score points (regression) where every stratum
    has two rows or more, else drawn plainly."""
    n = len(labels) if labels is not None else 0
    rows = np.arange(n)
    if size <= 0:
        return torch.from_numpy(rows), torch.zeros(0, dtype=torch.long)
    strata = labels.numpy().astype(np.int64) if not regression else np.floor(labels.numpy()).astype(np.int64)
    _, counts = np.unique(strata, return_counts=True)
    stratify = strata if counts.min() >= 2 and size >= len(counts) and n - size >= len(counts) else None
    keep, held = train_test_split(rows, test_size=size, random_state=seed, stratify=stratify)
    return torch.from_numpy(np.sort(keep)), torch.from_numpy(np.sort(held))


def sample(n: int, size: int, seed: int) -> torch.Tensor:
    """`size` of `n` rows (all of them when `size >= n`), sorted, drawn with `seed`."""
    if size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values
