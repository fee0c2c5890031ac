from peft_lightning.adapters.base import Adapter
from peft_lightning.adapters.frozen import Frozen
from peft_lightning.adapters.full import Full
from peft_lightning.adapters.lora import LoRA, LoRALinear
from peft_lightning.adapters.prefix import Prefix, PrefixEncoder

__all__ = ["Adapter", "Frozen", "Full", "LoRA", "LoRALinear", "Prefix", "PrefixEncoder"]
