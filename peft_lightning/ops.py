"""Small kernels-by-composition used by the encoder's training step.

On CPU, PyTorch's dropout draws its mask with `bernoulli_`, about 7 ns an element on this kind of
2-core machine, and SDPA with dropout falls back to a math path that also re-derives the mask from
the boolean attention mask in every layer. A BERT training step draws ~25M mask elements, so that
is a fifth of a MiniLM LoRA step. Here the mask comes from one 31-bit integer per element compared
with round(p * 2^31) (the same Bernoulli(1 - p) keep probability to 5e-10, at ~2.5 ns an element),
and CPU training attention is written out with an additive mask bias (SDPA's math path, without
its per-layer re-derivation checks on the boolean mask).
On CUDA both stay PyTorch's fused kernels.

Also here: each LoRA linear as one autograd function (`low_rank_linear`), and `cast_packed`, which
casts many small trainable matrices to the autocast dtype in a few kernels instead of one each.
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


def mm_scaled(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * a b, the scale applied in the GEMM's fp32 epilogue (one rounding, no extra kernel)."""
    if scale == 1.0:
        return torch.mm(a, b)
    return torch.addmm(a.new_empty(()), a, b, beta=0.0, alpha=scale)  # beta = 0: the input is not read


class _LowRankLinear(torch.autograd.Function):
    """y = act(x) W^T + b + s (act(x) A^T) B^T with W, b frozen; act is identity or GELU.

    Saves only x and the (N, r) product a = act(x) A^T: with GELU in front (FFN output layer), the
    (N, 3072) GELU output that autograd would keep for A's gradient is recomputed instead, which is
    LoRA's one real activation saving over full fine-tuning. The backward writes the input gradient
    once (g W, then g_a A accumulated in place) and skips it when the input needs no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, gelu: bool):
        h = F.gelu(x) if gelu else x
        h2 = h.reshape(-1, h.shape[-1])
        a = torch.mm(h2, lora_a.t())  # (N, r); torch.mm, not @: no Python-level operator wrapper
        y = torch.addmm(bias, h2, weight.t()) if bias is not None else torch.mm(h2, weight.t())
        y.addmm_(a, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, a)
        ctx.scale, ctx.gelu = scale, gelu
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, a = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_b = mm_scaled(g.t(), a, ctx.scale)  # (out, r)
        g_a = mm_scaled(g, lora_b, ctx.scale)  # (N, r)
        h = F.gelu(x) if ctx.gelu else x
        grad_a = torch.mm(g_a.t(), h.reshape(-1, h.shape[-1]))  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(g_a, lora_a).view(x.shape)
            if ctx.gelu:
                grad_x = torch.ops.aten.gelu_backward(grad_x, x)
        return grad_x, None, None, grad_a, grad_b, None, None


def round8(n: int) -> int:
    """n rounded up to a multiple of 8 (16-byte rows in 16-bit dtypes)."""
    return -(-n // 8) * 8


class _ConcatLowRankLinear(torch.autograd.Function):
    """y = act(x) W^T + b + s (act(x) A^T) B^T as [h | z] [W | s B]^T, for torch.compile.

    Written for Inductor: the rank-r products are concatenated to the activations so that the
    frozen GEMM computes the update in the same product, forward ([h | z] [W | s B]^T, K = in + Rp)
    and backward ([g | g_z] [W; A], K = out + Rp), instead of an extra rank-r GEMM that reads and
    writes the whole output (forward) or input gradient (backward). Inductor lowers each `cat` into
    its inputs' storage where it can: the producer of h (a LayerNorm, a GELU) and of g (the next
    layer's backward) write straight into the concatenated buffer, and only the (N, Rp) products
    and the frozen weights are copied. Eager, the cats are copies: `low_rank_linear` uses this only
    when compiling. Ranks are padded to Rp, a multiple of 8, with zeros (16-byte aligned rows).
    Saves x and z, as `_LowRankLinear`; with GELU in front, h = GELU(x) is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, gelu: bool):
        n, r = x.shape[-1], lora_a.shape[0]
        pad = round8(r) - r
        a = F.pad(lora_a, (0, 0, 0, pad))  # (Rp, in)
        b = F.pad(lora_b, (0, pad))  # (out, Rp)
        h = F.gelu(x) if gelu else x
        h2 = h.reshape(-1, n)
        z = torch.mm(h2, a.t())  # (N, Rp)
        wb = torch.cat([weight, b * scale], 1)  # (out, in + Rp)
        hz = torch.cat([h2, z], 1)
        y = torch.addmm(bias, hz, wb.t()) if bias is not None else torch.mm(hz, wb.t())
        ctx.save_for_backward(x, weight, a, b, z)
        ctx.scale, ctx.gelu, ctx.rank = scale, gelu, r
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, a, b, z = ctx.saved_tensors
        r = ctx.rank
        g = grad_y.reshape(-1, grad_y.shape[-1])
        g_z = mm_scaled(g, b, ctx.scale)  # (N, Rp): the gradient of z
        grad_b = mm_scaled(g.t(), z[:, :r], ctx.scale)  # (out, r)
        h = F.gelu(x) if ctx.gelu else x
        grad_a = torch.mm(g_z[:, :r].t(), h.reshape(-1, h.shape[-1]))  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(torch.cat([g, g_z], 1), torch.cat([weight, a], 0)).view(x.shape)  # g W + g_z A
            if ctx.gelu:
                grad_x = torch.ops.aten.gelu_backward(grad_x, x)
        return grad_x, None, None, grad_a, grad_b, None, None


def low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    gelu: bool = False,
    concat: bool = False,
) -> torch.Tensor:
    """A LoRA linear layer, optionally with GELU in front: `act(x) W^T + b + scale * act(x) A^T B^T`.

    Under autocast every operand is cast to the autocast dtype first, as `F.linear` would. Under
    torch.compile (or with a trainable W or b) the plain composition is used instead: Inductor fuses
    and rematerialises it itself; or, with `concat`, `_ConcatLowRankLinear`, which folds the rank-r
    update into the frozen GEMM forward and backward.

    Args:
        x: (..., in); the pre-activation when `gelu`.
        weight: (out, in), frozen.
        bias: (out,) or None, frozen.
        lora_a: (r, in).
        lora_b: (out, r).
        scale: the LoRA scale g.
        gelu: apply GELU to `x` first (recomputed in backward, not kept).
        concat: under torch.compile, the concatenated form (`_ConcatLowRankLinear`).

    Returns:
        (..., out).
    """
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    compiling = torch.compiler.is_compiling()
    if not frozen or (compiling and not concat):
        h = F.gelu(x) if gelu else x
        return add_low_rank(F.linear(h, weight, bias), F.linear(h, lora_a), lora_b, scale)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # every operand in the compute dtype (A and B usually arrive cast already, see LoRA's
        # compute_dtype_weights); autocast then leaves the function's ops as they are
        dtype = torch.get_autocast_dtype(device)
        x, weight, bias, lora_a, lora_b = (
            t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, weight, bias, lora_a, lora_b)
        )
    fn = _ConcatLowRankLinear if compiling else _LowRankLinear
    return fn.apply(x, weight, bias, lora_a, lora_b, scale, gelu)


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
