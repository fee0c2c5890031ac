"""Frozen backbone: only the task heads train; the encoder runs in eval mode under no_grad."""

from peft_lightning.adapters.base import Adapter, freeze
from peft_lightning.adapters.fused_qkv import install_fused_qkv
from peft_lightning.encoder import BertEncoder


class Frozen(Adapter):
    name = "frozen"
    freeze_encoder = True

    def attach(self, encoder: BertEncoder) -> None:
        freeze(encoder)
        install_fused_qkv(encoder)
