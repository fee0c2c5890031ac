"""peft-lightning: parameter-efficient multi-task fine-tuning of BERT with Lightning and Hydra."""

__version__ = "0.1.0"
