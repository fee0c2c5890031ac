"""peft-lightning: parameter-efficient multi-task fine-tuning of BERT with Lightning and Hydra."""

__version__ = "0.1.0"
__all__ = ["load_run"]


def __getattr__(name: str):
    if name == "load_run":  # imported on first use: `import peft_lightning` stays light
        from peft_lightning.api import load_run

        return load_run
    raise AttributeError(f"module 'peft_lightning' has no attribute {name!r}")
