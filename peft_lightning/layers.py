"""The encoder's own CPU kernels: dropout and training attention with a cheaper mask draw.

On CPU, PyTorch's dropout draws its mask with `bernoulli_`, and SDPA with dropout falls back to a
math path that also re-derives the mask from the boolean attention mask in every layer; a BERT
training step draws ~25M mask elements. Here each mask element is a 15-bit lane of a 64-bit
`random_` draw (four lanes a word, the sign bit of each cleared) compared with q = round(p * 2^15):
an element is dropped with probability q / 2^15 (0.100006 for p = 0.1) and the kept ones are scaled
by 1 / (1 - q / 2^15), so the output's expectation is its input (in fp32; a bf16 tensor's scale is
rounded to bf16, as in PyTorch's own dropout). One 64-bit draw serves four elements where the
draw before took a 31-bit integer for each (kept for a p that 15 bits cannot hold to 0.1%, such
as 1e-4): about 1.5-2.5 ns an element against 2.5-5 before and 7-8 for `bernoulli_` (docs/speed.md).
CPU training attention is written out with an additive mask bias (SDPA's math path, without its
per-layer re-derivation checks on the boolean mask). On CUDA both stay PyTorch's fused kernels.
These are the encoder's numerics whatever the adapter: no adapter and no fast-path code lives here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with a cheaper mask draw on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    keep, p = keep_mask(x.shape, p)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


LANE = 2**15  # a mask element: 15 random bits


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask of `shape`, each element False (dropped) with probability p', and p': q / 2^15
    with q = round(p * 2^15) where that is within 0.1% of p, else round(p * 2^31) / 2^31."""
    n, q = math.prod(shape), round(p * LANE)
    if q > 0 and abs(q / LANE - p) <= 1e-3 * p:
        lanes = torch.empty(-(-n // 4), dtype=torch.int64).random_().view(torch.int16)[:n]
        return lanes.bitwise_and_(LANE - 1).ge(q).view(shape), q / LANE
    q = round(p * 2**31)
    return torch.empty(shape, dtype=torch.int32).random_() >= q, q / 2**31


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
