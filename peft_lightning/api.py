"""Use a finished run from Python: `load_run(RUN_DIR).predict("sst5", ["a fine film"])`.

The run is rebuilt from its own `results.json` config exactly as `peft-train` built it (the same
backbone, adapter and heads; `build.py`), and its best checkpoint (what trains) is loaded on top.
Predictions are made as the run made its own: adapters merged, rows batched by length in
batches of the run's `data.eval_batch_size`.

    from peft_lightning import load_run
    m = load_run("outputs/adhoc/adapter=lora,...")
    m.predict("sst5", ["a fine film", "a dull one"])        # [3, 1]: classes 0..4
    m.predict("stsb", [("a man plays", "a man is playing")])  # [4.1...]: a score 0..5
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from peft_lightning import native
from peft_lightning.build import build_adapter, build_backbone, build_model
from peft_lightning.data.datamodule import EvalDataset
from peft_lightning.data.encoded import encode_split
from peft_lightning.data.readers import Split, read_file
from peft_lightning.model import MultiTaskModel
from peft_lightning.module import task_metrics
from peft_lightning.results import read_results
from peft_lightning.rundir import read_checkpoint_meta
from peft_lightning.sharing import source_dir
from peft_lightning.tasks import TASKS


@dataclass
class RunModel:
    """A trained run, ready to score rows: its model (merged, in eval mode), tokenizer and config."""

    model: MultiTaskModel
    tokenizer: object
    config: dict
    run_dir: Path

    @property
    def tasks(self) -> list[str]:
        return self.model.task_names

    def predict(self, task: str, rows: list, batch_size: int | None = None, return_probs: bool = False) -> list:
        """Predictions for `rows`: sentences (sst5) or (sentence1, sentence2) pairs (qqp, stsb).

        Returns class ids (sst5 0..4, qqp 0/1) or STS-B scores, in the order of `rows`; with
        `return_probs` (sst5, qqp), each row's class probabilities (softmax of the logits) instead.
        """
        t = self._task(task)
        texts = []
        for i, row in enumerate(rows):
            parts = (row,) if isinstance(row, str) else tuple(row)
            if len(parts) != len(t.text_columns) or not all(isinstance(p, str) and p.strip() for p in parts):
                raise ValueError(f"{task} row {i}: expected {_shape(t)}, got {row!r}")
            texts.append(tuple(p.strip() for p in parts))
        split = Split(task, "input", Path("<rows>"), [str(i) for i in range(len(rows))], texts, None)
        return self.predict_split(split, batch_size, return_probs)

    def predict_file(
        self, task: str, path: str | Path, batch_size: int | None = None, return_probs: bool = False
    ) -> tuple[Split, list]:
        """Read a TSV file of the task's columns (labels and ids optional: row numbers without) and
        predict every row."""
        split = read_file(Path(path), self._task(task), "input", labels=None, ids=False)
        return split, self.predict_split(split, batch_size, return_probs)

    @torch.no_grad()
    def predict_split(self, split: Split, batch_size: int | None = None, return_probs: bool = False) -> list:
        """Predictions for a split's rows, in its order (see `predict`)."""
        if return_probs and TASKS[split.task].is_regression:
            raise ValueError(f"{split.task} is a regression (a score 0..5): it has no class probabilities")
        data = self.config["data"]
        if not len(split):
            return []
        enc = encode_split(split, self.tokenizer, data["max_length"], data["pair_encoding"], cache_dir=None)
        pad = int(self.tokenizer.pad_token_id or 0)
        batches = EvalDataset(enc, batch_size or data["eval_batch_size"], pad, data.get("pad_to_multiple_of", 1))
        out: list = [None] * len(split)
        device = next(self.model.parameters()).device
        for i in range(len(batches)):
            batch = _to(batches[i], device)
            ((task, pred),) = self.model(batch).items()
            if return_probs:
                probs = torch.softmax(pred.float(), dim=-1).cpu().tolist()
                for row, p in zip(batch[task]["index"].tolist(), probs):
                    out[row] = p
                continue
            values = TASKS[task].prediction(pred).cpu().tolist()
            for row, v in zip(batch[task]["index"].tolist(), values):
                out[row] = float(v) if TASKS[task].is_regression else int(v)
        return out

    def metrics(self, task: str, predictions: list, labels: list) -> dict[str, float]:
        """The run's metrics of `predictions` against `labels` (as in its dev scores)."""
        t = TASKS[task]
        coll = task_metrics(task)
        pred = torch.tensor(predictions, dtype=torch.float32 if t.is_regression else torch.long)
        target = torch.tensor(labels, dtype=torch.float32)
        coll.update(pred, target if t.is_regression else target.long())
        return {k: float(v) for k, v in coll.compute().items()}

    def _task(self, task: str):
        if task not in self.tasks:
            raise ValueError(f"task {task!r}: this run was trained on {self.tasks}")
        return TASKS[task]


