from peft_lightning.adapters.base import Adapter
from peft_lightning.adapters.bitfit import BitFit
from peft_lightning.adapters.bottleneck import Bottleneck, BottleneckLinear
from peft_lightning.adapters.dora import DoRA, DoRALinear
from peft_lightning.adapters.frozen import Frozen
from peft_lightning.adapters.full import Full
from peft_lightning.adapters.ia3 import IA3, IA3Linear
from peft_lightning.adapters.lora import LoRA, LoRALinear
from peft_lightning.adapters.prefix import Prefix, PrefixEncoder

__all__ = [
    "IA3",
    "Adapter",
    "BitFit",
    "Bottleneck",
    "BottleneckLinear",
    "DoRA",
    "DoRALinear",
    "Frozen",
    "Full",
    "IA3Linear",
    "LoRA",
    "LoRALinear",
    "Prefix",
    "PrefixEncoder",
]
