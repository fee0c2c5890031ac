"""Prefix tuning: parity with PEFT and the MLP folding to the same prefixes."""

from __future__ import annotations

import copy

import torch
from conftest import (
    inputs,
    needs_peft,
    pair,
)

from peft_lightning.adapters import Prefix


@needs_peft
@torch.no_grad()
def test_prefix_equals_peft_prefix_tuning():
    import peft

    hf, ours = pair(max_position_embeddings=40)
    P = 3
    adapter = Prefix(length=P, mlp=False)
    adapter.attach(ours)
    g = torch.Generator().manual_seed(11)
    adapter.prefix_encoder.prefix.data = torch.randn(adapter.prefix_encoder.prefix.shape, generator=g)
    cfg = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, prefix_projection=False)
    ref_model = copy.deepcopy(hf)
    # PEFT gives real tokens position ids P..P+T-1 (the prefix occupies cache positions); ours keep
    # 0..T-1. Shift the reference's position table so both read the same embedding per token.
    pos = ref_model.embeddings.position_embeddings.weight
    pos.data[P:] = hf.embeddings.position_embeddings.weight.data[:-P].clone()
    pm = peft.get_peft_model(ref_model, cfg).eval()
    pm.prompt_encoder["default"].embedding.weight.data.copy_(adapter.prefix_encoder.prefix.data)
    ids, mask, _ = inputs()
    ref = pm(input_ids=ids, attention_mask=mask)
    h = ours(ids, mask, None, prefix_kv=adapter.prefix_kv())
    real = mask.bool()
    assert torch.allclose(h[real], ref.last_hidden_state[real], atol=1e-5)


@torch.no_grad()
def test_prefix_mlp_folds_to_the_same_prefixes():
    _, ours = pair()
    adapter = Prefix(length=2, mlp=True, mlp_hidden=16)
    adapter.attach(ours)
    ids, mask, types = inputs()
    before = ours(ids, mask, types, prefix_kv=adapter.prefix_kv())
    n_before = sum(p.numel() for p in adapter.parameters())
    adapter.prefix_encoder.fold()
    after = ours(ids, mask, types, prefix_kv=adapter.prefix_kv())
    assert torch.allclose(before, after, atol=1e-6)
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 2 * 2 * 32 < n_before
