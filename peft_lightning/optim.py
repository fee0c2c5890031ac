"""The optimizer recipe: AdamW over three parameter groups, an lr schedule and gradient clipping.

`Optim` is `conf/train.yaml`'s `optim:` block, checked once. A run's trainable parameters fall into
three parts, each with its own lr: the encoder's own weights (full fine-tuning: `lr`, the study's
1e-5), what the adapter adds (LoRA's A and B, prefixes: `adapter_lr`) and the task heads
(`head_lr`). Biases and LayerNorm weights get no weight decay.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from peft_lightning.checks import real

SCHEDULES = ("constant", "linear", "cosine")
LORAPLUS_STRATEGIES = ("lora", "dora")
# what optim.tuned_lr (peft-tune's lr search) sets: the lr that moves the strategy's own parameters
TUNED_ROLE = {"full": "lr", "frozen": "head_lr"}  # every other strategy: adapter_lr


@dataclass(frozen=True)
class Optim:
    """AdamW settings and the lr schedule of a run.

    Args:
        lr: learning rate of encoder weights (full fine-tuning); the study's 1e-5.
        adapter_lr: learning rate of adapter parameters (LoRA A/B, prefixes); None means `lr`.
        head_lr: learning rate of the task heads; None means `lr`.
        weight_decay, betas, eps: AdamW settings (no decay on biases and LayerNorm weights).
        lr_schedule: `constant`, `linear` or `cosine` decay after warmup.
        warmup_ratio: fraction of all steps with linear warmup.
        loraplus_ratio: LoRA+ (Hayou, Ghosh and Yu 2024, arXiv:2402.12354), LoRA and DoRA only: the B
            matrices train at this times `adapter_lr`, everything else of the adapter at `adapter_lr`
            (PEFT's `create_loraplus_optimizer` grouping); None (the default): one lr for both.
    """

    lr: float = 1e-5
    adapter_lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    loraplus_ratio: float | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("lr", real("optim.lr", self.lr, 0, low_open=True))
        for name in ("adapter_lr", "head_lr"):
            value = getattr(self, name)
            set_(name, None if value is None else real(f"optim.{name}", value, 0, low_open=True))
        set_("weight_decay", real("optim.weight_decay", self.weight_decay, 0))
        set_("warmup_ratio", real("optim.warmup_ratio", self.warmup_ratio, 0, 1))
        if self.loraplus_ratio is not None:
            set_("loraplus_ratio", real("optim.loraplus_ratio", self.loraplus_ratio, 0, low_open=True))
        set_("betas", tuple(self.betas))
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"optim.lr_schedule={self.lr_schedule!r} is unknown; expected constant, linear or cosine")

    @classmethod
    def from_config(cls, optim: Mapping, strategy: str) -> Optim:
        """The recipe of `optim:` for a run of `strategy`, with `optim.tuned_lr` (peft-tune's lr search)
        applied to the lr that moves the strategy's own parameters (`TUNED_ROLE`)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        recipe = cls(**{k: v for k, v in dict(optim).items() if k in fields})
        if recipe.loraplus_ratio is not None and strategy not in LORAPLUS_STRATEGIES:
            raise ValueError(
                f"optim.loraplus_ratio={recipe.loraplus_ratio} is LoRA+, for adapter=lora or adapter=dora; "
                f"this run's adapter is {strategy} (set optim.loraplus_ratio=null)"
            )
        tuned = optim.get("tuned_lr")
        return (
            recipe if tuned is None else dataclasses.replace(recipe, **{TUNED_ROLE.get(strategy, "adapter_lr"): tuned})
        )

    def learning_rates(self) -> dict[str, float | None]:
        """What results.json records as the run's lrs (None: the same as `lr`), and LoRA+'s ratio when set."""
        lrs = {"lr": self.lr, "adapter_lr": self.adapter_lr, "head_lr": self.head_lr}
        return lrs if self.loraplus_ratio is None else {**lrs, "loraplus_ratio": self.loraplus_ratio}

    def parts(self, encoder: list, adapter: list, heads: list) -> list[tuple[list, float]]:
        """(named parameters, lr) of each part: the encoder's weights, the adapter's, the heads'; with
        `loraplus_ratio`, the adapter's B matrices (`lora_B`) a part of their own at ratio x adapter_lr."""
        lr, adapter_lr, head_lr = self.part_lrs()
        if self.loraplus_ratio is None:
            return [(encoder, lr), (adapter, adapter_lr), (heads, head_lr)]
        b = [(n, p) for n, p in adapter if n.rsplit(".", 1)[-1] == "lora_B"]
        rest = [(n, p) for n, p in adapter if n.rsplit(".", 1)[-1] != "lora_B"]
        return [(encoder, lr), (rest, adapter_lr), (b, adapter_lr * self.loraplus_ratio), (heads, head_lr)]

    def part_lrs(self) -> tuple[float, float, float]:
        """The lr of the encoder's weights, the adapter's parameters and the heads."""
        return (
            self.lr,
            self.adapter_lr if self.adapter_lr is not None else self.lr,
            self.head_lr if self.head_lr is not None else self.lr,
        )


def param_groups(parts: Iterable[tuple[list[tuple[str, nn.Parameter]], float]], weight_decay: float) -> list[dict]:
    """AdamW groups of (named parameters, lr) parts: each part split into decayed matrices and undecayed
    biases and LayerNorm weights; empty groups dropped."""
    groups = []
    for part, lr in parts:
        decay, no_decay = [], []
        for name, p in part:
            (decay if p.ndim >= 2 and "LayerNorm" not in name else no_decay).append(p)
        groups += [
            {"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


def lr_lambda(optim: Optim, total: int):
    """The schedule's factor on each group's lr at a step: linear warmup, then constant, linear or cosine."""
    warmup = int(optim.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if optim.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if optim.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def clip_gradients(optimizer: torch.optim.Optimizer, value: float, algorithm: str | None) -> None:
    """Clip the gradients of `optimizer`'s parameters by norm (default) or by value, on the device.

    For a fused AdamW without a gradient scaler (fp32, bf16-mixed), where Lightning's mixed-precision
    plugin refuses to clip: with fp16 its GradScaler unscales inside the fused step, but bf16 has no
    scaler, so the gradients are the true ones and can be clipped directly, without a host sync.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)
