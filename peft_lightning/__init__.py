"""peft-lightning: parameter-efficient multi-task fine-tuning of BERT with Lightning and Hydra."""

from peft_lightning.api import load_run

__version__ = "0.1.0"
__all__ = ["load_run"]
