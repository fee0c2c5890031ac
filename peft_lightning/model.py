"""MultiTaskModel: a BERT encoder, one adapter strategy and the task heads, as a plain `nn.Module`.

This is the network of a run, without Lightning: training (`module.py`), `load_run` and
`peft-predict` (`api.py`), `peft-export` and `peft-bench` all use it. A forward pass takes a batch
of the data module (`{task: {"inputs": [encoder passes], ...}}`) and returns each task's head output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.adapters.base import Adapter
from peft_lightning.checks import real
from peft_lightning.encoder import BertEncoder
from peft_lightning.fastpath.precision import COMPILE_MODES
from peft_lightning.heads import build_heads
from peft_lightning.tasks import get_tasks

IDENTITY_KEYS = ("adapter", "backbone", "tasks", "pooling", "pair_encoding", "sts_head", "pair_features")


class MultiTaskModel(nn.Module):
    """Backbone + adapter + heads.

    Args:
        encoder: the BERT encoder (pretrained weights loaded); the adapter is attached to it here.
        adapter: the strategy.
        tasks: task keys; None means all three.
        pooling: `pooler`, `cls` or `mean` sentence vector.
        pair_encoding: `separate` or `cross` (must match the data module).
        sts_head: `mlp` or `cosine`.
        head_dropout: dropout inside the heads.
        pair_features: `concat` ([u; v], the study) or `sbert` ([u; v; |u-v|; u*v]) for pair heads.
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
        fuse_passes: bool = False,
        compile: bool | str = False,
        identity: dict | None = None,
    ):
        super().__init__()
        head_dropout = real("model.head_dropout", head_dropout, 0, 1)
        if compile not in (True, False) and compile not in COMPILE_MODES:
            raise ValueError(
                f"model.compile={compile!r} is unknown; expected true, false or one of {list(COMPILE_MODES)}"
            )
        self.task_names = [t.name for t in get_tasks(tasks)]
        self.encoder, self.adapter = encoder, adapter
        adapter.attach(encoder)
        self.pooling, self.pair_encoding, self.fuse_passes = pooling, pair_encoding, fuse_passes
        self.compile_mode, self.compiled = compile, False
        self.heads = build_heads(
            get_tasks(self.task_names), encoder.config.hidden_size, pair_encoding, sts_head, head_dropout, pair_features
        )
        self.identity = {
            "adapter": adapter.describe(),
            "backbone": identity or {},
            "tasks": self.task_names,
            "pooling": pooling,
            "pair_encoding": pair_encoding,
            "sts_head": sts_head,
            "pair_features": pair_features,
        }
        self.train(self.training)  # a frozen encoder starts in eval mode (Lightning restores modes it saw)

    def compile_encoder(self) -> None:
        """`torch.compile` the encoder in place, once, when asked (parameter names, and checkpoints, stay)."""
        if self.compile_mode and not self.compiled:
            self.encoder.compile(mode=None if self.compile_mode is True else self.compile_mode)
            self.compiled = True

    @property
    def cuda_graphs(self) -> bool:
        return self.compiled and self.compile_mode in ("reduce-overhead", "max-autotune")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.adapter.freeze_encoder:
            self.encoder.eval()  # frozen strategy: no dropout in the encoder
        return self

    def encode(self, passes: list[dict]) -> list[torch.Tensor]:
        """Pooled vectors (B_i, hidden) for each encoder pass of a step."""
        grad = torch.is_grad_enabled() and not self.adapter.freeze_encoder
        if self.cuda_graphs:  # each step is a new CUDA-graph generation: the last step's outputs are free
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
        passes = [enc for sub in batch.values() for enc in sub.get("inputs", ())]
        pooled = self.encode(passes) if passes else []
        out, k = {}, 0
        first = passes[0]["input_ids"] if passes else next(iter(batch.values()))["features"][0]
        device = first.device.type
        with torch.autocast(device, enabled=False):
            for task, sub in batch.items():
                if "features" in sub:  # a frozen encoder's cached vectors (features.py)
                    vectors = sub["features"]
                else:
                    n = len(sub["inputs"])
                    vectors, k = pooled[k : k + n], k + n
                out[task] = self.heads[task]([p.float() for p in vectors])
        return out

    def parts(self) -> tuple[list, list, list]:
        """Trainable (name, parameter) pairs split into the encoder's own weights, what the adapter
        adds (LoRA's A and B inside the encoder, prefixes) and the heads."""
        # the adapter's own parameters inside the encoder (LoRA's A and B, (IA)^3's vectors, BitFit's biases)
        injected = {id(p) for p in self.adapter.encoder_params()}
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
        return encoder, adapter, heads

    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def check_checkpoint(self, checkpoint: dict) -> dict:
        """A checkpoint's peft-lightning entry, once the checkpoint is shown to fit this model: written by
        peft-lightning, with the same adapter, backbone and heads, and weights for exactly what trains."""
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
        return meta

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


def check_identity(saved: dict, current: dict) -> None:
    """Raise if a checkpoint was trained with another adapter, backbone, or head setup."""
    diffs = []
    for key in IDENTITY_KEYS:
        a, b = saved.get(key), current.get(key)
        if a != b:
            diffs.append(f"{key}: checkpoint has {a}, this run has {b}")
    if diffs:
        raise ValueError("checkpoint does not match this run's configuration:\n  " + "\n  ".join(diffs))
