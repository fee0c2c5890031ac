"""`peft-export RUN_DIR --out DIR [--merged]`: take a trained run into the Hugging Face ecosystem.

- LoRA, DoRA and (IA)^3: `DIR/adapter_config.json` and `DIR/adapter_model.safetensors` in PEFT's
  own format (written by PEFT's `save_pretrained`) for a transformers `BertModel` of the run's
  backbone, so that `PeftModel.from_pretrained(BertModel.from_pretrained(backbone), DIR)` computes
  our encoder's hidden states. Our q/k/v layers are separate modules with PEFT's names
  (`encoder.layer.N.attention.self.query`, ...), so each of our layers is one PEFT layer; the
  targets are written as that list of full names, and the scale as PEFT's: `fixed` (g = 1) is
  `lora_alpha = r`, `alpha_over_r` is `lora_alpha = alpha`, `rslora` adds `use_rslora`, DoRA
  `use_dora` (our magnitude is PEFT's `lora_magnitude_vector`).
- `--merged` (and full fine-tuning, frozen): a plain transformers `BertModel` folder
  (`save_pretrained`, the adapter merged into the weights in fp32) with its tokenizer.
- Always: the task heads in `DIR/heads.safetensors` and `DIR/heads.json` (their tensors' shapes,
  the sentence vector they read and how pair features are formed) and `DIR/peft_lightning.json`
  (where the export came from).

Bottleneck adapters: PEFT has none, and they do not merge (their non-linearity is their own
computation): `DIR/adapter.safetensors` and `DIR/adapter.json` in this project's native layout
(`native.py`), which `load_run(DIR)` and `peft-predict DIR` read.

Prefix tuning is not exported to PEFT: PEFT feeds the prefixes as a key/value cache, which gives
the real tokens position ids P..P+T-1, where ours keep 0..T-1 (the study's, and what the
pretrained position table was trained on); the same prefixes would give other hidden states. And
a prefix is not a weight, so it does not merge either.

The way back: `adapter=lora adapter.init_from=DIR` starts LoRA from a PEFT LoRA adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from peft_lightning import native as native_format
from peft_lightning.api import RunModel, load_run
from peft_lightning.backbone import resolve_source
from peft_lightning.files import describe_os_error, dir_mode, file_mode
from peft_lightning.interrupt import Interrupted, on_signals


class ExportError(ValueError):
    """A run that cannot be exported the way asked; the message says why and what can be."""


def plain_state_dict(encoder) -> dict[str, torch.Tensor]:
    """Our encoder's weights under transformers' BertModel names (a wrapper's `base.` dropped, its
    own parameters left out): what `load_backbone` loaded, with merged updates in it."""
    wrappers = {n for n, m in encoder.named_modules() if hasattr(m, "peft_tensors")}  # wrapped layers
    out = {}
    for key, value in encoder.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in wrappers:
            continue  # lora_A, lora_B, magnitude, ia3_l
        for w in wrappers:
            if key.startswith(w + ".base."):
                key = w + "." + key[len(w) + len(".base.") :]
                break
        out[key] = value.detach().float().clone()
    return out


def hf_config(run: RunModel):
    from transformers import AutoConfig

    model = run.config["model"]
    config = AutoConfig.from_pretrained(resolve_source(model["source"]))
    for key, value in (model.get("config_overrides") or {}).items():
        setattr(config, key, value)
    return config


def export_merged(run: RunModel, out: Path) -> None:
    """A transformers BertModel folder with the adapter merged in (fp32), and the tokenizer."""
    from transformers import BertModel

    if run.model.adapter.name == "prefix":
        raise ExportError("prefix tuning has no weights to merge (its prefixes are extra keys and values)")
    encoder = run.model.encoder
    run.model.adapter.merge()
    # always with a pooler, so that BertModel.from_pretrained finds every weight it builds (no "newly
    # initialized" pooler); a run that pools otherwise keeps the backbone's own pooler, unused by its heads
    hf = BertModel(hf_config(run), add_pooling_layer=True)
    state = plain_state_dict(encoder)
    if encoder.pooler is None:
        state.update(
            backbone_pooler(run.config["model"])
            or {k: v.clone() for k, v in hf.pooler.state_dict(prefix="pooler.").items()}
        )
    result = hf.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"weights do not fit BertModel: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    hf.save_pretrained(out)
    run.tokenizer.save_pretrained(out)


def backbone_pooler(model: dict) -> dict[str, torch.Tensor] | None:
    """The pooler weights of the run's pretrained backbone (`pooler.dense.*`), or None (random init,
    or a checkpoint without them)."""
    from safetensors import safe_open

    if model.get("random_init"):
        return None
    try:
        path = Path(resolve_source(model["source"])) / "model.safetensors"
    except ValueError:
        return None
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        found = {k: k.split("pooler.", 1)[1] for k in f.keys() if "pooler.dense." in k}
        if len(found) != 2:
            return None
        return {f"pooler.{short}": f.get_tensor(k).float() for k, short in found.items()}


@torch.no_grad()
def export_peft(run: RunModel, out: Path) -> None:
    """PEFT's adapter_config.json and adapter_model.safetensors (see the module doc), written by PEFT:
    the strategy's `peft_config()` and each wrapped layer's `peft_tensors()`, copied by name."""
    import peft
    from transformers import BertModel

    adapter = run.model.adapter
    adapter.unmerge()  # the factors themselves, not a merged weight
    config = exact_targets({**adapter.peft_config(), "base_model_name_or_path": base_model_name(run.config["model"])})
    hf = BertModel(hf_config(run), add_pooling_layer=run.model.encoder.pooler is not None)
    pm = peft.get_peft_model(hf, peft.get_peft_config(config))
    for name, layer in zip(adapter.target_names, adapter.layers):
        target = pm.base_model.model.get_submodule(name)
        for part, tensor in layer.peft_tensors().items():
            slot = getattr(target, part)["default"]  # an nn.Linear (LoRA's A, B; DoRA's magnitude) or a Parameter
            param = slot.weight if isinstance(slot, torch.nn.Module) else slot
            param.data.copy_(tensor.data.float().view_as(param))
    pm.save_pretrained(out, safe_serialization=True)


def export_native(run: RunModel, out: Path) -> None:
    """An adapter with no PEFT format that does not merge (bottleneck): the native layout (`native.py`)."""
    from safetensors.torch import save_file

    tensors = native_format.native_tensors(run.model)
    save_file(tensors, out / native_format.TENSORS)
    spec = {
        "format": native_format.FORMAT,
        "adapter": run.model.adapter.describe(),
        "base_model_name_or_path": base_model_name(run.config["model"]),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    (out / native_format.CONFIG).write_text(json.dumps(spec, indent=2) + "\n")


def base_model_name(model: dict) -> str:
    """What the export names as its base model: the backbone's hub id (`model.hub_id`: the packaged
    MiniLM's is on the hub, so the adapter is portable), a hub source as it is, else the local folder."""
    if model.get("hub_id"):
        return str(model["hub_id"])
    return resolve_source(model["source"])


