"""How the tasks' gradients combine into one step: the summed loss (the study's), or a multi-task
gradient method from `torchjd` (`mtl=<name>`, `conf/mtl/`).

With `mtl=sum` (the default) a step is `sum(losses).backward()`, exactly as before this option
existed. With an aggregator, the parameters that every task's loss reaches (the adapter's, and the
encoder's own with full fine-tuning: `shared`) get the aggregate of the per-task gradients:

    J = [grad L_1; grad L_2; ...; grad L_k]   (k x n: one row per task, over the shared parameters)
    g = A(J)                                 (A: UPGrad, PCGrad, MGDA, CAGrad, Nash-MTL, ...)

computed with torchjd's general Jacobian backward (`torchjd.autojac.backward`, then `jac_to_grad`),
not its `mtl_backward` helper, which assumes the tasks share one input batch: here each task's loss
keeps its own batch, as in the study. A head is reached by its own task's loss only, so the heads
(`specific`) get their ordinary gradient. The k rows are computed one backward pass at a time
(`parallel_chunk_size=1`: the encoder's fused kernels are autograd functions without vmap rules), so
a step costs about k backward passes instead of one.

What does not combine, refused at build time with a ValueError rather than run wrong: fp16-mixed
(its GradScaler scales the summed loss that this backward never sees), DDP (its gradient all-reduce
hooks fire inside `loss.backward()`, which this replaces), `model.compile` (the compiled backward
is one graph for the summed loss), a schedule that does not put every task in every step
(`data.schedule=joint` only) and a frozen encoder (nothing shared to aggregate).

Pinned: torchjd 0.18 (`pyproject.toml`); CAGrad and Nash-MTL need its `cagrad` / `nash-mtl` extras
(cvxpy), UPGrad and DualProj its `quadprog-projector` one: the project installs `torchjd[full]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

# name -> (torchjd.aggregation class name, whether it takes the number of tasks, default options)
AGGREGATORS = {
    "mean": ("Mean", False, {}),
    "upgrad": ("UPGrad", False, {}),
    "pcgrad": ("PCGrad", False, {}),
    "mgda": ("MGDA", False, {}),
    "cagrad": ("CAGrad", False, {"c": 0.4}),  # the paper's c for multi-task supervised learning
    "nashmtl": ("NashMTL", True, {}),
    "imtlg": ("IMTLG", False, {}),
    "dualproj": ("DualProj", False, {}),
    "aligned_mtl": ("AlignedMTL", False, {}),
}
METHODS = ("sum", *AGGREGATORS)


def aggregator(name: str, n_tasks: int, options: Mapping | None = None):
    """torchjd's aggregator `name` with `options` (its constructor's keywords); None for `sum`."""
    if name not in METHODS:
        raise ValueError(f"mtl.name={name!r} is unknown; expected one of {', '.join(METHODS)}")
    if name == "sum":
        return None
    import torchjd.aggregation as agg

    cls_name, takes_n, defaults = AGGREGATORS[name]
    kwargs = {**defaults, **(options or {})}
    if takes_n:
        kwargs["n_tasks"] = n_tasks
    try:
        return getattr(agg, cls_name)(**kwargs)
    except TypeError as err:
        raise ValueError(f"mtl={name}: {err} (options: {sorted(options or {})})") from None


def aggregated_backward(
    losses: Sequence[torch.Tensor], shared: Sequence[nn.Parameter], specific: Sequence[nn.Parameter], aggregate
) -> None:
    """Gradients of one step into `.grad`: the aggregated per-task gradients on `shared`, each task's
    own gradient on `specific` (the heads). `aggregate`: a torchjd aggregator."""
    from torchjd.autojac import backward as jac_backward
    from torchjd.autojac import jac_to_grad

    if specific:
        torch.autograd.backward(sum(losses), inputs=list(specific), retain_graph=True)
    jac_backward(list(losses), inputs=list(shared), parallel_chunk_size=1)
    jac_to_grad(list(shared), aggregate)


def check(cfg) -> None:
    """The combinations `mtl=<aggregator>` refuses (see the module docstring), as config errors."""
    name = cfg.mtl.name
    if name == "sum":
        return
    trainer = cfg.trainer
    if "16-mixed" in str(trainer.get("precision", "")) and "bf16" not in str(trainer.get("precision", "")):
        raise ValueError(
            f"mtl={name} with trainer.precision={trainer.precision}: fp16's GradScaler scales a summed loss "
            "that an aggregated backward never sees; use bf16-mixed or 32-true"
        )
    strategy = str(trainer.get("strategy", "auto"))
    devices = trainer.get("devices", 1)
    if "ddp" in strategy or (isinstance(devices, int) and devices > 1):
        raise ValueError(
            f"mtl={name} with trainer.strategy={strategy} devices={devices}: DDP all-reduces gradients inside "
            "loss.backward(), which an aggregated backward replaces; run it on one device"
        )
    if cfg.model.get("compile"):
        raise ValueError(
            f"mtl={name} with model.compile={cfg.model.compile}: the compiled backward is one graph "
            "for the summed loss; set model.compile=false"
        )
    if cfg.data.get("schedule", "joint") != "joint":
        raise ValueError(
            f"mtl={name} with data.schedule={cfg.data.schedule}: an aggregator needs every task's loss in every "
            "step (data.schedule=joint)"
        )
    if len(cfg.data.tasks) < 2:
        raise ValueError(f"mtl={name} with one task ({list(cfg.data.tasks)}): there are no gradients to combine")


class MTL:
    """A run's multi-task gradient method: `sum` (None here: the plain backward) or an aggregator.

    Args:
        name: `sum` or a key of `AGGREGATORS`.
        n_tasks: the number of task losses a step.
        options: the aggregator's keywords (`conf/mtl/<name>.yaml`, e.g. CAGrad's `c`).
    """

    def __init__(self, name: str, n_tasks: int, options: Mapping | None = None):
        self.name, self.n_tasks, self.options = name, n_tasks, dict(options or {})
        self.aggregate = aggregator(name, n_tasks, self.options)

    @classmethod
    def from_config(cls, mtl: Mapping, n_tasks: int) -> MTL:
        mtl = dict(mtl)
        return cls(mtl.pop("name", "sum"), n_tasks, mtl)

    @property
    def active(self) -> bool:
        return self.aggregate is not None

    def describe(self) -> dict:
        return {"name": self.name, **self.options}
