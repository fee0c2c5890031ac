"""Each LoRA linear layer as one autograd function (`low_rank_linear`), and its small GEMM helpers.

A LoRA layer y = act(x) W^T + b + s (act(x) A^T) B^T computed by autograd keeps act(x) for A's
gradient and writes the input gradient twice; `_LowRankLinear` keeps x and the (N, r) product
only, and accumulates the input gradient in place. Under torch.compile, `_ConcatLowRankLinear`
folds the rank-r update into the frozen GEMM. Works on tensors only: no model or adapter import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
