"""`cast_packed`: many small trainable matrices cast to the autocast dtype in a few kernels, not one each.

Under 16-bit autocast every LoRA A and B would be cast separately, forward and backward (on
BERT-base ~200 tiny kernels a step). `cast_packed` gathers them into one buffer, casts once, and
scatters them into stacked or block-diagonal outputs (`CastLayout`), or into an `Arena`.
"""

from __future__ import annotations

import torch


class CastLayout:
    """Where `cast_packed` puts each tensor: each output stacks its inputs' rows or is block-diagonal.

    Built once per set of shapes; `index` (on the tensors' device) maps each element of the
    concatenated inputs to its place in the concatenated outputs, or is None when that is the
    identity (no block-diagonal output), which saves the scatter and the gather.

    Args:
        groups: one (kind, shapes) per output; kind `stack` concatenates the inputs' rows
            (`torch.cat`), `diag` is `torch.block_diag` of them; shapes are the 2-D shapes of the
            inputs it takes, in order.
    """

    def __init__(self, groups: list[tuple[str, list[tuple[int, int]]]]):
        self.shapes = [tuple(s) for _, g in groups for s in g]
        self.numels = [r * c for r, c in self.shapes]
        self.outputs: list[tuple[int, tuple[int, int]]] = []  # (numel, shape) of each output
        self.members: list[range] = []  # which inputs each output holds
        pieces, offset, identity = [], 0, True
        for kind, g in groups:
            start = sum(len(m) for m in self.members)
            self.members.append(range(start, start + len(g)))
            if kind == "stack" or len(g) == 1:
                if len({c for _, c in g}) != 1:
                    raise ValueError(f"CastLayout: stacked shapes {g} differ in columns")
                rows, cols = sum(r for r, _ in g), g[0][1]
                pieces.append(offset + torch.arange(rows * cols))
            elif kind == "diag":
                rows, cols = sum(r for r, _ in g), sum(c for _, c in g)
                r0 = c0 = 0
                for r, c in g:
                    pos = offset + (r0 + torch.arange(r))[:, None] * cols + (c0 + torch.arange(c))[None, :]
                    pieces.append(pos.reshape(-1))
                    r0, c0 = r0 + r, c0 + c
                identity = False
            else:
                raise ValueError(f"CastLayout: kind {kind!r} is unknown; expected stack or diag")
            self.outputs.append((rows * cols, (rows, cols)))
            offset += rows * cols
        self.size = offset
        self._index = None if identity else torch.cat(pieces)
        self._on: dict[torch.device, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor | None:
        if self._index is None:
            return None
        if device not in self._on:
            self._on[device] = self._index.to(device)
        return self._on[device]


class _CastPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: CastLayout, dtype: torch.dtype, into, *tensors):
        ctx.layout, ctx.dtype = layout, tensors[0].dtype
        ctx.set_materialize_grads(False)  # an output nobody used: its inputs get no gradient, as without packing
        src = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
        if into is not None:  # an Arena: write the values into it, hand out views of where they are
            # through `.data`, which leaves the version counter alone: a second pass before the backward
            # writes the same values again, and autograd must not take that for a change
            into.flat.data.index_copy_(0, into.index, src)
            return tuple(into.handles())
        index = layout.index(src.device)
        dst = src if index is None else src.new_zeros(layout.size).index_copy_(0, index, src)
        return tuple(v.view(shape) for v, (_, shape) in zip(dst.split([n for n, _ in layout.outputs]), layout.outputs))

    @staticmethod
    def backward(ctx, *grads):
        layout = ctx.layout
        if all(g is None for g in grads):
            return (None, None, None, *[None] * len(layout.shapes))
        some = next(g for g in grads if g is not None)
        flat = torch.cat(
            [some.new_zeros(n) if g is None else g.reshape(-1) for g, (n, _) in zip(grads, layout.outputs)]
        )
        index = layout.index(flat.device)
        if index is not None:
            flat = flat.index_select(0, index)
        flat = flat.to(ctx.dtype)
        out = [v.view(s) for v, s in zip(flat.split(layout.numels), layout.shapes)]
        for g, members in zip(grads, layout.members):
            if g is None:
                for i in members:
                    out[i] = None
        return (None, None, None, *out)


def cast_packed(
    layout: CastLayout, dtype: torch.dtype, tensors: list[torch.Tensor], into=None
) -> tuple[torch.Tensor, ...]:
    """The tensors cast to `dtype` and laid out as `layout` says, in a few kernels whatever their number.

    What autocast does to each trainable matrix separately (a cast kernel forward, another for its
    gradient), for all of them at once: forward one gather, one cast and (with block-diagonal outputs)
    one scatter; backward one gather, one index and one cast. LoRA's A and B matrices are ~100 small
    tensors on BERT-base: this takes a LoRA step from 1399 to 1154 dispatched ops (`peft-bench --bf16`).

    Args:
        layout: the `CastLayout` built for these tensors' shapes.
        dtype: the compute dtype (bf16 or fp16 under autocast).
        tensors: 2-D tensors of one dtype, in the layout's order.
        into: an `Arena` (`into.layout` is `layout`): scatter the values into its buffer instead
            (one gather, one cast, one scatter) and return views of it; None: new tensors.

    Returns:
        One tensor per layout output: its inputs' rows stacked, or their block-diagonal matrix.
    """
    if [tuple(t.shape) for t in tensors] != layout.shapes:
        raise ValueError(f"cast_packed: tensor shapes {[tuple(t.shape) for t in tensors]} != layout {layout.shapes}")
    return _CastPacked.apply(layout, dtype, into, *tensors)
