"""BitFit: only bias terms train (Ben Zaken, Goldberg and Ravfogel 2022, arXiv:2106.10199).

    y = W x + b      (W frozen, b trained)

Every other encoder parameter is frozen, and nothing is added, so the adapted encoder starts out
identical to the pretrained one and a trained run is a plain BertModel with other biases (export
writes it merged). `targets` chooses which biases train:
- `all` (the paper's): every bias of the encoder, linear layers' and LayerNorms' (the embeddings'
  LayerNorm included); the pooler's only with pooling=pooler, as LoRA's `include_pooler: auto`.
- name patterns of linear layers, matched as LoRA's targets (a dotted name equal to the pattern or
  ending with `.pattern`, `re:<regex>`, the aliases `attention` and `ffn`): those layers' biases only.
  The paper's sparser variant trains the query and the FFN's first layer: `[query, intermediate.dense]`.
On BERT-base `all` trains 102,144 numbers (0.09% of the encoder), 102,912 with the pooler's.
The biases train at `optim.adapter_lr`: they are the strategy's own parameters.
"""

from __future__ import annotations

from torch import nn

from peft_lightning.adapters.base import Adapter, LayerAdapter, freeze
from peft_lightning.adapters.fused_qkv import install_fused_qkv
from peft_lightning.encoder import BertEncoder


class BitFit(Adapter):
    """Bias-only fine-tuning of the encoder.

    Args:
        targets: `all` (every bias, LayerNorms' included), or linear layers' name patterns / aliases.
        include_pooler: train the pooler's bias too; `auto`: when the heads read the pooler output
            (set by the model builder from `model.pooling`, as for LoRA).
    """

    name = "bitfit"

    def __init__(self, targets: list[str] | str = ("all",), include_pooler: bool | str = "auto"):
        super().__init__()
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if include_pooler not in (True, False, "auto"):
            raise ValueError(f"adapter.include_pooler={include_pooler!r}: expected true, false or auto")
        self.include_pooler = include_pooler
        self.bias_names: list[str] = []
        self._biases: list[nn.Parameter] = []  # plain list: the parameters live in the encoder

    def attach(self, encoder: BertEncoder) -> None:
        freeze(encoder)
        pooler = encoder.pooler is not None if self.include_pooler == "auto" else bool(self.include_pooler)
        if self.targets == ["all"]:
            chosen = [
                n
                for n, _ in encoder.named_parameters()
                if n.endswith(".bias") and (pooler or not n.startswith("pooler."))
            ]
        else:
            layers = LayerAdapter.select(encoder, self.targets, pooler=pooler)
            chosen = [f"{n}.bias" for n in layers if encoder.get_submodule(n).bias is not None]
        if not chosen:
            raise ValueError(f"adapter.targets={self.targets} chose no bias of the encoder")
        params = dict(encoder.named_parameters())
        self.bias_names = chosen
        self._biases = [params[n] for n in chosen]
        for p in self._biases:
            p.requires_grad_(True)
        install_fused_qkv(encoder)

    def encoder_params(self) -> list[nn.Parameter]:
        return list(self._biases)

    def describe(self) -> dict:
        return {"name": self.name, "biases": list(self.bias_names)}