def _shape(task) -> str:
    return (
        "a non-empty sentence" if len(task.text_columns) == 1 else "a (sentence1, sentence2) pair of non-empty strings"
    )


def _to(batch: dict, device: torch.device) -> dict:
    return {
        t: {
            "inputs": [{k: v.to(device) for k, v in p.items()} for p in sub["inputs"]],
            "index": sub["index"],
        }
        for t, sub in batch.items()
    }


def run_checkpoint(run_dir: Path, which: str = "best") -> Path:
    path = run_dir / "checkpoints" / f"{which}.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (has the run finished an epoch?)")
    return path


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> RunModel:
    """Rebuild a run from `RUN_DIR/results.json` and load `checkpoints/<checkpoint>.ckpt`.

    Args:
        run_dir: a folder `peft-train` wrote (results.json, checkpoints/), or a `peft-export` folder
            in the native layout (a bottleneck run's: `native.py`).
        checkpoint: `best` (the best dev epoch, whose predictions the run wrote) or `last`.
        device: where to run (`cpu`, `cuda`, ...).
    """
    run_dir = Path(run_dir)
    if (run_dir / native.TENSORS).is_file():
        return load_native_export(run_dir, device)
    res = read_results(run_dir)
    if res is None or "config" not in res:
        raise FileNotFoundError(f"{run_dir}: no readable results.json with the run's config (not a peft-train run?)")
    cfg = OmegaConf.create(res["config"])
    ckpt = read_checkpoint_meta(run_checkpoint(source_dir(run_dir, res), checkpoint))
    backbone = build_backbone(cfg)
    model = build_model(cfg, backbone, build_adapter(cfg.adapter), list(cfg.data.tasks))
    model.check_checkpoint(ckpt)  # the same backbone, adapter and heads, or a clear error
    model.load_state_dict({k: v.clone() for k, v in ckpt["state_dict"].items()}, strict=False)
    model.to(device).eval()
    model.adapter.merge()
    return RunModel(model, backbone.tokenizer, OmegaConf.to_container(cfg, resolve=True), run_dir)


def load_native_export(folder: Path, device: str | torch.device = "cpu") -> RunModel:
    """A `peft-export` folder in the native layout: the run rebuilt from the config its
    `peft_lightning.json` records (the backbone from its source), the adapter's and the heads'
    tensors loaded into it."""
    from safetensors.torch import load_file

    meta_path = folder / "peft_lightning.json"
    try:
        meta = json.loads(meta_path.read_text())
        config = meta["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FileNotFoundError(f"{meta_path}: no readable export record with the run's config") from None
    cfg = OmegaConf.create(config)
    backbone = build_backbone(cfg)
    model = build_model(cfg, backbone, build_adapter(cfg.adapter), list(cfg.data.tasks))
    native.load_native(model, load_file(str(folder / native.TENSORS)), str(folder / native.TENSORS))
    heads = load_file(str(folder / "heads.safetensors"))
    model.heads.load_state_dict({k: v.to(next(iter(model.heads.parameters())).dtype) for k, v in heads.items()})
    model.to(device).eval()
    model.adapter.merge()
    return RunModel(model, backbone.tokenizer, OmegaConf.to_container(cfg, resolve=True), folder)
