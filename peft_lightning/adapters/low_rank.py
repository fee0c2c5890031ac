"""What LoRA and DoRA share: the scale g, a frozen linear layer with a rank-r pair (A, B), and their options.

See `adapters/lora.py` for the equation and the scalings, `adapters/dora.py` for DoRA's magnitude.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_lightning.adapters.base import LayerAdapter, MergeableLinear, freeze
from peft_lightning.checks import whole
from peft_lightning.encoder import BertEncoder
from peft_lightning.layers import Dropout

SCALINGS = ("fixed", "alpha_over_r", "rslora")


class LowRankLinear(MergeableLinear):
    """A frozen `nn.Linear` (`base`) with a trainable pair A: (r, in), Kaiming-uniform, and B: (out, r),
    zero, so the update g B A starts at zero and the wrapped layer equals the pretrained one.

    Args:
        base: the linear layer to wrap (kept inside, frozen).
        rank: r >= 1.
        scale: g, the multiplier of the low-rank update.
        dropout: dropout on the low-rank branch's input.
    """

    shares_qkv_product = True  # q, k and v alike may be one product (`fused_qkv.FusedQKV`)
    concat = False  # the concatenated form (see fastpath.kernels.low_rank_linear); LoRA may set it

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        freeze(base)
        self.rank, self.scale = rank, scale
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        # B = 0: the update B A is zero at init, so the wrapped layer equals the pretrained one.
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def lora_scale(scaling: str, alpha: float, rank: int) -> float:
    if scaling == "fixed":
        return 1.0
    if scaling == "alpha_over_r":
        return alpha / rank
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"adapter.scaling={scaling!r} is unknown; expected one of {list(SCALINGS)}")


class LowRankAdapter(LayerAdapter):
    """What LoRA and DoRA share: their options, checked here, the choice of target layers, and
    `describe`.

    Args:
        rank: r, the rank of the update (>= 1).
        targets: name patterns or aliases (see module docstring); default `all`.
        scaling: `fixed`, `alpha_over_r` or `rslora`.
        alpha: alpha for the two alpha scalings.
        dropout: dropout on the low-rank branch input.
        include_pooler: `auto`, true or false: whether the pooler's dense layer can be a target.
    """

    def __init__(
        self,
        rank: int = 8,
        targets: list[str] | str = "all",
        scaling: str = "fixed",
        alpha: float = 16.0,
        dropout: float = 0.0,
        include_pooler: bool | str = "auto",
    ):
        super().__init__()
        whole("adapter.rank", rank, 1)  # true is not a rank
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {dropout}")
        if include_pooler not in ("auto", True, False):
            raise ValueError(f"adapter.include_pooler must be auto, true or false, got {include_pooler!r}")
        self.rank, self.scaling, self.alpha, self.dropout_p = rank, scaling, float(alpha), dropout
        self.scale = lora_scale(scaling, self.alpha, rank)
        self.targets = list(targets) if not isinstance(targets, str) else [targets]
        self.include_pooler = include_pooler
        self.layers: list[nn.Module] = []  # plain list: the modules live in the encoder
        self.target_names: list[str] = []

    def choose_targets(self, encoder: BertEncoder) -> list[str]:
        """Freeze the encoder and name the linear layers to adapt."""
        freeze(encoder)
        pooler = encoder.pooler is not None if self.include_pooler == "auto" else bool(self.include_pooler)
        return self.select(encoder, self.targets, pooler)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "scaling": self.scaling,
            "alpha": self.alpha,
            "targets": self.target_names,
        }

    def peft_config(self) -> dict:
        """PEFT's `LoraConfig` fields for this adapter: g = lora_alpha / r (or / sqrt r with use_rslora),
        so the fixed g = 1 is lora_alpha = r."""
        return {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.rank if self.scaling == "fixed" else self.alpha,
            "use_rslora": self.scaling == "rslora",
            "use_dora": False,
            "target_modules": list(self.target_names),
            "lora_dropout": self.dropout_p,
            "bias": "none",
        }
