"""Full fine-tuning: every encoder parameter trains."""

from peft_lightning.adapters.base import Adapter
from peft_lightning.adapters.fused_qkv import install_fused_qkv
from peft_lightning.encoder import BertEncoder


class Full(Adapter):
    name = "full"

    def attach(self, encoder: BertEncoder) -> None:
        for p in encoder.parameters():
            p.requires_grad_(True)
        install_fused_qkv(encoder)
