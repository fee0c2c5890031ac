"""LoRA's frozen weights kept beside their A and B, so that a LoRA layer takes 6 GEMMs a step, not 8.

A LoRA layer y = x W^T + b + s (x A^T) B^T computed as written launches 3 GEMMs forward (x W^T,
x A^T, then the update into y) and 5 backward (g W, g B, the update into the input gradient, and
A's and B's gradients). Two of them are thin products that read a whole activation for r columns:
x A^T and g B. Here each layer's frozen W lives in one matrix with A below it and B beside it,

    [ W  B  0 ]     W: (O, in) frozen, B: (O, R), A: (R, in); Rp = R rounded up to 8 (aligned rows)
    [ A  0  0 ]     the matrix: (O + Rp, in + Rp), in the compute dtype

so x [W; A]^T gives y and x A^T in one GEMM, and g [W | B] gives g W and g B in one: 6 GEMMs.
(7 for the FFN's two layers, whose output or input gradient goes to GELU: see `_ArenaLinear`.)
A site is one LoRA layer, or several sharing an input (q, k, v: W stacked, A stacked, B
block-diagonal). All sites live in one flat buffer; the frozen layers' weights and biases become
views of it (no second copy), and each pass writes every A and B into it in three kernels
(`cast_packed(..., into=arena)`: one gather, one cast, one scatter), what casting them took anyway.

Used on LoRA's 16-bit autocast path when the frozen weights are in the compute dtype already
(bf16-mixed training stores them so, `store_frozen_in`); see `LoRA.compute_dtype_weights`. Its one
extra cost is the scatter index: 8 bytes per LoRA parameter (10 MB for r=8 on BERT-base).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from peft_lightning.fastpath.cast import CastLayout
from peft_lightning.fastpath.kernels import mm_scaled, round8


class Site(NamedTuple):
    offset: int  # of the matrix in the flat buffer
    bias_offset: int  # of its bias in the flat bias buffer
    rows: int  # O + Rp
    cols: int  # in + Rp
    outs: tuple[int, ...]  # out features of each member
    in_features: int
    ranks: tuple[int, ...]  # rank of each member
    has_bias: bool

    @property
    def out_features(self) -> int:
        return sum(self.outs)

    @property
    def rank(self) -> int:
        return sum(self.ranks)


class Arena:
    """One buffer of LoRA sites' [W B; A 0] matrices (see the module docstring) and their biases.

    Args:
        sites: per site, (out features of each member, in features, rank of each member, has bias).
        dtype: the compute dtype.
        device: where the buffer lives.
    """

    def __init__(self, sites: list[tuple[list[int], int, list[int], bool]], dtype: torch.dtype, device: torch.device):
        self.sites: list[Site] = []
        groups, pieces, offset, bias_offset = [], [], 0, 0
        for outs, in_f, ranks, has_bias in sites:
            n_out, R = sum(outs), sum(ranks)
            rows, cols = n_out + round8(R), in_f + round8(R)
            site = Site(offset, bias_offset, rows, cols, tuple(outs), in_f, tuple(ranks), has_bias)
            self.sites.append(site)
            r0 = 0  # A of each member: rows O + r0 .., columns 0 .. in
            for r in ranks:
                pieces.append(offset + (n_out + r0 + torch.arange(r))[:, None] * cols + torch.arange(in_f)[None, :])
                r0 += r
            o0 = r0 = 0  # B of each member: rows o0 .., columns in + r0 .. (block-diagonal)
            for o, r in zip(outs, ranks):
                pieces.append(offset + (o0 + torch.arange(o))[:, None] * cols + (in_f + r0 + torch.arange(r))[None, :])
                o0, r0 = o0 + o, r0 + r
            groups += [("stack", [(r, in_f) for r in ranks]), ("diag", [(o, r) for o, r in zip(outs, ranks)])]
            offset += round8(rows * cols)  # every matrix starts 16-byte aligned
            bias_offset += round8(rows) if has_bias else 0
        self.flat = torch.zeros(offset, dtype=dtype, device=device)
        self.bias_flat = torch.zeros(bias_offset, dtype=dtype, device=device)
        self.index = torch.cat([p.reshape(-1) for p in pieces]).to(device)  # A/B element -> place in `flat`
        self.layout = CastLayout(groups)  # the layout of the handles: stacked A, block-diagonal B per site
        self.views = [ArenaSite.of(self, i) for i in range(len(self.sites))]

    def matrix(self, i: int) -> torch.Tensor:
        s = self.sites[i]
        return self.flat[s.offset : s.offset + s.rows * s.cols].view(s.rows, s.cols)

    def bias(self, i: int) -> torch.Tensor | None:
        s = self.sites[i]
        return self.bias_flat[s.bias_offset : s.bias_offset + s.rows] if s.has_bias else None

    def member_rows(self, i: int) -> list[slice]:
        """The rows of the matrix (and bias) that hold each member's frozen W (and b)."""
        out, o0 = [], 0
        for o in self.sites[i].outs:
            out.append(slice(o0, o0 + o))
            o0 += o
        return out

    def handles(self) -> list[torch.Tensor]:
        """New views of every site's A region (R, in) and B region (O, R), in the layout's order."""
        return [t.view_as(t) for v in self.views for t in (v.a, v.b)]


