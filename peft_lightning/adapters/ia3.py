"""(IA)^3: learned vectors that rescale activations of frozen linear layers (Liu et al. 2022, arXiv:2205.05638).

    y = (W x + b) * l      (a target layer: its output rescaled, l: (out,))
    y = W (x * l) + b      (a feed-forward target: its input rescaled, l: (in,))

Everything else in the encoder is frozen; every l starts at one, so the wrapped model starts out
identical to the pretrained one. The defaults are PEFT's for BERT: targets `key`, `value` and
`output.dense`, the last also a feed-forward target. Patterns match like LoRA's (a module whose
dotted name equals the pattern or ends with `.pattern`, `re:<regex>`, the aliases), so `output.dense`
is both the attention output and the FFN output layer, as in PEFT: (IA)^3 then rescales k, v, the
attention context and the FFN's inner activation. On BERT-base that is 64,512 trainable numbers.
Merging multiplies l into W (and b), as PEFT does; unmerging restores the exact frozen weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.adapters.base import LayerAdapter, expand_targets, freeze, linear_names, matches
from peft_lightning.adapters.fused_qkv import install_fused_qkv
from peft_lightning.encoder import BertEncoder


class IA3Linear(nn.Module):
    """A frozen `nn.Linear` whose output (or, for a feed-forward target, input) is rescaled by `ia3_l`.

    Args:
        base: the linear layer to wrap (kept inside, frozen).
        feedforward: rescale the input (in features) instead of the output (out features).
    """

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        self.base = base
        freeze(base)
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=base.weight.dtype, device=base.weight.device))
        self._saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def merged(self) -> bool:
        return self._saved is not None

    def output_scale(self) -> torch.Tensor | None:
        """The vector that multiplies this layer's output, or None (feed-forward target, or merged)."""
        return None if self.feedforward or self.merged else self.ia3_l

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        h = F.gelu(x) if gelu else x
        if self.merged:
            return self.base(h)
        if self.feedforward:
            return self.base(h * self.ia3_l.to(h.dtype))
        y = self.base(h)
        return y * self.ia3_l.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.base.weight.dtype in (torch.bfloat16, torch.float16):
            return  # as LoRA: a 16-bit frozen weight would round the update; stay unmerged
        w, b = self.base.weight, self.base.bias
        self._saved = (w.detach().clone(), None if b is None else b.detach().clone())
        if self.feedforward:
            w.mul_(self.ia3_l[None, :])
        else:
            w.mul_(self.ia3_l[:, None])
            if b is not None:
                b.mul_(self.ia3_l)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w, b = self._saved
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        self._saved = None

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}"


class IA3(LayerAdapter):
    """(IA)^3 on the encoder's linear layers; everything else in the encoder is frozen.

    Args:
        targets: name patterns or aliases of the layers to rescale (see LoRA); default PEFT's for BERT.
        feedforward: which of the targets rescale their input instead of their output.
    """

    name = "ia3"

    def __init__(
        self,
        targets: list[str] | str = ("key", "value", "output.dense"),
        feedforward: list[str] | str = ("output.dense",),
    ):
        super().__init__()
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.feedforward = [feedforward] if isinstance(feedforward, str) else list(feedforward)
        self.layers: list[IA3Linear] = []  # plain list: the modules live in the encoder
        self.target_names: list[str] = []

    def attach(self, encoder: BertEncoder) -> None:
        freeze(encoder)
        chosen = self.select(encoder, self.targets, pooler=False)
        ff = expand_targets(self.feedforward)
        stray = [n for n in linear_names(encoder) if matches(n, ff) and n not in chosen]
        if stray:
            raise ValueError(f"adapter.feedforward must be among the targets; {stray[0]} is not a target")
        self.wrap(encoder, chosen, lambda name, layer: IA3Linear(layer, feedforward=matches(name, ff)))
        self.target_names = chosen
        install_fused_qkv(encoder)

    def describe(self) -> dict:
        return {"name": self.name, "targets": self.target_names, "feedforward": self.feedforward}

    def peft_config(self) -> dict:
        """PEFT's `IA3Config` fields: the targets and which of them rescale their input."""
        ff = [n for n, m in zip(self.target_names, self.layers) if m.feedforward]
        return {"peft_type": "IA3", "target_modules": list(self.target_names), "feedforward_modules": ff}
