"""Prefix tuning: learned key/value prefixes in every self-attention layer (Li & Liang 2021,
arXiv:2101.00190).

For layer l, attention over the tokens becomes

    softmax(Q [P_k^l; K]^T / sqrt(d)) [P_v^l; V]

with P_k^l, P_v^l of shape (P, hidden) per layer; the encoder stays frozen. The attention mask
covers prefix and tokens (prefix always visible); tokens keep position ids 0..T-1 and their
token_type_ids. Two parameterisations (`mlp`):
- direct (`mlp=false`): the L * 2 * P * hidden prefix values are the parameters.
- MLP reparameterisation (`mlp=true`, Li & Liang): P embeddings of size hidden go through
  Linear(hidden, mlp_hidden) -> tanh -> Linear(mlp_hidden, L * 2 * hidden), which emits every
  layer's keys and values. `fold()` evaluates the MLP once and keeps only the prefixes.
The layout of the L * 2 axis is (layer 0 key, layer 0 value, layer 1 key, ...), as in PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_lightning.adapters.base import Adapter, freeze
from peft_lightning.adapters.fused_qkv import install_fused_qkv
from peft_lightning.checks import whole
from peft_lightning.encoder import BertEncoder, PrefixKV


class PrefixEncoder(nn.Module):
    """Produces per-layer prefix keys and values.

    Args:
        num_layers, heads, head_dim: the encoder's shape.
        length: P, the number of prefix positions (>= 1).
        mlp: use the MLP reparameterisation.
        mlp_hidden: width of the MLP's hidden layer.
        init_std: std of the normal init of direct prefixes.
    """

    def __init__(
        self,
        num_layers: int,
        heads: int,
        head_dim: int,
        length: int,
        mlp: bool,
        mlp_hidden: int,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_layers, self.heads, self.head_dim, self.length = num_layers, heads, head_dim, length
        hidden, out = heads * head_dim, num_layers * 2 * heads * head_dim
        if mlp:
            self.embedding = nn.Embedding(length, hidden)
            self.transform = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, out))
            self.prefix = None
        else:
            self.embedding = self.transform = None
            self.prefix = nn.Parameter(torch.randn(length, out) * init_std)  # (P, L*2*hidden)

    @property
    def uses_mlp(self) -> bool:
        return self.prefix is None

    def flat(self) -> torch.Tensor:
        if self.uses_mlp:
            return self.transform(self.embedding.weight)  # (P, L*2*hidden)
        return self.prefix

    def forward(self) -> list[PrefixKV]:
        x = self.flat().view(self.length, self.num_layers * 2, self.heads, self.head_dim)
        x = x.permute(1, 2, 0, 3).unsqueeze(1)  # (L*2, 1, heads, P, head_dim)
        return [(x[2 * i], x[2 * i + 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the prefixes it emits (same outputs, fewer parameters)."""
        if not self.uses_mlp:
            return
        self.prefix = nn.Parameter(self.flat().detach().clone())
        self.embedding = self.transform = None


class Prefix(Adapter):
    """Prefix tuning over a frozen encoder.

    Args:
        length: P, prefix positions per layer (>= 1).
        mlp: MLP reparameterisation (true) or direct prefixes (false).
        mlp_hidden: MLP hidden width; None means the encoder's hidden size (PEFT's default).
        init_std: std of the direct prefixes' normal init.
    """

    name = "prefix"

    def __init__(self, length: int = 4, mlp: bool = True, mlp_hidden: int | None = None, init_std: float = 0.02):
        super().__init__()
        whole("adapter.length", length, 1)  # true is not a length
        if not isinstance(mlp, bool):
            raise ValueError(f"adapter.mlp must be true or false, got {mlp!r}")
        if mlp_hidden is not None and (
            isinstance(mlp_hidden, bool) or not isinstance(mlp_hidden, int) or mlp_hidden < 1
        ):
            raise ValueError(f"adapter.mlp_hidden must be a positive integer or null, got {mlp_hidden!r}")
        self.length, self.mlp, self.mlp_hidden, self.init_std = length, mlp, mlp_hidden, init_std
        self.prefix_encoder: PrefixEncoder | None = None

    def attach(self, encoder: BertEncoder) -> None:
        freeze(encoder)
        cfg = encoder.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.prefix_encoder = PrefixEncoder(
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            head_dim,
            self.length,
            self.mlp,
            self.mlp_hidden or cfg.hidden_size,
            self.init_std,
        ).to(encoder.embeddings.word_embeddings.weight.device)
        install_fused_qkv(encoder)

    def prefix_kv(self) -> list[PrefixKV]:
        return self.prefix_encoder()

    def describe(self) -> dict:
        return {"name": self.name, "length": self.length, "mlp": self.mlp, "mlp_hidden": self.mlp_hidden}
