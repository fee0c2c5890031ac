"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

Each target's weight is split into a magnitude (one number a row) and a direction, and LoRA
adapts the direction:

    W' = m * (W + g B A) / ||W + g B A||,     y = W' x + b,   A: (r, in), B: (out, r), m: (out,)

with the norm taken over each row (an output's weights). m starts at ||W||, B at zero, so the
wrapped model starts out identical to the pretrained one. As the paper (its section 4.3) and PEFT
do, the norm is a constant to backward: it follows B A in the forward pass but passes no gradient.
The rank, targets, scaling g, alpha, dropout and pooler options are LoRA's (`adapter=dora` takes
them all, PEFT's `LoraConfig(use_dora=True)` is the same adapter); with dropout, the low-rank
branch and the magnitude's rescaling see the dropped input as in PEFT:
y = W x + b + (m / n - 1) W d + (m / n) g B A d, d = dropout(x).

W' is never formed while training: y = (m / n) (W x + g B (A x)) + b, and the squared row norms
come from a rank-r product instead of a (out, in) sum:
||W + g B A||^2 = ||W||^2 + 2 g rowsum(B * (W A^T)) + g^2 rowsum((B A A^T) * B),
with ||W||^2 kept until W changes, and the norms computed once a step, not once an encoder pass.
Merging writes W' into W, as PEFT does; unmerging restores the exact frozen weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.adapters.fused_qkv import install_fused_qkv
from peft_lightning.adapters.low_rank import LowRankAdapter, LowRankLinear
from peft_lightning.encoder import BertEncoder
from peft_lightning.fastpath.kernels import low_rank_linear


class DoRALinear(LowRankLinear):
    """A frozen `nn.Linear` as trainable magnitude times a LoRA-adapted direction (see `LowRankLinear`
    for the arguments; dropout is on the adapted path's input, see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        self.magnitude = nn.Parameter(
            torch.linalg.vector_norm(base.weight.detach().float(), dim=1).to(base.weight.dtype)
        )
        self._w_sq: tuple[tuple, torch.Tensor] | None = None  # (W's identity, its squared row norms)
        self.keep_norm = False  # set by DoRA for one step's passes: weight_norm() is computed once
        self._norm: torch.Tensor | None = None

    def weight_norm(self) -> torch.Tensor:
        """||W + g B A|| of each row, in fp32, without gradient. Inside `DoRA.compute_dtype_weights`
        (one step's encoder passes: SST-5 and both sentences of QQP and STS-B, the same weights) it is
        computed once and kept until the context ends."""
        w, a, b = self.base.weight, self.lora_A, self.lora_B
        if torch.compiler.is_compiling():  # no cache in a graph: Inductor fuses the sums into the reads
            return self._weight_norm(w, a, b, torch.linalg.vector_norm(w.float(), dim=1).square())
        if self._norm is not None:
            return self._norm
        w_key = (w.data_ptr(), w._version, w.dtype, w.device)  # W is frozen: it changes by merge or load
        if self._w_sq is None or self._w_sq[0] != w_key:
            with torch.no_grad():
                self._w_sq = (w_key, torch.linalg.vector_norm(w.float(), dim=1).square())
        norm = self._weight_norm(w, a, b, self._w_sq[1])
        if self.keep_norm:
            self._norm = norm
        return norm

    def _weight_norm(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w_sq: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
            # W A^T in W's dtype (a bf16 W is not copied to fp32 each step; fp32 accumulation, and
            # this term is small beside ||W||^2), the rest in fp32
            wa = (a.to(w.dtype) @ w.T).float().T
            a, b = a.float(), b.float()
            cross = (b * wa).sum(1)  # rowsum(B * (W A^T))
            own = ((b @ (a @ a.T)) * b).sum(1)  # rowsum((B A A^T) * B) = ||B A||^2 by rows
            return (w_sq + 2 * self.scale * cross + self.scale**2 * own).clamp_min(0).sqrt()

    def factor(self) -> torch.Tensor:
        """m / ||W + g B A||: the number each output row is multiplied by."""
        return self.magnitude / self.weight_norm()

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        w, bias, a, b = self.base.weight, self.base.bias, self.lora_A, self.lora_B
        if not self.merged and (isinstance(self.dropout, nn.Identity) or not self.training):
            y = low_rank_linear(x, w, None, a, b, self.scale, gelu)  # W x + g B A x: LoRA's layer, no bias
            f = self.factor().to(y.dtype)
            return y * f if bias is None else torch.addcmul(bias.to(y.dtype), y, f)  # one pass: f y + b
        x = F.gelu(x) if gelu else x
        if self.merged:
            return self.base(x)
        d = self.dropout(x)
        wd = F.linear(d, w)
        f = self.factor().to(wd.dtype)
        return self.base(x) + (f - 1) * wd + f * (self.scale * F.linear(F.linear(d, a), b))

    def delta_weight(self) -> torch.Tensor:
        """W' - W."""
        w = self.base.weight
        merged = self.factor()[:, None] * (w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float()))
        return merged - w.float()

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.magnitude}


class DoRA(LowRankAdapter):
    """DoRA on the encoder's linear layers; everything else in the encoder is frozen.

    Args: LoRA's `rank`, `targets`, `scaling`, `alpha`, `dropout` and `include_pooler` (see
    `LowRankAdapter`).
    """

    name = "dora"

    def attach(self, encoder: BertEncoder) -> None:
        chosen = self.choose_targets(encoder)
        self.wrap(encoder, chosen, lambda name, layer: DoRALinear(layer, self.rank, self.scale, self.dropout_p))
        self.target_names = chosen
        install_fused_qkv(encoder)

    def peft_config(self) -> dict:
        return {**super().peft_config(), "use_dora": True}

    @contextlib.contextmanager
    def compute_dtype_weights(self):
        """One step's encoder passes: each layer's weight norm is computed once for all of them
        (A and B do not change within a step)."""
        for m in self.layers:
            m.keep_norm = True
        try:
            yield
        finally:
            for m in self.layers:
                m.keep_norm, m._norm = False, None