def exact_targets(config: dict) -> dict:
    """`target_modules` (and (IA)^3's `feedforward_modules`) as a regex matching exactly the layers
    with factors. PEFT shortens a long list of names to suffixes on saving (`dense`), which also
    match a BertModel's `pooler.dense`: its load then warns of missing pooler keys. A string is
    PEFT's full-match regex, and it saves a string as it is."""
    import re

    out = dict(config)
    for key in ("target_modules", "feedforward_modules"):
        if isinstance(out.get(key), list):
            out[key] = "^(" + "|".join(re.escape(n) for n in out[key]) + ")$"
    return out


def export_heads(run: RunModel, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in run.model.heads.state_dict().items()}
    save_file(state, out / "heads.safetensors")
    model, data = run.config["model"], run.config["data"]
    features = {"concat": "[u; v]", "sbert": "[u; v; |u - v|; u * v]"}[model["pair_features"]]
    spec = {
        "sentence_vector": {
            "pooler": "BertModel's pooler_output",
            "cls": "hidden state of [CLS]",
            "mean": "mean of the hidden states over the attention mask",
        }[model["pooling"]],
        "pooling": model["pooling"],
        "pair_encoding": data["pair_encoding"],
        "pair_features": model["pair_features"],
        "pair_input": (
            f"u, v = the sentence vectors of sentence1 and sentence2, encoded apart; the head reads {features}"
            if data["pair_encoding"] == "separate"
            else "the sentence vector of the pair encoded together ([CLS] s1 [SEP] s2 [SEP])"
        ),
        "sts_head": model["sts_head"],
        "heads": {
            task: {
                "outputs": "logits over classes 0..4"
                if task == "sst5"
                else "logits over 0/1"
                if task == "qqp"
                else ("5 * cos(u, v)" if model["sts_head"] == "cosine" else "a score 0..5"),
                "tensors": {k[len(task) + 1 :]: list(v.shape) for k, v in state.items() if k.startswith(task + ".")},
            }
            for task in run.tasks
        },
    }
    (out / "heads.json").write_text(json.dumps(spec, indent=2) + "\n")


