"""q, k and v of an attention layer as one product: the seam the adapters install in the encoder.

The three projections share their input, so [Wq; Wk; Wv] x is one (3h x h) product instead of
three. With LoRA (or DoRA) on all three, [Aq; Ak; Av] x is one product and blockdiag(Bq, Bk, Bv)
another; DoRA's magnitudes are then one addcmul, (IA)^3's output scales one multiply. Each
strategy's `attach` ends with `install_fused_qkv(encoder)`, which puts a `FusedQKV` in every attention
whose three layers can share the product, and leaves `qkv` unset where they cannot (LoRA on some
of them only, LoRA dropout, (IA)^3 rescaling an input): those run as three layers.

A wrapped layer takes part through the wrapped-layer protocol (`adapters.base`): `base`, and for
low-rank layers `lora_A`, `lora_B`, `rank`, `scale`, `merged`, `concat` and, for DoRA, `factor()`;
for output-scaling layers `output_scale()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.encoder import BertSelfAttention
from peft_lightning.fastpath.arena import ArenaCast, arena_linear
from peft_lightning.fastpath.kernels import low_rank_linear


class FusedQKV(nn.Module):
    """h -> (q, k, v) of one attention layer in one product (see the module docstring).

    Args:
        attention: the `BertSelfAttention` whose `query`, `key` and `value` this computes; they stay
            its own submodules (a plain reference here: no parameters are registered twice).
        low_rank: the three are low-rank layers of one rank and scale (LoRA or DoRA).
    """

    def __init__(self, attention: nn.Module, low_rank: bool):
        super().__init__()
        self._attention = [attention]
        self.low_rank = low_rank
        self._frozen: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        # set by LoRA for one pass: [Aq; Ak; Av] and blockdiag(B) in the autocast dtype, or their Arena place
        self.cast: tuple[torch.Tensor, torch.Tensor] | ArenaCast | None = None

    def layers(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        a = self._attention[0]
        return a.query, a.key, a.value

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mods = self.layers()
        if self.low_rank and len({m.merged for m in mods}) > 1:  # never in training: merge is all or none
            return mods[0](h), mods[1](h), mods[2](h)
        if self.low_rank and isinstance(self.cast, ArenaCast):
            return arena_linear(h, self.cast, mods[0].scale, keep_output=True).chunk(3, dim=-1)
        bases = [getattr(m, "base", m) for m in mods]
        weight, bias = self._stacked(bases)
        if self.low_rank and not mods[0].merged:
            if self.cast is not None:
                a, b = self.cast
            else:
                a = torch.cat([m.lora_A for m in mods])  # (3r, hidden)
                b = torch.block_diag(*[m.lora_B for m in mods])  # (3 hidden, 3r)
            # DoRA: each output row times m / ||W + g B A||, then the bias (one addcmul for the three)
            factors = [m.factor() for m in mods] if hasattr(mods[0], "factor") else None
            out = low_rank_linear(h, weight, None if factors else bias, a, b, mods[0].scale, concat=mods[0].concat)
            if factors:
                out = torch.addcmul(bias.to(out.dtype), out, torch.cat(factors).to(out.dtype))
        else:
            out = F.linear(h, weight, bias)  # (B, T, 3 * hidden)
            scales = [m.output_scale() if hasattr(m, "output_scale") else None for m in mods]
            if any(s is not None for s in scales):  # (IA)^3 on some of q, k, v: one multiply for the three
                ones = [out.new_ones(b.out_features) for b in bases]
                out = out * torch.cat([o if s is None else s.to(out.dtype) for s, o in zip(scales, ones)])
        return out.chunk(3, dim=-1)

    def _stacked(self, bases: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        weights, biases = [b.weight for b in bases], [b.bias for b in bases]
        if any(p.requires_grad for p in weights) or torch.compiler.is_compiling():  # compile fuses the cat
            return torch.cat(weights), torch.cat(biases)
        # frozen weights: stack once, again only if one changed in place (LoRA merge / unmerge, loading);
        # biases that train (BitFit) are stacked each pass, frozen ones with the weights
        trained_bias = any(p.requires_grad for p in biases)
        params = weights if trained_bias else weights + biases
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, torch.cat(weights).detach(), None if trained_bias else torch.cat(biases).detach())
        return self._frozen[1], torch.cat(biases) if trained_bias else self._frozen[2]

    def extra_repr(self) -> str:
        return f"low_rank={self.low_rank}"


def can_fuse(mods: tuple[nn.Module, ...]) -> tuple[bool, bool]:
    """(fusable, low_rank) for an attention's query, key and value."""
    if all(getattr(m, "shares_qkv_product", False) for m in mods):
        same = len({(m.rank, m.scale) for m in mods}) == 1
        no_dropout = all(isinstance(m.dropout, nn.Identity) for m in mods)
        return same and no_dropout, True
    # a plain layer, or one that only rescales its output ((IA)^3), can share the stacked GEMM
    plain = all(isinstance(m, nn.Linear) or (hasattr(m, "output_scale") and not m.feedforward) for m in mods)
    return plain, False


def install_fused_qkv(encoder: nn.Module) -> list[FusedQKV]:
    """Put a `FusedQKV` in each attention of `encoder` whose q, k, v can share one product (and none
    in the others); returns those installed."""
    installed = []
    for attn in [m for m in encoder.modules() if isinstance(m, BertSelfAttention)]:
        fusable, low_rank = can_fuse((attn.query, attn.key, attn.value))
        attn.qkv = FusedQKV(attn, low_rank) if fusable else None
        if fusable:
            installed.append(attn.qkv)
    return installed
