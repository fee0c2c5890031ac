"""Small kernels-by-composition used by the encoder's training step.

On CPU, PyTorch's dropout draws its mask with `bernoulli_`, about 7 ns an element on this kind of
2-core machine, and SDPA with dropout falls back to a math path that also re-derives the mask from
the boolean attention mask in every layer. A BERT training step draws ~25M mask elements, so that
is a fifth of a MiniLM LoRA step. Here the mask comes from one 31-bit integer per element compared
with round(p * 2^31) (the same Bernoulli(1 - p) keep probability to 5e-10, at ~2.5 ns an element),
and CPU training attention is written out with an additive mask bias computed once per forward.
On CUDA both stay PyTorch's fused kernels.
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


def add_low_rank(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale * a b^T as one GEMM that accumulates into y (`addmm`): no separate scale and add passes.

    y: (..., out), a: (..., r), b: (out, r).
    """
    out = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), b.t(), alpha=scale)
    return out.view(y.shape)
