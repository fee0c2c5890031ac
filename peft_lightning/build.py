"""From a run's resolved config to its objects: backbone, data module, adapter, model and module.

`peft-train` builds a run here, and `load_run` rebuilds a finished one from its results.json config
the same way, so a checkpoint always meets the network it was trained with.
"""

from __future__ import annotations

import inspect

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from peft_lightning.adapters.base import Adapter
from peft_lightning.backbone import Backbone, load_backbone
from peft_lightning.data import MultiTaskDataModule
from peft_lightning.model import MultiTaskModel
from peft_lightning.module import MultiTaskModule
from peft_lightning.mtl import MTL
from peft_lightning.mtl import check as check_mtl
from peft_lightning.optim import Optim


def adapter_options(cls: type) -> list[str]:
    """The keyword options of an adapter class: its constructor's, and those of the classes it
    inherits them from (a subclass need not restate its base's signature)."""
    options: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for name, p in inspect.signature(init).parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in options:
                options.append(name)
    return options


def build_adapter(adapter_cfg: DictConfig) -> Adapter:
    """Instantiate `adapter=...`; an unknown option or bad value becomes one clear ValueError."""
    cls = get_class(adapter_cfg.get("_target_"))
    accepted = adapter_options(cls)
    unknown = [k for k in adapter_cfg if k != "_target_" and k not in accepted]
    if unknown:
        raise ValueError(f"adapter.{unknown[0]} is not an option of {cls.__name__}; options are {accepted}")
    try:
        return instantiate(adapter_cfg, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(str(cause)) from err


def build_backbone(cfg: DictConfig) -> Backbone:
    backbone = load_backbone(
        cfg.model.source,
        cfg.model.pooling,
        cfg.model.random_init,
        OmegaConf.to_container(cfg.model.config_overrides) if cfg.model.get("config_overrides") else None,
        cfg.seed,
    )
    positions = backbone.encoder.config.max_position_embeddings
    if isinstance(cfg.data.max_length, int) and cfg.data.max_length > positions:
        raise ValueError(f"data.max_length={cfg.data.max_length} is more than the backbone's {positions} positions")
    return backbone


def build_model(cfg: DictConfig, backbone: Backbone, adapter: Adapter, tasks: list[str]) -> MultiTaskModel:
    return MultiTaskModel(
        backbone.encoder,
        adapter,
        tasks=tasks,
        pooling=cfg.model.pooling,
        pair_encoding=cfg.data.pair_encoding,
        sts_head=cfg.model.sts_head,
        head_dropout=cfg.model.head_dropout,
        pair_features=cfg.model.pair_features,
        fuse_passes=cfg.model.fuse_passes,
        compile=cfg.model.get("compile", False),
        identity=backbone.identity,
    )


def build(cfg: DictConfig) -> tuple[Backbone, MultiTaskDataModule, MultiTaskModule]:
    """The backbone, data module and module a run's (resolved) config describes."""
    backbone = build_backbone(cfg)
    data_kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    data_dir = to_absolute_path(data_kwargs.pop("dir"))
    dm = MultiTaskDataModule(data_dir, backbone.tokenizer, seed=cfg.seed, **data_kwargs)
    adapter = build_adapter(cfg.adapter)
    optim = Optim.from_config(cfg.optim, adapter.name)
    mtl = build_mtl(cfg)
    model = build_model(cfg, backbone, adapter, dm.task_names)
    encoder, adapter_params, _ = model.parts()
    if mtl.active and not (encoder or adapter_params):  # parts() holds only what trains
        raise ValueError(
            f"mtl={mtl.name} with adapter={adapter.name}: nothing but the heads trains, so there is "
            "no shared gradient to aggregate; use mtl=sum"
        )
    return backbone, dm, MultiTaskModule(model, optim, seed=cfg.seed, mtl=mtl)


def build_mtl(cfg: DictConfig) -> MTL:
    """The run's multi-task gradient method (`mtl:`; a config without one: the summed loss), after the
    combinations it refuses (`mtl.check`)."""
    if cfg.get("mtl") is None:
        return MTL("sum", len(cfg.data.tasks))
    check_mtl(cfg)
    return MTL.from_config(OmegaConf.to_container(cfg.mtl, resolve=True), len(cfg.data.tasks))