class ArenaSite(NamedTuple):
    """Views of one site's matrix that its products read, made once (the arena is written in place)."""

    wa_t: torch.Tensor  # [W; A; 0]^T: (in, O + Rp)
    b_t: torch.Tensor  # B^T: (R, O)
    wb: torch.Tensor  # [W | B | 0]: (O, in + Rp); the zero columns keep g [W | B] rows 16-byte aligned
    b: torch.Tensor  # B: (O, R)
    a: torch.Tensor  # A: (R, in)
    bias: torch.Tensor | None  # (O + Rp,)
    out_features: int  # O
    rank: int  # R
    in_features: int

    @classmethod
    def of(cls, arena: Arena, i: int) -> ArenaSite:
        s, m = arena.sites[i], arena.matrix(i)
        o, r, n = s.out_features, s.rank, s.in_features
        return cls(m[:, :n].t(), m[:o, n : n + r].t(), m[:o], m[:o, n : n + r], m[o : o + r, :n],
                   arena.bias(i), o, r, n)  # fmt: skip


class ArenaCast(NamedTuple):
    """What a LoRA site computes with for one pass: A and B as views of the arena that carry their
    gradients back to the fp32 parameters (from `cast_packed(..., into=arena)`), and its `ArenaSite`."""

    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (O, R)
    site: ArenaSite
    concat: bool = False  # fold the rank-R updates of the wide side into the frozen GEMM (`_ArenaLinear`)


