"""PEFT's adapter folder format, read by tensor name: `adapter_config.json` and `adapter_model.safetensors`.

A leaf: json and safetensors only. Each wrapped layer names its tensors as PEFT does
(`peft_tensors()`: `lora_A`, `lora_B`, DoRA's `lora_magnitude_vector`, (IA)^3's `ia3_l`) and each
strategy its config (`peft_config()`), so neither this module nor `export.py` asks which adapter
class it holds. PEFT keeps a layer's tensors under `base_model.model.<layer name>.<tensor>.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_lora(adapter, folder: str | Path) -> None:
    """Set LoRA's A and B from a PEFT LoRA adapter folder (`adapter.init_from`); its rank, targets
    and scaling must be this adapter's."""
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise ValueError(f"adapter.init_from={folder}: no {p.name} (expected a PEFT LoRA adapter folder)")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{cfg_path}: not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object (PEFT's adapter config), got a {type(cfg).__name__}")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg_path}: field 'lora_alpha' should be a number, got {json.dumps(alpha)}")
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"adapter.init_from={folder}: a {cfg.get('peft_type')} adapter, expected LoRA")
    if cfg.get("r") != adapter.rank:
        raise ValueError(
            f"adapter.init_from={folder}: rank {cfg.get('r')}, this adapter has adapter.rank={adapter.rank}"
        )
    r = adapter.rank
    scale = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
    if abs(scale - adapter.scale) > 1e-6 * max(1.0, abs(scale)):
        raise ValueError(
            f"adapter.init_from={folder}: its scale is {scale:g} (lora_alpha {cfg['lora_alpha']}, "
            f"use_rslora {cfg.get('use_rslora', False)}), this adapter's is {adapter.scale:g}; set adapter.scaling/alpha to match"
        )
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own SafetensorError for a broken header or file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{weights}: cannot be read as safetensors, truncated or corrupt ({first})") from None
    found = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                name = key[: -len(marker)].removeprefix("base_model.model.")
                found[(name, part)] = value
    names = {n for n, _ in found}
    mine = set(adapter.target_names)
    if names != mine:
        raise ValueError(
            f"adapter.init_from={folder}: its layers {sorted(names - mine)[:3] or '-'} are not targets here, "
            f"and {sorted(mine - names)[:3] or '-'} have no factors there; match adapter.targets"
        )
    with torch.no_grad():
        for name, layer in zip(adapter.target_names, adapter.layers):
            for part, param in layer.peft_tensors().items():
                value = found[(name, part)]
                if value.shape != param.shape:
                    raise ValueError(
                        f"adapter.init_from={folder}: {name}.{part} is {tuple(value.shape)}, expected {tuple(param.shape)}"
                    )
                param.copy_(value.to(param.dtype))
