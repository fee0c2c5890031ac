"""The native export layout: an adapter that neither merges nor has a PEFT format (bottleneck adapters).

`peft-export` writes, beside `heads.safetensors`, `heads.json` and `peft_lightning.json` (which
then also holds the run's resolved config, so the export alone rebuilds the run):
- `adapter.safetensors`, fp32:
  - `<layer>.adapter.down.weight` (m, h), `<layer>.adapter.down.bias` (m),
    `<layer>.adapter.up.weight` (h, m), `<layer>.adapter.up.bias` (h), for each adapted layer under
    its transformers `BertModel` name (`encoder.layer.3.output.dense`): the adapter reads that
    layer's output y and gives y + up(f(down(y))) (f: `adapter.json`'s `nonlinearity`);
  - any other encoder tensor the run trained (the LayerNorms with `train_layernorm`) under its
    `BertModel` name, replacing the pretrained one.
- `adapter.json`: the format's name and version, the adapter's settings (`describe()`), the base
  model, and each tensor's shape.
The pretrained weights are not copied: they are the base model's. `load_run(FOLDER)` and
`peft-predict FOLDER` read this layout.
"""

from __future__ import annotations

import torch

FORMAT = "peft-lightning native adapter, version 1"
TENSORS = "adapter.safetensors"
CONFIG = "adapter.json"


def live_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's own parameters under the layout's names (the live tensors, not copies)."""
    adapter = model.adapter
    out: dict[str, torch.Tensor] = {}
    for name, layer in zip(adapter.target_names, adapter.layers):
        for part, t in layer.native_tensors().items():
            out[f"{name}.adapter.{part}"] = t
    wrapped = {id(t) for t in out.values()}
    names = {id(p): n for n, p in model.encoder.named_parameters()}
    for p in adapter.encoder_params():
        if id(p) not in wrapped:
            out[names[id(p)]] = p
    return out


def native_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the layout's names (fp32, detached copies)."""
    return {k: v.detach().float().contiguous().clone() for k, v in live_tensors(model).items()}


@torch.no_grad()
def load_native(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy the layout's tensors into a freshly built model of the same adapter; every tensor the
    adapter trains must be there, with its shape (a ValueError naming `where` and the tensor if not)."""
    want = live_tensors(model)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        problems = [f"missing {missing[:3]}" if missing else "", f"unknown {extra[:3]}" if extra else ""]
        raise ValueError(f"{where}: does not match the run's adapter: " + "; ".join(x for x in problems if x))
    for key, param in want.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(
                f"{where}: {key} has shape {tuple(tensors[key].shape)}, the adapter's is {tuple(param.shape)}"
            )
        param.copy_(tensors[key].to(param.dtype))