class _ArenaLinear(torch.autograd.Function):
    """`low_rank_linear` on an arena site: y = act(x) W^T + b + s (act(x) A^T) B^T in 6 GEMMs.

    The operands are read from the site's views; `a` and `b` are only there to take their
    gradients. Saves x and the (N, R) product z = act(x) A^T, as `_LowRankLinear` does. z comes
    out of the same GEMM as y and shares its storage: when the caller keeps y for its own backward
    anyway (`keep_output`), z is saved as that view, else it is copied out so that y's storage can go.

    The price of the shared GEMMs is strided outputs: y is a view with rows of O + Rp, and so is the
    input gradient (in + Rp). Elementwise kernels on such views are not vectorised: on an H100 at
    B=32 a GELU took 2.1x, its backward 1.5x and dropout 2.1x their time on contiguous tensors
    (multirun/reports/bench/h100-run3-profile). So the two places where GELU meets them take one
    GEMM more each: `contiguous_output` (the FFN's first layer, whose output goes to GELU) computes
    y apart from z, and with `gelu` (the FFN's second layer) the input gradient, which goes to GELU's
    backward, is computed apart from g B.

    With `concat`, the rank-R update of the wider side is folded into the frozen GEMM instead of
    being added by a GEMM of its own (K = R, `addmm_`), which reads and writes that whole side:
    - forward, when O >= in (q/k/v, attention output, the FFN's first layer; not with GELU in
      front): y = [h | s z] [W | B | 0]^T, with z = h [A; 0]^T computed first (N, Rp);
    - backward, when in > O (the FFN's second layer): dx = [g | s g B] [W; A; 0].
    The cost is a copy of the narrower side into the concatenation (`cat`, contiguous and
    vectorised) and, forward, z in a GEMM of its own. On run 3's H100 profile at B=32 the K = R
    updates into the (N, 3072) sides took ~130 us each, 2x a copy's memory time, the q/k/v one
    ~90 us, while a copy of an (N, 768) side is ~20 us; and y comes out contiguous (dropout on the
    attention output's y, strided, took 2.1x). Off by default until a GPU measures it.
    """

    @staticmethod
    def forward(ctx, x, a, b, site: ArenaSite, scale: float, gelu: bool, keep_output: bool, contiguous_output: bool,
                concat: bool):  # fmt: skip
        o, r, n = site.out_features, site.rank, site.in_features
        x2 = x.reshape(-1, n)
        h = F.gelu(x2) if gelu else x2
        fold = concat and not gelu and o >= n
        if fold:  # y = [h | s z] [W | B | 0]^T: the update inside the frozen GEMM, y contiguous
            rp = site.wb.shape[1] - n
            z = mm_scaled(h, site.wa_t.narrow(1, o, rp), scale)  # (N, Rp): s h [A; 0]^T, zero beyond R
            hz = torch.cat([h, z], 1)  # (N, in + Rp)
            y = F.linear(hz, site.wb, _narrow(site.bias, o))
            z = z.narrow(1, 0, r)  # saved as s z: B's gradient g^T (s z) needs no scaling then
        elif contiguous_output:  # y = h W^T + b and z = h A^T apart: y comes out contiguous
            w_t, a_t = site.wa_t.narrow(1, 0, o), site.wa_t.narrow(1, o, r)
            y = F.linear(h, w_t.t(), _narrow(site.bias, o))
            z = torch.mm(h, a_t)  # its own storage: saved as it is
        else:
            # (N, O + Rp)
            yz = F.linear(h, site.wa_t.t(), site.bias)
            y, z = yz.narrow(1, 0, o), yz.narrow(1, o, r)
            z = z if keep_output else z.clone()
        if not fold:
            y.addmm_(z, site.b_t, alpha=scale)  # + s z B^T, in place: no extra pass over y
        if any(ctx.needs_input_grad):  # not when evaluating
            needs_x = ctx.needs_input_grad[0]
            fold_back = concat and needs_x and n > o
            ctx.save_for_backward(x2, z, site.wb if needs_x else site.b, site.a, site.wa_t if fold_back else None)
            ctx.scale, ctx.gelu, ctx.dims, ctx.x_shape = scale, gelu, (o, r, n), x.shape
            ctx.z_scaled, ctx.fold_back = fold, fold_back
        return y.view(*x.shape[:-1], o)

    @staticmethod
    def backward(ctx, grad_y):
        x2, z, w, a, wa_t = ctx.saved_tensors  # x2: the input as (N, in); w: [W | B | 0], or B alone
        o, r, n = ctx.dims
        g = grad_y.reshape(-1, o)
        needs_x = ctx.needs_input_grad[0]
        if ctx.fold_back:  # dx = [g | s g B] [W; A; 0]: the update inside the frozen GEMM, dx contiguous
            g_a = mm_scaled(g, w.narrow(1, n, w.shape[1] - n), ctx.scale)  # (N, Rp): s g [B | 0], zero beyond R
            gx = torch.mm(torch.cat([g, g_a], 1), wa_t.t())
            g_a = g_a.narrow(1, 0, r)
        elif needs_x and ctx.gelu:  # g W and g B apart: GELU's backward gets a contiguous gradient
            gx, g_a = torch.mm(g, w.narrow(1, 0, n)), mm_scaled(g, w.narrow(1, n, r), ctx.scale)
        elif needs_x:
            # [g W | g B | 0]: (N, in + Rp). The input gradient is a view of it, and its rows must
            # start 16-byte aligned: cuDNN attention's backward reads the attention output's input
            # gradient, and with rows of in + R a rank such as 4 gave 'misaligned address' on an H100.
            gx_ga = torch.mm(g, w)
            gx, g_a = gx_ga.narrow(1, 0, n), gx_ga.narrow(1, n, r)
            if ctx.scale != 1.0:
                g_a.mul_(ctx.scale)  # its columns only
        else:  # the first layer's input needs no gradient: only g B
            g_a = mm_scaled(g, w, ctx.scale)
        grad_b = mm_scaled(g.t(), z, 1.0 if ctx.z_scaled else ctx.scale)  # (O, R)
        grad_a = torch.mm(g_a.t(), F.gelu(x2) if ctx.gelu else x2)  # (R, in)
        grad_x = None
        if needs_x:
            grad_x = gx if ctx.fold_back else gx.addmm_(g_a, a)  # g W + s g B A
            if ctx.gelu:
                grad_x = torch.ops.aten.gelu_backward(grad_x, x2)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None


def _narrow(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if bias is None else bias.narrow(0, 0, n)


def arena_linear(
    x: torch.Tensor,
    cast: ArenaCast,
    scale: float,
    gelu: bool = False,
    keep_output: bool = False,
    contiguous_output: bool = False,
):
    """A LoRA layer (or q/k/v together) on its arena site: `act(x) W^T + b + scale * act(x) A^T B^T`.

    Args:
        x: (..., in); the pre-activation when `gelu`. Cast to the arena's dtype if it is not.
        cast: the site's `ArenaCast` for this pass.
        scale: the LoRA scale.
        gelu: apply GELU to `x` first (recomputed in backward, not kept).
        keep_output: the caller keeps the output for its backward (then the saved product is a view).
        contiguous_output: one GEMM more for a contiguous output (for an output that goes to GELU).

    Returns:
        (..., O): a view with row stride O + Rp, or contiguous with `contiguous_output` (or folded,
        see `_ArenaLinear`'s `concat`).
    """
    dtype = cast.site.wa_t.dtype
    if x.dtype != dtype:
        x = x.to(dtype)
    return _ArenaLinear.apply(x, cast.a, cast.b, cast.site, scale, gelu, keep_output, contiguous_output, cast.concat)
