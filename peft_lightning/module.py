"""MultiTaskModule: trains a `MultiTaskModel` with an optimizer recipe; each step sums the tasks' losses.

The Lightning side of a run: the steps, the train and dev metrics, merging the adapter around
evaluation, the record of each epoch (`history`) and the best epoch's dev predictions, the optimizer
and schedule (`optim.py`), and checkpoints that hold only what trains.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torchmetrics as tm
from lightning.pytorch.trainer.states import TrainerFn

from peft_lightning.distributed import any_rank, gather
from peft_lightning.fastpath.precision import store_frozen_in
from peft_lightning.model import MultiTaskModel
from peft_lightning.mtl import MTL, aggregated_backward
from peft_lightning.optim import Optim, clip_gradients, lr_lambda, param_groups
from peft_lightning.results import as_logged, selection_score
from peft_lightning.tasks import TASKS

EVAL_SPLITS = ("dev", "select", "train_eval")
STAGE = {"dev": "val", "select": "select", "train_eval": "train_eval"}  # the logged keys' prefix


class DivergedError(RuntimeError):
    """A non-finite training loss or evaluation score: the run stops as failed, at that step."""


def task_metrics(task: str) -> tm.MetricCollection:
    t = TASKS[task]
    if t.is_regression:
        return tm.MetricCollection({"pearson": tm.PearsonCorrCoef(), "spearman": tm.SpearmanCorrCoef()})
    # validate_args=False: the value checks read tensors back to the host (a GPU sync every step);
    # predictions and labels come from our own argmax and the data module's checked labels
    if t.num_labels == 2:
        return tm.MetricCollection(
            {
                "acc": tm.classification.BinaryAccuracy(validate_args=False),
                "f1": tm.classification.BinaryF1Score(validate_args=False),
            }
        )
    return tm.MetricCollection(
        {"acc": tm.classification.MulticlassAccuracy(t.num_labels, average="micro", validate_args=False)}
    )


class MultiTaskModule(L.LightningModule):
    """A `MultiTaskModel` trained with an `Optim` recipe.

    Args:
        model: the network (encoder with its adapter attached, and heads).
        optim: AdamW settings, the lrs of the three parameter parts and the schedule.
        seed: reseeds dropout at every epoch start, so an epoch is reproducible after a resume.
    """

    def __init__(self, model: MultiTaskModel, optim: Optim | None = None, seed: int = 0, mtl: MTL | None = None):
        super().__init__()
        self.model, self.optim, self.seed = model, optim or Optim(), seed
        self.mtl = mtl if mtl is not None else MTL("sum", len(model.task_names))
        self._task_losses: list[torch.Tensor] = []  # this step's, for an aggregated backward (mtl.py)
        self.task_names = model.task_names
        self.train_metrics = torch.nn.ModuleDict({t: task_metrics(t) for t in self.task_names})
        # the evaluated splits (dev; the selection split and the train_eval sample where the data has them)
        self.eval_metrics = torch.nn.ModuleDict(
            {s: torch.nn.ModuleDict({t: task_metrics(t) for t in self.task_names}) for s in EVAL_SPLITS}
        )
        self.history: list[dict] = []
        # predictions of the evaluated splits at the best epoch so far and at the last one:
        # (task, split) -> (row index, prediction); the best are the best checkpoint's, so the run
        # needs no second pass over dev at the end
        self.best_eval_predictions: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last_eval_predictions: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._val_outputs: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._loss_sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.strict_loading = False  # checkpoints hold only what trains

    @property
    def encoder(self):
        """The model's encoder (with its adapter's layers in it)."""
        return self.model.encoder

    @property
    def adapter(self):
        return self.model.adapter

    @property
    def heads(self):
        return self.model.heads

    def configure_model(self) -> None:
        self.model.compile_encoder()

    def on_fit_start(self) -> None:
        # bf16-mixed: keep frozen matrices once in bf16 (autocast would cast them every step); LoRA
        # then also keeps its A and B beside them (its Arena)
        if "bf16" in str(self.trainer.precision):
            store_frozen_in(self.model.encoder, torch.bfloat16)

    def forward(self, batch: dict[str, dict]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    # ---- steps ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, dict], batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        total = 0.0
        for task, out in outputs.items():
            labels = batch[task]["labels"]
            t = TASKS[task]
            loss = t.loss(out, labels)
            total = total + loss
            if self.mtl.active:
                self._task_losses.append(loss)
            self.train_metrics[task].update(t.prediction(out.detach()), t.target(labels))
            self._accumulate_loss(f"train/{task}/loss", loss)
        self._accumulate_loss("train/loss", total)
        self._log_losses()
        return total

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """The summed loss's backward (`mtl=sum`), or the tasks' gradients combined by an aggregator
        on the shared parameters (`mtl.py`)."""
        if not self.mtl.active:
            return super().backward(loss, *args, **kwargs)
        losses, self._task_losses = self._task_losses, []
        encoder, adapter, heads = self.model.parts()
        aggregated_backward(losses, [p for _, p in encoder + adapter], [p for _, p in heads], self.mtl.aggregate)

    def _accumulate_loss(self, key: str, loss: torch.Tensor) -> None:
        """Running sum on the device: no per-step `self.log` (about a millisecond of host time each)."""
        s, n = self._loss_sums.get(key, (0.0, 0))
        self._loss_sums[key] = (s + loss.detach(), n + 1)

    def _log_losses(self) -> None:
        """Log the mean loss of each task since the last logging step, on the steps the logger writes."""
        trainer = self._trainer
        if trainer is not None:  # the steps Lightning's logger connector writes: every n-th step, and the last
            every = trainer.log_every_n_steps
            if every == 0 or ((trainer.global_step + 1) % every != 0 and not trainer.should_stop):
                return
        sums, self._loss_sums = self._loss_sums, {}
        self._check_finite(sums)
        for key, (s, n) in sums.items():
            self.log(key, s / n, prog_bar=key != "train/loss", batch_size=1)
        self.log("epoch", float(self.current_epoch + 1), batch_size=1)  # from 1, as results.json and the report

    def _check_finite(self, sums: dict) -> None:
        """A non-finite loss since the last check stops the run (one host sync per logging step and epoch)."""
        total = sums.get("train/loss")
        if total is not None and not torch.isfinite(total[0]):
            raise DivergedError(f"diverged at step {self.global_step + 1}: the train loss is {float(total[0]):g}")

    def on_train_epoch_end(self) -> None:
        self._check_finite(self._loss_sums)  # an epoch shorter than the logging interval is checked too

    def validation_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        for task, out in self(batch).items():
            t, split = TASKS[task], batch[task].get("split", "dev")
            pred = t.prediction(out)
            self.eval_metrics[split][task].update(pred, t.target(batch[task]["labels"]))
            if not self.trainer.sanity_checking:
                self._val_outputs.setdefault((task, split), []).append((batch[task]["index"].detach(), pred.detach()))

    def predict_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> dict:
        ((task, out),) = self(batch).items()
        return {"task": task, "index": batch[task]["index"].cpu(), "prediction": TASKS[task].prediction(out).cpu()}

    # ---- epochs and metrics --------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # Lightning restores each submodule's own mode after validation: a frozen encoder stays in eval mode
        self.model.train(True)
        # each rank its own dropout masks under DDP (rank 0's are those of a single process)
        torch.manual_seed(self.seed * 100_003 + self.current_epoch + 7_919 * self.global_rank)

    def on_validation_epoch_start(self) -> None:
        self.model.adapter.merge()

    def on_validation_epoch_end(self) -> None:
        self.model.adapter.unmerge()
        scores = {split: self._compute(self.eval_metrics[split]) for split in EVAL_SPLITS}
        outputs, self._val_outputs = self._val_outputs, {}
        if self.trainer.sanity_checking:
            return
        train = self._compute(self.train_metrics)
        # every rank holds every prediction (DDP), on the host
        outputs = merge_ranks(gather({k: [(i.cpu(), p.cpu()) for i, p in v] for k, v in outputs.items()}))
        record = {"epoch": self.current_epoch + 1, "step": self.global_step, "train": train}
        record["train_avg"] = average(train)
        for split in ("dev", "select", "train_eval"):  # where evaluated (dev: data.score_dev)
            if scores[split]:
                record[split], record[f"{split}_avg"] = scores[split], average(scores[split])
        flat = {f"{STAGE[s]}/{t}/{m}": v for s in EVAL_SPLITS for t, ms in scores[s].items() for m, v in ms.items()}
        flat.update({f"train/{t}/{m}": v for t, ms in train.items() for m, v in ms.items()})
        for key, name in (
            ("train_avg", "train/avg"),
            ("train_eval_avg", "train_eval/avg"),
            ("select_avg", "select/avg"),
        ):
            if record.get(key) is not None:
                flat[name] = record[key]
        # the values are the same on every rank (synchronised metrics): sync_dist only averages equals
        many = self.trainer.world_size > 1
        flat = {k: v for k, v in flat.items() if v is not None and not math.isnan(v)}
        flat["epoch"] = float(record["epoch"])  # from 1, as results.json and the report (Lightning's is from 0)
        self.log_dict(flat, prog_bar=False, sync_dist=many)
        if record.get("dev_avg") is not None:
            self.log("val/avg", record["dev_avg"], prog_bar=True, sync_dist=many)
        merged = {k: (torch.cat([i for i, _ in v]), torch.cat([p for _, p in v])) for k, v in outputs.items()}
        best = max(
            (as_logged(selection_score(h)) for h in self.history if selection_score(h) is not None), default=None
        )
        if selection_score(record) is not None and (best is None or as_logged(selection_score(record)) > best):
            self.best_eval_predictions = merged
        self.last_eval_predictions = merged
        self.history.append(record)

    def _compute(self, metrics: torch.nn.ModuleDict) -> dict[str, dict[str, float]]:
        result = {}
        for task, coll in metrics.items():
            # under DDP compute() is a collective: every rank computes when any rank has updates
            if not any_rank(any(m.update_count for m in coll.values()), self.device):
                continue
            result[task] = {k: float(v) for k, v in coll.compute().items()}
            coll.reset()
        return result

    def on_predict_start(self) -> None:
        self.model.adapter.merge()

    def on_predict_end(self) -> None:
        self.model.adapter.unmerge()

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(self):
        parts = self.optim.parts(*self.model.parts())
        # one kernel per step instead of per-tensor ops; not with fp16's GradScaler (see clipping below)
        fused = self.device.type in ("cuda", "cpu") and self._grad_scaler is None
        opt = torch.optim.AdamW(
            param_groups(parts, self.optim.weight_decay),
            lr=self.optim.lr,
            betas=self.optim.betas,
            eps=self.optim.eps,
            fused=fused,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def _grad_scaler(self):
        """fp16-mixed's GradScaler, or None (fp32, bf16-mixed)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip here when no gradient scaler is involved (fp32, bf16-mixed: `optim.clip_gradients`)."""
        if gradient_clip_val is None or gradient_clip_val <= 0:
            return
        if self._grad_scaler is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoints ---------------------------------------------------------------------
    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what trains, under the model's own names (`load_run` loads it into a MultiTaskModel)
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {
            k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k in keep
        }
        checkpoint["peft_lightning"] = {"identity": self.model.identity, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = self.model.check_checkpoint(checkpoint)
        checkpoint["state_dict"] = {"model." + k: v for k, v in checkpoint["state_dict"].items()}
        if self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            self.history = list(meta.get("history", []))  # resuming: continue the record


def score_predictions(task: str, predictions: list, labels: torch.Tensor) -> dict[str, float]:
    """A task's metrics (as validation computes them) of predictions in row order against labels."""
    t, metrics = TASKS[task], task_metrics(task)
    metrics.update(torch.tensor(predictions), t.target(labels))
    return {k: float(v) for k, v in metrics.compute().items()}


def merge_ranks(per_rank: list[dict]) -> dict[str, list]:
    """{task: [(row index, prediction), ...]} of every rank, as one."""
    merged: dict[str, list] = {}
    for outputs in per_rank:
        for task, pairs in outputs.items():
            merged.setdefault(task, []).extend(pairs)
    return merged


def average(scores: dict[str, dict[str, float]]) -> float | None:
    """Mean of each task's main metric (SST-5 acc, QQP acc, STS-B Pearson) over the tasks present."""
    vals = [scores[t][TASKS[t].main_metric] for t in scores if TASKS[t].main_metric in scores[t]]
    return float(sum(vals) / len(vals)) if vals else None
