"""The study's task towers, plus a cosine-similarity STS head (the study's future work).

- SST-5: pooled vector -> 2-layer MLP -> 5 logits.
- QQP: both sentences encoded separately, [u; v] -> 3-layer MLP -> 2 logits
  (with cross encoding the one pooled pair vector is the input). `pair_features=sbert` feeds
  [u; v; |u - v|; u * v] instead (Sentence-BERT's features), which makes similarity easy to learn.
- STS-B: same input as QQP -> 3-layer MLP -> one score; or `cosine`: 5 * cos(u, v), no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.tasks import Task


def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """Linear layers between consecutive `dims`, ReLU + dropout between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class CosineHead(nn.Module):
    """STS score as 5 * cos(u, v) of the two sentence vectors (Sentence-BERT style)."""

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        u, v = pooled
        return 5.0 * F.cosine_similarity(u, v, dim=-1)


PAIR_FEATURES = ("concat", "sbert")


def pair_input(pooled: list[torch.Tensor], features: str) -> torch.Tensor:
    if len(pooled) == 2 and features == "sbert":
        u, v = pooled
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)  # (B, 4 * hidden)
    return torch.cat(pooled, dim=-1)  # (B, n * hidden)


class TaskHead(nn.Module):
    """An MLP tower over the pooled vector(s) of one task; pairs are combined by `pair_input`."""

    def __init__(self, task: Task, hidden: int, n_inputs: int, dropout: float, pair_features: str = "concat"):
        super().__init__()
        width = hidden * (4 if n_inputs == 2 and pair_features == "sbert" else n_inputs)
        depth = [width, hidden] if task.kind == "single" else [width, hidden, hidden]
        self.net = mlp([*depth, task.num_labels], dropout)
        self.regression = task.is_regression
        self.pair_features = pair_features

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        out = self.net(pair_input(pooled, self.pair_features))
        return out.squeeze(-1) if self.regression else out  # (B,) score or (B, classes)


def build_heads(
    tasks: list[Task],
    hidden: int,
    pair_encoding: str = "separate",
    sts_head: str = "mlp",
    dropout: float = 0.1,
    pair_features: str = "concat",
) -> nn.ModuleDict:
    """One head per task, keyed by task name."""
    if pair_features not in PAIR_FEATURES:
        raise ValueError(f"model.pair_features={pair_features!r} is unknown; expected concat or sbert")
    if sts_head not in ("mlp", "cosine"):
        raise ValueError(f"model.sts_head={sts_head!r} is unknown; expected mlp or cosine")
    if sts_head == "cosine" and pair_encoding != "separate":
        raise ValueError("model.sts_head=cosine needs data.pair_encoding=separate (two sentence vectors)")
    heads = nn.ModuleDict()
    for task in tasks:
        n_inputs = 2 if task.is_pair and pair_encoding == "separate" else 1
        if task.name == "stsb" and sts_head == "cosine":
            heads[task.name] = CosineHead()
        else:
            heads[task.name] = TaskHead(task, hidden, n_inputs, dropout, pair_features)
    return heads
