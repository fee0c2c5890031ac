"""The warnings and tips that say nothing to this project's user, filtered once, by exact message.

Every job of a sweep printed the same Lightning, transformers and torchmetrics lines: hardware
banners, a product tip, a deprecation inside Lightning itself, a warning about the logging
interval (this project logs its losses itself), a buffer note for STS-B's Spearman metric (a few
thousand scores), transformers' weight-loading progress bar. Each filter below names one message;
anything else, a warning that matters included, still reaches the terminal. The command-line
entry points call `quiet()`; importing the package changes nothing.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, message regex) of warnings that are noise for every peft-lightning run
WARNINGS = [
    (UserWarning, r"Metric `SpearmanCorrcoef` will save all targets and predictions in the buffer"),
    (UserWarning, r"Metric `PearsonCorrCoef` will save all targets and predictions in the buffer"),
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # inside Lightning's own code
    (Warning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
    (Warning, r"The '\w+_dataloader' does not have many workers"),  # data are in memory: workers would only copy
    (Warning, r"You defined a `validation_step` but have no `val_dataloader`"),
    # mtl=nashmtl: torchjd re-solves its small problem every step; cvxpy says it can't cache the solve
    (UserWarning, r"You are solving a parameterized problem that is not DPP"),
]

# Lightning's info lines that repeat for every job and say nothing about it
LIGHTNING_INFO = re.compile(
    r"^(GPU available: |TPU available: |HPU available: |💡 Tip: |Loading `train_dataloader` to estimate"
    r"|`Trainer.fit` stopped: `max_epochs=\d+` reached|Restoring states from the checkpoint path at .*best\.ckpt"
    r"|Loaded model weights from the checkpoint at .*best\.ckpt)"
)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DropLines(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet() -> None:
    """Install the filters (idempotent)."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLines) for f in logger.filters):
            logger.addFilter(DropLines(LIGHTNING_INFO))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights": one bar a job, for a load that takes a second
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
