"""The encoder's own CPU kernels: dropout and training attention with a cheaper mask draw.

On CPU, PyTorch's dropout draws its mask with `bernoulli_`, and SDPA with dropout falls back to a
math path that also re-derives the mask from the boolean attention mask in every layer; a BERT
training step draws ~25M mask elements. Here the mask comes from one 31-bit integer per element
compared with round(p * 2^31) (the same Bernoulli(1 - p) keep probability to 5e-10, at about a
third of the cost: docs/speed.md), and CPU training attention is written out with an additive mask
bias (SDPA's math path, without its per-layer re-derivation checks on the boolean mask). On CUDA
both stay PyTorch's fused kernels.
These are the encoder's numerics whatever the adapter: no adapter and no fast-path code lives here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with a cheaper mask draw on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    keep = torch.empty(x.shape, dtype=torch.int32).random_() >= round(p * 2**31)  # P(keep) = 1 - p
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """`nn.Dropout` (same name, same state dict) that uses `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias(mask)) with dropout p, times v: what SDPA's math path computes.

    q: (B, heads, T, d); k, v: (B, heads, S, d); mask: bool, broadcastable to (B, heads, T, S),
    True = attend. For CPU training with dropout, where SDPA takes its math path anyway.
    """
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)) + bias  # (B, heads, T, S)
    probs = dropout(torch.softmax(scores, dim=-1), p, True)
    return torch.matmul(probs, v)
