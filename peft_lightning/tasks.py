"""The one place the facts of the three tasks live.

Every other module asks this file what a task's columns, label type, head size, loss and main
metric are; nothing else hard-codes `sst5`, `qqp` or `stsb` facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Task:
    """Static description of one task.

    Attributes:
        name: task key (`sst5`, `qqp`, `stsb`).
        kind: `single` (one sentence) or `pair` (two sentences).
        num_labels: classes for classification, 1 for regression.
        text_columns: TSV columns that hold the input text, in order.
        label_column: TSV column with the gold label (absent from test files).
        main_metric: the metric that enters `val/avg`.
        label_range: inclusive (low, high) range a label must lie in.
    """

    name: str
    kind: Literal["single", "pair"]
    num_labels: int
    text_columns: tuple[str, ...]
    label_column: str
    main_metric: str
    label_range: tuple[float, float]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return self.kind == "pair"

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MSE on the score (regression), cross-entropy on the logits (classification), in fp32."""
        if self.is_regression:
            return F.mse_loss(output.float(), labels.float())
        return F.cross_entropy(output.float(), labels.long())

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels as the metrics take them: scores as they are, classes as integers."""
        return labels if self.is_regression else labels.long()

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """A head's output as a prediction: the score (fp32), or the class with the highest logit."""
        return output.float() if self.is_regression else output.argmax(-1)


TASKS: dict[str, Task] = {
    "sst5": Task("sst5", "single", 5, ("sentence",), "label", "acc", (0, 4)),
    "qqp": Task("qqp", "pair", 2, ("sentence1", "sentence2"), "label", "acc", (0, 1)),
    "stsb": Task("stsb", "pair", 1, ("sentence1", "sentence2"), "score", "pearson", (0.0, 5.0)),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
SPLITS: tuple[str, ...] = ("train", "dev", "test")


def get_tasks(names: list[str] | tuple[str, ...] | None) -> list[Task]:
    """Return the tasks named, in canonical order; `None` means all three."""
    if names is None:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected a subset of {list(TASKS)}")
    if not names:
        raise ValueError("data.tasks is empty; name at least one of sst5, qqp, stsb")
    return [TASKS[n] for n in TASK_NAMES if n in names]
