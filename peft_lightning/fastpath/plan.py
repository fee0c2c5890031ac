"""Where LoRA's casts go for one pass: whether a layer fits an `Arena`, and moving frozen weights into one.

A layer here is the small wrapped-layer protocol: `base` (the frozen nn.Linear), `rank`, `dropout`.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_lightning.fastpath.arena import Arena, ArenaSite


def fits_arena(m: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the layer's frozen weight and bias are in `dtype` already, its branch has no dropout, and
    its widths are multiples of 8 (the arena's views, and the gradients made from them, then have
    16-byte-aligned rows, which cuDNN attention needs of its inputs)."""
    base = m.base
    return (
        isinstance(m.dropout, nn.Identity)
        and base.in_features % 8 == 0
        and base.out_features % 8 == 0
        and base.weight.dtype == dtype
        and not base.weight.requires_grad
        and (base.bias is None or (base.bias.dtype == dtype and not base.bias.requires_grad))
    )


@torch.no_grad()
def move_into_arena(sites: list[tuple[nn.Module, ...]], dtype: torch.dtype) -> tuple[Arena, list[ArenaSite]]:
    """An `Arena` for these sites; each frozen weight and bias becomes a view of it (no second copy).

    Returns the arena and each site's `ArenaSite` (`arena.views`).
    """
    device = sites[0][0].base.weight.device
    arena = Arena(
        [
            ([m.base.out_features for m in ms], ms[0].base.in_features, [m.rank for m in ms],
             any(m.base.bias is not None for m in ms))
            for ms in sites
        ],
        dtype,
        device,
    )  # fmt: skip
    for i, members in enumerate(sites):
        matrix, bias = arena.matrix(i), arena.bias(i)
        for m, rows in zip(members, arena.member_rows(i)):
            w = matrix[rows, : m.base.in_features]
            w.copy_(m.base.weight)
            m.base.weight.data = w
            if m.base.bias is not None:
                bias[rows].copy_(m.base.bias)
                m.base.bias.data = bias[rows]
    return arena, arena.views
