"""Where the Hydra configs live, how a run folder is named, and composing a config outside `@hydra.main`.

Importing this module registers the resolvers the configs use (`run_name`, `join`), so every entry
point that composes `conf/train.yaml` (peft-train, peft-reproduce, peft-tune, the reports) imports it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

VERSION_BASE = "1.3"  # the behaviour the configs are written for (hydra-core 1.3.x; see pyproject)
MAX_RUN_NAME = 200  # bytes; a file name may have 255


def conf_dir() -> str:
    """`conf/` of a source checkout, or the copy packaged inside the wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "train.yaml").is_file():
            return str(cand)
    raise FileNotFoundError(f"no conf/train.yaml next to {here}")


def check_budget(budget: str, prog: str) -> None:
    """An unknown `budget=` stops a command at once, with the budgets there are."""
    known = sorted(p.stem for p in (Path(conf_dir()) / "budget").glob("*.yaml"))
    if budget not in known:
        raise SystemExit(f"{prog}: budget={budget!r} is unknown; budgets: {', '.join(known)}")


def _run_name(dirname: str) -> str:
    """A run folder's name: the job's overrides (`a=1,b=2`). Over 200 bytes it is cut after a whole
    override and ends in `sha1=<10 hex>` of the full name, so the same overrides name the same folder
    (and resume it) and no file system refuses it."""
    name = dirname.replace("/", "_") if dirname else "default"
    raw = name.encode()
    if len(raw) <= MAX_RUN_NAME:
        return name
    head = raw[: MAX_RUN_NAME - len(",sha1=") - 10].decode(errors="ignore")
    if "," in head:
        head = head.rsplit(",", 1)[0]
    return f"{head},sha1={hashlib.sha1(raw).hexdigest()[:10]}"


def _wandb_mode(mode: str) -> str:
    """`logger.mode=auto`: $WANDB_MODE if set, else online with credentials (WANDB_API_KEY or
    ~/.netrc), offline without."""
    if mode != "auto":
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    return os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")


def _ray_gpus(address: str | None) -> int:
    """GPUs a Ray job asks for: one on a cluster (`ray.init.address` set); on a local Ray, one if
    this machine has a GPU and none if not (a GPU request on a machine without one waits forever)."""
    if address not in (None, "", "null"):
        return 1
    import torch  # only when a Ray sweep resolves its launcher config

    return 1 if torch.cuda.is_available() else 0


OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
OmegaConf.register_new_resolver("ray_gpus", _ray_gpus, replace=True)
OmegaConf.register_new_resolver("wandb_mode", _wandb_mode, replace=True)


def _join(values, fallback=None) -> str:
    """A list as a Hydra sweep's comma-separated values; `values` null: `fallback`'s (`budget.main_seeds`
    null: the budget's seeds)."""
    values = fallback if values is None else values
    if values is None:
        raise ValueError("join: no values (both lists are null)")
    return ",".join(str(x) for x in values)


OmegaConf.register_new_resolver("join", _join, replace=True)


def compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """`conf/train.yaml` with `overrides`, as `peft-train <overrides>` would see it (with `hydra_config`,
    the `hydra:` node too: where a sweep would put its jobs)."""
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=VERSION_BASE):
            return hydra_compose("train", list(overrides), return_hydra_config=hydra_config)
    except HydraException as err:
        said = [str(err).strip()]
        cause = err.__cause__
        if cause is not None and str(cause).strip() and str(cause).strip() not in said[0]:
            said.append(str(cause).strip().splitlines()[0])
        text = " ".join(line for text in said for line in text.splitlines() if line.strip())
        raise ConfigError(text + _near_key(text)) from None


def _near_key(message: str) -> str:
    """ "; did you mean tune.strategies?" for Hydra's "Could not override 'tune.strategy'"."""
    import difflib
    import re

    found = re.search(r"Could not override '([^']+)'", message)
    if not found or "." not in found.group(1):
        return ""
    parent, leaf = found.group(1).rsplit(".", 1)
    node = OmegaConf.select(train_yaml(), parent)
    near = difflib.get_close_matches(leaf, [str(k) for k in node], n=1) if isinstance(node, DictConfig) else []
    return f"; did you mean {parent}.{near[0]}?" if near else ""


class ConfigError(ValueError):
    """An override that does not compose (an unknown key or option): Hydra's message, in one line."""


def train_yaml() -> DictConfig:
    """`conf/train.yaml` as written (no composition): the defaults every run starts from."""
    return OmegaConf.load(Path(conf_dir()) / "train.yaml")