def check_out(out: Path, force: bool) -> None:
    """An export goes into a new or empty folder (`force`: one whose files it replaces, all of them)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(
            f"--out {out} is not empty ({len(list(out.iterdir()))} entries); an export there would mix with "
            "them: give a new folder, or --force to replace its contents"
        )
    parent = out.parent if out.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ExportError(f"--out {out}: {probe} cannot be written")


def export(
    run_dir: str | Path, out: str | Path, merged: bool = False, checkpoint: str = "best", force: bool = False
) -> Path:
    """Export a run (see the module doc) into `out`, a new or empty folder (or, with `force`, one
    whose contents it replaces); returns the folder written. The files are written into a temporary
    folder beside `out` and moved into place at the end: a failed export leaves `out` as it was."""
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _export(run_dir, staging, merged, checkpoint)
        os.chmod(staging, dir_mode())
        for f in staging.iterdir():
            os.chmod(f, file_mode())  # safetensors writes 0600: every file as a plainly created one
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _export(run_dir: str | Path, out: Path, merged: bool, checkpoint: str) -> None:
    run = load_run(run_dir, checkpoint)
    name = run.model.adapter.name
    native = all(hasattr(layer, "native_tensors") for layer in getattr(run.model.adapter, "layers", [None]))
    if native and merged:
        raise ExportError(
            f"{name} does not merge into the weights (its non-linearity is its own computation); export it "
            "without --merged, in the native layout"
        )
    if not merged and native:
        export_native(run, out)
    elif not merged and not hasattr(run.model.adapter, "peft_config"):
        if name == "prefix":
            raise ExportError(
                "prefix tuning is not exportable to PEFT: PEFT passes prefixes as a key/value cache, "
                "which moves the real tokens to position ids P..P+T-1 (ours keep 0..T-1), so the same "
                "prefixes give other hidden states; and prefixes do not merge into weights"
            )
        merged = True  # full fine-tuning and frozen: the weights themselves
    if merged:
        export_merged(run, out)
    elif not native:
        export_peft(run, out)
    export_heads(run, out)
    meta = {
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": checkpoint,
        "adapter": run.model.adapter.describe(),
        "format": "transformers BertModel (merged)" if merged else native_format.FORMAT if native else "PEFT adapter",
        "backbone": run.config["model"]["source"],
        "tasks": run.tasks,
        "config": run.config,  # the run's resolved config: load_run rebuilds a native export from it
    }
    (out / "peft_lightning.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="peft-export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--merged", action="store_true", help="a plain BertModel folder with the adapter merged in")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    args = p.parse_args(argv)
    try:
        with on_signals():  # SIGTERM / SIGINT: the staging folder removed, --out as it was
            out = export(args.run_dir, args.out, args.merged, args.checkpoint, args.force)
    except Interrupted as err:
        print(f"peft-export: {err}; {args.out} left as it was", file=sys.stderr)
        return err.exit_code
    except ImportError as err:
        print(f"peft-export: {err} (PEFT's format needs peft: pip install peft)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"peft-export: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder gone: named, never a traceback
        print(f"peft-export: {describe_os_error(err)}", file=sys.stderr)
        return 1
    print(f"exported {args.run_dir} to {out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
