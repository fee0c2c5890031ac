"""The adapter interface: a strategy takes the encoder, sets what trains, and may add parameters.

An adapter is an `nn.Module`, so whatever it owns (prefix parameters) is part of the Lightning
module's state; adapters that inject into the encoder (LoRA) own nothing themselves.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from peft_lightning.encoder import BertEncoder, PrefixKV


class Adapter(nn.Module):
    """Base class of the strategies (frozen, full, LoRA, prefix, (IA)^3).

    Attributes:
        name: the strategy's key in `conf/adapter/`.
        freeze_encoder: run the encoder without gradients and in eval mode (no dropout).
    """

    name: str = "base"
    freeze_encoder: bool = False

    def attach(self, encoder: BertEncoder) -> None:
        """Set requires_grad on the encoder and inject any modules into it."""
        raise NotImplementedError

    def encoder_params(self) -> list[nn.Parameter]:
        """Parameters inside the encoder that are this strategy's own (they train at
        `optim.adapter_lr`): what its wrapped layers add (LoRA's A and B, (IA)^3's vectors), not their
        frozen base; BitFit's chosen biases."""
        return [p for m in getattr(self, "layers", []) for n, p in m.named_parameters() if not n.startswith("base.")]

    def prefix_kv(self) -> list[PrefixKV] | None:
        """Per-layer prefix keys/values for the encoder, or None."""
        return None

    def compute_dtype_weights(self) -> contextlib.AbstractContextManager:
        """A context for one forward pass in which the adapter may hand the encoder its trainable
        weights already cast to the autocast dtype (nothing by default)."""
        return contextlib.nullcontext()

    def merge(self) -> None:
        """Fold adapter weights into the frozen weights for inference (no-op by default)."""

    def unmerge(self) -> None:
        """Undo `merge` exactly, to continue training (no-op by default)."""

    def describe(self) -> dict:
        """The options that define this adapter; checkpoints store it to refuse a mismatched load."""
        return {"name": self.name}


# target aliases, expanded before matching (see the LoRA module docstring)
ALIASES = {
    "all": [r"re:.*"],
    "attention": ["query", "key", "value", "attention.output.dense"],
    "ffn": ["intermediate.dense", r"re:encoder\.layer\.\d+\.output\.dense"],
}


def expand_targets(targets: list[str] | str) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    out: list[str] = []
    for t in targets:
        out += ALIASES.get(t, [t])
    return out


def matches(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def linear_names(encoder: BertEncoder) -> list[str]:
    """Dotted names of the encoder's linear layers, in module order."""
    return [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]


class LayerAdapter(Adapter):
    """An adapter made of wrappers around encoder layers (`layers`: LoRA's, (IA)^3's), each of which
    can merge into its frozen layer and unmerge exactly."""

    layers: list[nn.Module]

    @staticmethod
    def select(encoder: BertEncoder, targets: list[str], pooler: bool) -> list[str]:
        """Names of the encoder's linear layers that `targets` (patterns or aliases) match; the
        pooler's only with `pooler`. None matching is a ValueError that lists the layers' names."""
        patterns = expand_targets(targets)
        linears = linear_names(encoder)
        chosen = [n for n in linears if matches(n, patterns) and (pooler or not n.startswith("pooler."))]
        if not chosen:
            raise ValueError(
                f"adapter.targets={targets} matched no linear layer of the encoder; "
                f"linear layers are named like {linears[:7]}"
            )
        return chosen

    def wrap(self, encoder: BertEncoder, names: list[str], make) -> None:
        """Replace each named linear layer of the encoder by `make(name, layer)`; keep them in `layers`."""
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            wrapped = make(name, getattr(parent, child))
            setattr(parent, child, wrapped)
            self.layers.append(wrapped)

    def merge(self) -> None:
        for layer in self.layers:
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers:
            layer.unmerge()


class MergeableLinear(nn.Module):
    """A wrapper around a frozen linear layer `base` whose update `delta_weight()` (W' - W, in fp32)
    can be written into W for inference (`merge`) and taken out exactly (`unmerge`): LoRA, DoRA."""

    base: nn.Linear
    _saved_weight: torch.Tensor | None = None

    @property
    def merged(self) -> bool:
        return self._saved_weight is not None

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.base.weight.dtype in (torch.bfloat16, torch.float16):
            # A frozen weight kept in 16 bits (the GPU fast path) would round most of the update away:
            # |dW| is often below half an ulp of |W|. Stay unmerged; the update is computed apart.
            return
        delta = self.delta_weight()
        # Keep the exact frozen weight: unmerge restores it bit for bit (W + dW - dW would not).
        self._saved_weight = self.base.weight.detach().clone()
        self.base.weight.add_(delta.to(self.base.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._saved_weight)
        self._saved_weight = None
