"""Frozen weights stored once in the autocast dtype, and the torch.compile modes a run may ask for."""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def cpu_has_native_bf16() -> bool:
    """oneDNN multiplies bf16 natively on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
