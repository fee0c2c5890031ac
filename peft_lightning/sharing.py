"""Studies share runs: a job whose training config equals a complete run's under the sweep root is
taken from that run, not trained again.

The five paper studies overlap: main's LoRA r=8 is lora_rank's r=8, main's prefix P=4 with its
MLP is prefix_length's P=4 and prefix_mlp's MLP row at P=4. `training_identity` is a run's
resolved config less what does not change what it trains and writes (its study and folder, the
loggers, the checkpoints it keeps, the feature cache, ...). A job with the identity of a complete
run elsewhere under `sweep_root` gets that run's results.json (its own name, study and config, and
`shared_from`: the source's folder, relative to the sweep root) and a copy of its predictions, so
every study it belongs to reports it; its checkpoints stay in the source (`load_run` follows the
reference). `force=true` trains it anyway.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from peft_lightning.files import atomic_write_text
from peft_lightning.optim import TUNED_ROLE

log = logging.getLogger(__name__)

# top-level keys that do not change what a run trains or writes
IGNORED = {
    "study",
    "output_dir",
    "overrides",
    "run_name",
    "sweep_root",
    "force",
    "ckpt_path",
    "raise_errors",
    "checkpoints",
    "feature_cache",
    "logger",
    "gpus",
    "report",
    "tune",
    "budget",
    "plan",
}
IGNORED_DATA = {"cache_dir", "num_workers"}
IGNORED_TRAINER = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"}
IGNORED_MODEL = {"hub_id"}  # where an export says the backbone comes from


def training_identity(config: dict) -> dict:
    """What makes two runs the same run (see the module doc). `optim.tuned_lr` is folded into the lr
    it sets, so peft-tune's final run at the lr a budget already trains its strategy at is that run."""
    out = {k: v for k, v in config.items() if k not in IGNORED}
    if isinstance(out.get("optim"), dict) and "tuned_lr" in out["optim"]:
        out["optim"] = fold_tuned_lr(out["optim"], strategy_name(out.get("adapter")))
    # settings added after runs were made, at the value that trains as before, are dropped: a run
    # from before they existed is still the same run
    if out.get("mtl") in ({"name": "sum"}, None):
        out.pop("mtl", None)
    if isinstance(out.get("optim"), dict) and out["optim"].get("loraplus_ratio", 0) is None:
        out["optim"] = {k: v for k, v in out["optim"].items() if k != "loraplus_ratio"}
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k not in IGNORED_DATA}
        if out["data"].get("epoch_parts") == 1:
            out["data"].pop("epoch_parts")
    if isinstance(out.get("trainer"), dict):
        out["trainer"] = {k: v for k, v in out["trainer"].items() if k not in IGNORED_TRAINER}
    if isinstance(out.get("model"), dict):
        out["model"] = {k: v for k, v in out["model"].items() if k not in IGNORED_MODEL}
    return out


def strategy_name(adapter) -> str:
    """The strategy of a config's `adapter:` block (its class's `name`)."""
    target = str((adapter or {}).get("_target_", "?")) if isinstance(adapter, dict) else "?"
    try:
        from hydra.utils import get_class

        return get_class(target).name
    except Exception:  # an adapter this install cannot import: its class name
        return target.rsplit(".", 1)[-1].lower()


def fold_tuned_lr(optim: dict, strategy: str) -> dict:
    """`optim:` with `tuned_lr` written into the lr it sets for `strategy` (optim.TUNED_ROLE)."""
    out = {k: v for k, v in optim.items() if k != "tuned_lr"}
    if optim.get("tuned_lr") is not None:
        out[TUNED_ROLE.get(strategy, "adapter_lr")] = float(optim["tuned_lr"])
    return out


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def complete_runs(root: Path) -> list[tuple[Path, dict]]:
    """(folder, results) of the complete, trained (not themselves shared) runs under root."""
    runs = []
    for path in sorted(root.rglob("results.json")) if root.is_dir() else []:
        res = _read(path)
        if res and res.get("status") == "complete" and not res.get("shared_from") and "config" in res:
            runs.append((path.parent, res))
    return runs


def covers(source: dict, job: dict) -> bool:
    """Whether a complete run of config `source` is the run `job` asks for: the same training
    identity, where a run that also wrote test predictions covers a job that asks for none
    (peft-tune's search runs, predict=false, are the studies' runs at the same lr and seed)."""
    a, b = training_identity(source), training_identity(job)
    predicts = (a.pop("predict", True), b.pop("predict", True))
    return a == b and (predicts[0] or not predicts[1])


def find_shared(config: dict, run_dir: Path, root: Path, runs: list | None = None) -> tuple[Path, dict] | None:
    """A complete run under `root`, other than `run_dir`, that `covers` the run `config` asks for."""
    if not _inside(run_dir, root):
        return None
    for folder, res in complete_runs(root) if runs is None else runs:
        if folder.resolve() != run_dir.resolve() and covers(res["config"], config):
            return folder, res
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def take_shared(run_dir: Path, root: Path, source: Path, res: dict, meta: dict) -> dict:
    """Make `run_dir` the shared copy of the run in `source`: its predictions, then its results.json
    (last, so that a kill in between leaves a run that is not complete, and taken again)."""
    for folder in ("predictions", "csv"):
        if (source / folder).is_dir():
            shutil.copytree(source / folder, run_dir / folder, dirs_exist_ok=True)
    out = {**res, **{k: meta[k] for k in ("run_name", "study", "overrides", "config") if k in meta}}
    out["shared_from"] = str(source.resolve().relative_to(root.resolve()))
    atomic_write_text(run_dir / "results.json", json.dumps(out, indent=2, default=float))
    log.info("%s: taken from %s (the same training config; force=true trains it anew)", run_dir, source)
    return out


def source_dir(run_dir: Path, res: dict) -> Path:
    """The folder that holds a run's checkpoints: its own, or its source's when it is shared."""
    shared = res.get("shared_from")
    if not shared:
        return run_dir
    root = Path(run_dir).resolve()
    for parent in root.parents:  # the sweep root is the ancestor the reference is relative to
        if (parent / shared / "results.json").is_file():
            return parent / shared
    return run_dir


FOLLOW_UP = {"predict"}  # what a finished run can still do without training again (train.finish_complete)


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def config_differences(there: dict, here: dict) -> list[tuple[str, object, object]]:
    """The keys (dotted) where two runs' training identities differ, with the folder's value and the
    command's (`<unset>` where one lacks the key); what a finished run can still do is left out."""
    a = _flat({k: v for k, v in training_identity(there).items() if k not in FOLLOW_UP})
    b = _flat({k: v for k, v in training_identity(here).items() if k not in FOLLOW_UP})
    missing = "<unset>"
    return [
        (k, a.get(k, missing), b.get(k, missing))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def describe_differences(diffs: list[tuple[str, object, object]], most: int = 4) -> str:
    """The differences in words; a group whose class differs (another adapter) is said by it alone."""
    swapped = {k.rsplit(".", 1)[0] for k, _, _ in diffs if k.endswith("._target_")}
    diffs = [d for d in diffs if d[0].endswith("._target_") or d[0].rsplit(".", 1)[0] not in swapped]
    shown = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in diffs[:most])
    return shown + (f"; and {len(diffs) - most} more" if len(diffs) > most else "")
