"""Bottleneck adapters: a small residual MLP after a sublayer's output projection.

    a(y) = y + W_up f(W_down y + b_down) + b_up      (W_down: (m, h), W_up: (h, m), m << h)

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751) put one
after the attention output projection and one after the feed-forward output projection of every
layer; Pfeiffer et al. 2021 ("AdapterFusion", arXiv:2005.00247) keep only the feed-forward one.
Here the adapter reads the projection's output y (`attention.output.dense`, the FFN's
`output.dense`), before the layer's dropout, residual sum and LayerNorm, which stay the pretrained
ones: `LayerNorm(x + dropout(a(W x + b)))`.

Initialisation: W_down as an `nn.Linear`'s default (Kaiming-uniform), W_up and both biases zero, so
a(y) = y exactly and the adapted encoder starts out identical to the pretrained one (Houlsby et al.
draw both near zero for a near-identity start; a zero up-projection makes it exact, as LoRA's zero B
does, and W_down gets gradients once W_up has moved from zero). The bottleneck size m is `size`, or
hidden / `reduction_factor` (Pfeiffer's default 16: m = 48 on BERT-base, 24 on MiniLM); f is
`nonlinearity` (relu, Pfeiffer's; gelu; silu; tanh). `train_layernorm` also trains the encoder's
LayerNorms, as Houlsby et al. did. Trainable numbers a layer: (2 h m + m + h) per adapter, 2 adapters
(houlsby) or 1 (pfeiffer); on BERT-base with m = 48, 1,789,056 and 894,528 (1.6% and 0.8%).

A bottleneck does not merge into the frozen weights (f is not linear), and PEFT has no bottleneck
adapters: `peft-export` writes its own layout (`export.py`), which `load_run` and `peft-predict` read.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from peft_lightning.adapters.base import LayerAdapter, freeze
from peft_lightning.adapters.fused_qkv import install_fused_qkv
from peft_lightning.encoder import BertEncoder

NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": F.tanh}
PLACEMENTS = {
    "houlsby": ["attention.output.dense", r"re:encoder\.layer\.\d+\.output\.dense"],
    "pfeiffer": [r"re:encoder\.layer\.\d+\.output\.dense"],
}


class BottleneckLinear(nn.Module):
    """A frozen `nn.Linear` followed by a bottleneck adapter on its output (see the module docstring).

    Args:
        base: the projection to wrap (kept inside, frozen).
        size: the bottleneck width m.
        nonlinearity: a key of `NONLINEARITIES`.
    """

    merged = False  # never: the adapter is not linear

    def __init__(self, base: nn.Linear, size: int, nonlinearity: str):
        super().__init__()
        self.base = base
        freeze(base)
        self.nonlinearity = nonlinearity
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adapter_down = nn.Linear(base.out_features, size, **kw)  # Kaiming-uniform weight
        self.adapter_up = nn.Linear(size, base.out_features, **kw)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x, gelu: bool = False):
        y = self.base(F.gelu(x) if gelu else x)
        return y + self.adapter_up(NONLINEARITIES[self.nonlinearity](self.adapter_down(y)))

    def merge(self) -> None:
        """Not mergeable: the adapter stays a separate computation."""

    def unmerge(self) -> None:
        """Nothing was merged."""

    def native_tensors(self) -> dict:
        """The adapter's tensors under the names the export layout gives them (`export.py`)."""
        return {
            "down.weight": self.adapter_down.weight,
            "down.bias": self.adapter_down.bias,
            "up.weight": self.adapter_up.weight,
            "up.bias": self.adapter_up.bias,
        }

    def extra_repr(self) -> str:
        return f"size={self.adapter_down.out_features}, nonlinearity={self.nonlinearity}"


class Bottleneck(LayerAdapter):
    """Bottleneck adapters in every layer of the encoder; the rest of the encoder is frozen.

    Args:
        placement: `houlsby` (after the attention and the feed-forward output projections) or
            `pfeiffer` (after the feed-forward one only).
        size: the bottleneck width; null: hidden size / `reduction_factor`.
        reduction_factor: hidden size / bottleneck width, when `size` is null.
        nonlinearity: relu, gelu, silu or tanh.
        train_layernorm: also train the encoder's LayerNorm weights and biases (Houlsby et al.).
    """

    name = "bottleneck"

    def __init__(
        self,
        placement: str = "houlsby",
        size: int | None = None,
        reduction_factor: float = 16,
        nonlinearity: str = "relu",
        train_layernorm: bool = False,
    ):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"adapter.placement={placement!r} is unknown; expected houlsby or pfeiffer")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"adapter.nonlinearity={nonlinearity!r} is unknown; expected one of {sorted(NONLINEARITIES)}"
            )
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(
                f"adapter.size={size!r}: expected a positive integer, or null for hidden / reduction_factor"
            )
        if size is None and not (isinstance(reduction_factor, (int, float)) and reduction_factor >= 1):
            raise ValueError(f"adapter.reduction_factor={reduction_factor!r}: expected a number >= 1")
        self.placement, self.size, self.reduction_factor = placement, size, reduction_factor
        self.nonlinearity, self.train_layernorm = nonlinearity, bool(train_layernorm)
        self.layers: list[BottleneckLinear] = []  # plain list: the modules live in the encoder
        self.target_names: list[str] = []
        self._layernorms: list[nn.Parameter] = []

    @property
    def label(self) -> str:
        """The strategy as reports name it: the two placements are two strategies."""
        return self.name if self.placement == "houlsby" else f"{self.name}_{self.placement}"

    def attach(self, encoder: BertEncoder) -> None:
        freeze(encoder)
        hidden = encoder.config.hidden_size
        size = self.size if self.size is not None else max(1, round(hidden / self.reduction_factor))
        chosen = self.select(encoder, PLACEMENTS[self.placement], pooler=False)
        self.wrap(encoder, chosen, lambda name, layer: BottleneckLinear(layer, size, self.nonlinearity))
        self.target_names = chosen
        self.bottleneck_size = size
        if self.train_layernorm:
            self._layernorms = [p for n, p in encoder.named_parameters() if "LayerNorm" in n]
            for p in self._layernorms:
                p.requires_grad_(True)
        install_fused_qkv(encoder)

    def encoder_params(self) -> list[nn.Parameter]:
        return super().encoder_params() + list(self._layernorms)

    def describe(self) -> dict:
        return {
            "name": self.label,
            "placement": self.placement,
            "size": getattr(self, "bottleneck_size", self.size),
            "nonlinearity": self.nonlinearity,
            "train_layernorm": self.train_layernorm,
            "targets": list(self.target_names),
        }
