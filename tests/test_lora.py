"""LoRA: parity with PEFT (forward), merging, 16-bit frozen weights, target patterns."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    PEFT_CASES,
    assert_encodes_like,
    assert_merges_exactly,
    assert_stays_unmerged_in_16_bit,
    bert_base_encoder,
    inputs,
    needs_peft,
    pair,
    randomise_lora_like,
)

from peft_lightning.adapters import LoRA, LoRALinear
from peft_lightning.encoder import BertEncoder


def randomise_lora(encoder: BertEncoder, seed: int = 7) -> None:
    randomise_lora_like(encoder, LoRALinear, seed)


def copy_lora_into_peft(encoder: BertEncoder, peft_model) -> int:
    copied = 0
    for name, m in encoder.named_modules():
        if isinstance(m, LoRALinear):
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.data.copy_(m.lora_A.data)
            target.lora_B["default"].weight.data.copy_(m.lora_B.data)
            copied += 1
    return copied


@needs_peft
@pytest.mark.parametrize("targets,scaling,peft_targets,peft_alpha,rs", PEFT_CASES)
@torch.no_grad()
def test_lora_equals_peft(targets, scaling, peft_targets, peft_alpha, rs):
    import peft

    hf, ours = pair()
    rank = 4
    adapter = LoRA(rank=rank, targets=targets, scaling=scaling, alpha=16.0)
    adapter.attach(ours)
    randomise_lora(ours)
    # fixed scaling g = 1 is PEFT's lora_alpha = r
    alpha = rank if scaling == "fixed" else peft_alpha
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=peft_targets, use_rslora=rs, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    n = copy_lora_into_peft(ours, pm)
    peft_names = {k for k, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert n == len(peft_names) == len(adapter.target_names)
    assert_encodes_like(ours, pm, adapted=True)


@torch.no_grad()
def test_lora_starts_as_the_base_model_and_merges_exactly():
    _, base = pair()
    _, ours = pair()
    adapter = LoRA(rank=4, scaling="rslora")
    adapter.attach(ours)
    ids, mask, types = inputs()
    assert torch.allclose(ours(ids, mask, types), base(ids, mask, types), atol=1e-6)  # B = 0 at init
    randomise_lora(ours)
    assert_merges_exactly(adapter, ours)


def test_lora_on_16_bit_frozen_weights_stays_unmerged():
    """The GPU fast path keeps frozen weights in bf16, where W + BA would round most of BA away."""
    _, ours = pair()
    adapter = LoRA(rank=4)
    adapter.attach(ours)
    randomise_lora(ours)
    for layer in adapter.layers:
        layer.lora_B.data *= 1e-3  # a typical early-training update: far below bf16's resolution of W
    assert_stays_unmerged_in_16_bit(adapter, ours)
    # what merging would have done: the rounded W + dW loses most of dW
    layer = adapter.layers[0]
    exact = layer.base.weight.float() + layer.delta_weight()
    rounded = (layer.base.weight + layer.delta_weight().to(torch.bfloat16)).float()
    kept = ((rounded - layer.base.weight.float()) - layer.delta_weight()).norm() / layer.delta_weight().norm()
    assert kept > 0.3 and not torch.equal(rounded, exact)


def test_lora_targets_aliases():
    names = {}
    for targets in (["attention"], ["ffn"], ["all"], ["re:.*layer\\.0\\..*query"]):
        enc = bert_base_encoder(pooler=False)
        a = LoRA(rank=2, targets=targets)
        a.attach(enc)
        names[targets[0]] = a.target_names
    assert len(names["attention"]) == 48 and len(names["ffn"]) == 24 and len(names["all"]) == 72
    assert not set(names["attention"]) & set(names["ffn"])
    assert names["re:.*layer\\.0\\..*query"] == ["encoder.layer.0.attention.self.query"]


def test_lora_pattern_that_matches_nothing():
    _, ours = pair()
    with pytest.raises(ValueError, match=r"targets=\['qkv'\] matched no linear layer"):
        LoRA(rank=2, targets=["qkv"]).attach(ours)
