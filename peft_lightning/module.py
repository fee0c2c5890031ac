"""MultiTaskModule: a BERT encoder, one adapter strategy and the task heads, trained together."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics as tm
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from peft_lightning.adapters.base import Adapter
from peft_lightning.checks import real
from peft_lightning.distributed import any_rank, gather
from peft_lightning.encoder import BertEncoder
from peft_lightning.heads import build_heads
from peft_lightning.tasks import TASKS, get_tasks

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    """Backbone + adapter + heads; each training step sums the losses of the tasks in its batch.

    Args:
        encoder: the BERT encoder (pretrained weights loaded).
        adapter: the strategy; attached to the encoder here.
        tasks: task keys.
        pooling: `pooler`, `cls` or `mean` sentence vector.
        pair_encoding: `separate` or `cross` (must match the data module).
        sts_head: `mlp` or `cosine`.
        pair_features: `concat` ([u; v], the study) or `sbert` ([u; v; |u-v|; u*v]) for pair heads.
        head_dropout: dropout inside the heads.
        lr: learning rate of encoder weights (full fine-tuning); the study's 1e-5.
        adapter_lr: learning rate of adapter parameters (LoRA A/B, prefixes); None means `lr`.
        head_lr: learning rate of the task heads; None means `lr`.
        weight_decay, betas, eps: AdamW settings (no decay on biases and LayerNorm weights).
        lr_schedule: `constant`, `linear` or `cosine` decay after warmup.
        warmup_ratio: fraction of all steps with linear warmup.
        seed: reseeds dropout at every epoch start, so an epoch is reproducible after a resume.
        fuse_passes: run all encoder passes of a step as one padded batch (fewer launches on GPU).
        compile: `torch.compile` the encoder in place (pair with data.pad_to_multiple_of): true, or a
            torch.compile mode (`reduce-overhead` replays the encoder's forward and backward as CUDA graphs).
        identity: what identifies the backbone, stored in checkpoints.
    """

    def __init__(
        self,
        encoder: BertEncoder,
        adapter: Adapter,
        tasks: list[str] | None = None,
        pooling: str = "pooler",
        pair_encoding: str = "separate",
        sts_head: str = "mlp",
        head_dropout: float = 0.1,
        pair_features: str = "concat",
        lr: float = 1e-5,
        adapter_lr: float | None = None,
        head_lr: float | None = None,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_schedule: str = "constant",
        warmup_ratio: float = 0.0,
        seed: int = 0,
        fuse_passes: bool = False,
        compile: bool | str = False,
        identity: dict | None = None,
    ):
        super().__init__()
        lr = real("optim.lr", lr, 0, low_open=True)
        adapter_lr, head_lr = (
            None if v is None else real(f"optim.{name}", v, 0, low_open=True)
            for name, v in (("adapter_lr", adapter_lr), ("head_lr", head_lr))
        )
        weight_decay = real("optim.weight_decay", weight_decay, 0)
        warmup_ratio = real("optim.warmup_ratio", warmup_ratio, 0, 1)
        head_dropout = real("model.head_dropout", head_dropout, 0, 1)
        if lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.lr_schedule={lr_schedule!r} is unknown; expected constant, linear or cosine")
        self.task_names = [t.name for t in get_tasks(tasks)]
        self.encoder, self.adapter = encoder, adapter
        adapter.attach(encoder)
        self.pooling, self.pair_encoding, self.fuse_passes = pooling, pair_encoding, fuse_passes
        if compile not in (True, False) and compile not in COMPILE_MODES:
            raise ValueError(
                f"model.compile={compile!r} is unknown; expected true, false or one of {list(COMPILE_MODES)}"
            )
        self.compile_encoder = compile
        self.heads = build_heads(
            get_tasks(self.task_names), encoder.config.hidden_size, pair_encoding, sts_head, head_dropout, pair_features
        )
        self.train_metrics = nn.ModuleDict({t: task_metrics(t) for t in self.task_names})
        self.val_metrics = nn.ModuleDict({t: task_metrics(t) for t in self.task_names})
        self.optim = {
            "lr": lr,
            "adapter_lr": adapter_lr,
            "head_lr": head_lr,
            "weight_decay": weight_decay,
            "betas": tuple(betas),
            "eps": eps,
        }
        self.lr_schedule, self.warmup_ratio, self.seed = lr_schedule, warmup_ratio, seed
        self.identity = {
            "adapter": adapter.describe(),
            "backbone": identity or {},
            "tasks": self.task_names,
            "pooling": pooling,
            "pair_encoding": pair_encoding,
            "sts_head": sts_head,
            "pair_features": pair_features,
        }
        self.history: list[dict] = []
        # dev predictions of the best epoch so far: (task -> (row index, prediction)); these are the
        # best checkpoint's dev predictions, so the run needs no second pass over dev at the end
        self.best_dev_predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._val_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._loss_sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.strict_loading = False  # checkpoints hold only what trains

    def configure_model(self) -> None:
        if self.compile_encoder and not getattr(self, "_compiled", False):
            mode = None if self.compile_encoder is True else self.compile_encoder
            self.encoder.compile(mode=mode)  # in place: parameter names (and checkpoints) stay the same
            self._compiled = True

    @property
    def _cuda_graphs(self) -> bool:
        return getattr(self, "_compiled", False) and self.compile_encoder in ("reduce-overhead", "max-autotune")

    def on_fit_start(self) -> None:
        # bf16-mixed: keep frozen matrices once in bf16 (autocast would cast them every step); LoRA
        # then also keeps its A and B beside them (its Arena)
        if "bf16" in str(self.trainer.precision):
            store_frozen_in(self.encoder, torch.bfloat16)

    # ---- forward -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.adapter.freeze_encoder:
            self.encoder.eval()  # frozen strategy: no dropout in the encoder
        return self

    def encode(self, passes: list[dict]) -> list[torch.Tensor]:
        """Pooled vectors (B_i, hidden) for each encoder pass of a step."""
        grad = torch.is_grad_enabled() and not self.adapter.freeze_encoder
        if self._cuda_graphs:  # each step is a new CUDA-graph generation: the last step's outputs are free
            torch.compiler.cudagraph_mark_step_begin()
        with torch.set_grad_enabled(grad), self.adapter.compute_dtype_weights():
            prefix = self.adapter.prefix_kv()
            if self.fuse_passes and len(passes) > 1:
                return self._encode_fused(passes, prefix)
            out = []
            for p in passes:
                h = self.encoder(p["input_ids"], p["attention_mask"], p["token_type_ids"], prefix)
                out.append(self.encoder.pool(h, p["attention_mask"], self.pooling))
            return out

    def _encode_fused(self, passes: list[dict], prefix) -> list[torch.Tensor]:
        width = max(p["input_ids"].shape[1] for p in passes)
        cat = {
            k: torch.cat([F.pad(p[k], (0, width - p[k].shape[1])) for p in passes])
            for k in ("input_ids", "attention_mask", "token_type_ids")
        }
        h = self.encoder(cat["input_ids"], cat["attention_mask"], cat["token_type_ids"], prefix)
        pooled = self.encoder.pool(h, cat["attention_mask"], self.pooling)
        return list(pooled.split([p["input_ids"].shape[0] for p in passes]))

    def forward(self, batch: dict[str, dict]) -> dict[str, torch.Tensor]:
        """Logits (B, classes) or scores (B,) per task in the batch, in fp32.

        The heads run in fp32 under mixed precision too: they are a few small GEMMs a step, and in
        bf16 an STS score near 4 would be rounded to a multiple of 1/32 (the written predictions,
        and Spearman's ties, with it). Autocast would also cast every head weight each step.
        """
        passes = [enc for sub in batch.values() for enc in sub["inputs"]]
        pooled = self.encode(passes)
        out, k = {}, 0
        with torch.autocast(self.device.type, enabled=False):
            for task, sub in batch.items():
                n = len(sub["inputs"])
                out[task] = self.heads[task]([p.float() for p in pooled[k : k + n]])
                k += n
        return out

    @staticmethod
    def loss(task: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if TASKS[task].is_regression:
            return F.mse_loss(output.float(), labels.float())
        return F.cross_entropy(output.float(), labels.long())

    @staticmethod
    def target(task: str, labels: torch.Tensor) -> torch.Tensor:
        return labels if TASKS[task].is_regression else labels.long()

    @staticmethod
    def prediction(task: str, output: torch.Tensor) -> torch.Tensor:
        return output.float() if TASKS[task].is_regression else output.argmax(-1)

    # ---- steps ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, dict], batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        total = 0.0
        for task, out in outputs.items():
            labels = batch[task]["labels"]
            loss = self.loss(task, out, labels)
            total = total + loss
            self.train_metrics[task].update(self.prediction(task, out.detach()), self.target(task, labels))
            self._accumulate_loss(f"train/{task}/loss", loss)
        self._accumulate_loss("train/loss", total)
        self._log_losses()
        return total

    def _accumulate_loss(self, key: str, loss: torch.Tensor) -> None:
        """Running sum on the device: no per-step `self.log` (about a millisecond of host time each)."""
        s, n = self._loss_sums.get(key, (0.0, 0))
        self._loss_sums[key] = (s + loss.detach(), n + 1)

    def _log_losses(self) -> None:
        """Log the mean loss of each task since the last logging step, on the steps the logger writes."""
        connector = getattr(self._trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        for key, (s, n) in self._loss_sums.items():
            self.log(key, s / n, prog_bar=key != "train/loss", batch_size=1)
        self._loss_sums = {}

    def validation_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        for task, out in self(batch).items():
            labels = batch[task]["labels"]
            pred = self.prediction(task, out)
            self.val_metrics[task].update(pred, self.target(task, labels))
            if not self.trainer.sanity_checking:
                self._val_outputs.setdefault(task, []).append((batch[task]["index"].detach(), pred.detach()))

    def predict_step(self, batch: dict[str, dict], batch_idx: int, dataloader_idx: int = 0) -> dict:
        ((task, out),) = self(batch).items()
        return {"task": task, "index": batch[task]["index"].cpu(), "prediction": self.prediction(task, out).cpu()}

    # ---- epochs and metrics --------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # each rank its own dropout masks under DDP (rank 0's are those of a single process)
        torch.manual_seed(self.seed * 100_003 + self.current_epoch + 7_919 * self.global_rank)

    def on_validation_epoch_start(self) -> None:
        self.adapter.merge()

    def on_validation_epoch_end(self) -> None:
        self.adapter.unmerge()
        dev = self._compute("val")
        outputs, self._val_outputs = self._val_outputs, {}
        if self.trainer.sanity_checking:
            return
        train = self._compute("train")
        # every rank holds every dev prediction (DDP), on the host
        outputs = merge_ranks(gather({t: [(i.cpu(), p.cpu()) for i, p in v] for t, v in outputs.items()}))
        record = {"epoch": self.current_epoch + 1, "step": self.global_step, "train": train, "dev": dev}
        record["train_avg"], record["dev_avg"] = average(train), average(dev)
        flat = {f"val/{t}/{m}": v for t, ms in dev.items() for m, v in ms.items()}
        flat.update({f"train/{t}/{m}": v for t, ms in train.items() for m, v in ms.items()})
        if record["train_avg"] is not None:
            flat["train/avg"] = record["train_avg"]
        # the values are the same on every rank (synchronised metrics): sync_dist only averages equals
        many = self.trainer.world_size > 1
        flat = {k: v for k, v in flat.items() if v is not None and not math.isnan(v)}
        self.log_dict(flat, prog_bar=False, sync_dist=many)
        self.log("val/avg", record["dev_avg"], prog_bar=True, sync_dist=many)
        best = max((h["dev_avg"] for h in self.history if h.get("dev_avg") is not None), default=None)
        if record["dev_avg"] is not None and (best is None or record["dev_avg"] > best):
            self.best_dev_predictions = {
                t: (torch.cat([i for i, _ in v]), torch.cat([p for _, p in v])) for t, v in outputs.items()
            }
        self.history.append(record)

    def _compute(self, stage: str) -> dict[str, dict[str, float]]:
        result = {}
        for task, coll in (self.train_metrics if stage == "train" else self.val_metrics).items():
            # under DDP compute() is a collective: every rank computes when any rank has updates
            if not any_rank(any(m.update_count for m in coll.values()), self.device):
                continue
            result[task] = {k: float(v) for k, v in coll.compute().items()}
            coll.reset()
        return result

    def on_predict_start(self) -> None:
        self.adapter.merge()

    def on_predict_end(self) -> None:
        self.adapter.unmerge()

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(self):
        groups = []
        for part, lr in self.param_parts():
            decay, no_decay = [], []
            for name, p in part:
                (decay if p.ndim >= 2 and "LayerNorm" not in name else no_decay).append(p)
            groups += [
                {"params": decay, "lr": lr, "weight_decay": self.optim["weight_decay"]},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            ]
        # one kernel per step instead of per-tensor ops; not with fp16's GradScaler (see clipping below)
        fused = self.device.type in ("cuda", "cpu") and self._grad_scaler is None
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=self.optim["lr"],
            betas=self.optim["betas"],
            eps=self.optim["eps"],
            fused=fused,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            if self.lr_schedule == "linear":
                return max(0.0, 1.0 - progress)
            if self.lr_schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def _grad_scaler(self):
        """fp16-mixed's GradScaler, or None (fp32, bf16-mixed)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip here when no gradient scaler is involved (fp32, bf16-mixed).

        Lightning's mixed-precision plugin refuses to clip for a fused optimizer, because with fp16
        its GradScaler unscales inside the fused step; bf16 has no scaler, so the gradients are the
        true ones and can be clipped directly, on the device, without a host sync.
        """
        if gradient_clip_val is None or gradient_clip_val <= 0:
            return
        if self._grad_scaler is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def param_parts(self) -> list[tuple[list[tuple[str, nn.Parameter]], float]]:
        """Trainable parameters split into encoder weights, adapter parameters and heads, with their lr."""
        lr = self.optim["lr"]
        adapter_lr = self.optim["adapter_lr"] if self.optim["adapter_lr"] is not None else lr
        head_lr = self.optim["head_lr"] if self.optim["head_lr"] is not None else lr
        # what the adapter's layers inside the encoder add (LoRA's A and B, (IA)^3's vectors), not their base
        injected = {
            id(p)
            for m in getattr(self.adapter, "layers", [])
            for n, p in m.named_parameters()
            if not n.startswith("base.")
        }
        encoder, adapter, heads = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("heads."):
                heads.append((name, p))
            elif name.startswith("adapter.") or id(p) in injected:
                adapter.append((name, p))
            else:
                encoder.append((name, p))
        return [(encoder, lr), (adapter, adapter_lr), (heads, head_lr)]

    # ---- checkpoints ---------------------------------------------------------------------
    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["peft_lightning"] = {"identity": self.identity, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("peft_lightning")
        if meta is None:
            raise ValueError("this checkpoint was not written by peft-lightning (no 'peft_lightning' entry)")
        check_identity(meta["identity"], self.identity)
        have, want = set(checkpoint["state_dict"]), self.trainable_keys()
        if have != want:
            raise ValueError(
                f"checkpoint weights do not fit this model: missing {sorted(want - have)[:5]}, "
                f"unexpected {sorted(have - want)[:5]}"
            )
        if self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            self.history = list(meta.get("history", []))  # resuming: continue the record

    def param_counts(self) -> dict:
        def count(mods, trainable: bool) -> int:
            return sum(p.numel() for m in mods for p in m.parameters() if p.requires_grad or not trainable)

        enc = [self.encoder, self.adapter]
        everything = [*enc, self.heads]
        return {
            "encoder": {"trainable": count(enc, True), "total": count(enc, False)},
            "with_heads": {"trainable": count(everything, True), "total": count(everything, False)},
            "heads": count([self.heads], False),
        }


def merge_ranks(per_rank: list[dict]) -> dict[str, list]:
    """{task: [(row index, prediction), ...]} of every rank, as one."""
    merged: dict[str, list] = {}
    for outputs in per_rank:
        for task, pairs in outputs.items():
            merged.setdefault(task, []).extend(pairs)
    return merged


def store_frozen_in(encoder: nn.Module, dtype: torch.dtype) -> None:
    """Keep frozen matrices (and frozen linear biases) in the autocast dtype, once.

    Under autocast, F.linear casts its operands every call; a frozen operand already in the compute
    dtype is used as is (half the memory, one cast op fewer per layer and step). LayerNorm weights
    stay fp32: autocast runs LayerNorm in fp32.
    """
    linear_biases = {id(m.bias) for m in encoder.modules() if isinstance(m, nn.Linear) and m.bias is not None}
    for p in encoder.parameters():
        if not p.requires_grad and (p.ndim >= 2 or id(p) in linear_biases):
            p.data = p.data.to(dtype)


def average(scores: dict[str, dict[str, float]]) -> float | None:
    """Mean of each task's main metric (SST-5 acc, QQP acc, STS-B Pearson) over the tasks present."""
    vals = [scores[t][TASKS[t].main_metric] for t in scores if TASKS[t].main_metric in scores[t]]
    return float(sum(vals) / len(vals)) if vals else None


def check_identity(saved: dict, current: dict) -> None:
    """Raise if a checkpoint was trained with another adapter, backbone, or head setup."""
    diffs = []
    for key in ("adapter", "backbone", "tasks", "pooling", "pair_encoding", "sts_head", "pair_features"):
        a, b = saved.get(key), current.get(key)
        if a != b:
            diffs.append(f"{key}: checkpoint has {a}, this run has {b}")
    if diffs:
        raise ValueError("checkpoint does not match this run's configuration:\n  " + "\n  ".join(diffs))
