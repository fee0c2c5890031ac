"""Our BertEncoder against transformers' BertModel, and the prefix attention path."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_encodes_like, inputs, pair, tiny_config

from peft_lightning.encoder import BertEncoder


@torch.no_grad()
def test_parity_with_transformers_bert():
    hf, ours = pair()
    assert_encodes_like(ours, hf)


@torch.no_grad()
def test_pooling_modes():
    _, ours = pair()
    ids, mask, types = inputs()
    h = ours(ids, mask, types)
    assert torch.equal(ours.pool(h, mask, "cls"), h[:, 0])
    manual = h[2, :3].mean(0)
    assert torch.allclose(ours.pool(h, mask, "mean")[2], manual, atol=1e-6)
    with pytest.raises(ValueError, match="pooling='max' is unknown"):
        ours.pool(h, mask, "max")


def random_prefix(cfg, P: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    hd = cfg.hidden_size // cfg.num_attention_heads
    return [
        (
            torch.randn(1, cfg.num_attention_heads, P, hd, generator=g),
            torch.randn(1, cfg.num_attention_heads, P, hd, generator=g),
        )
        for _ in range(cfg.num_hidden_layers)
    ]


@torch.no_grad()
def test_prefix_changes_output_and_keeps_embeddings():
    _, ours = pair()
    ids, mask, types = inputs()
    seen = []
    hook = ours.embeddings.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    plain = ours(ids, mask, types)
    with_prefix = ours(ids, mask, types, prefix_kv=random_prefix(ours.config, 4))
    hook.remove()
    # token_type_ids and the real tokens' position ids are untouched by the prefix
    assert torch.equal(seen[0], seen[1])
    real = mask.bool()
    assert (with_prefix[real] - plain[real]).abs().max() > 1e-2


@torch.no_grad()
def test_prefix_mask_covers_prefix_and_tokens():
    _, ours = pair()
    ids, mask, types = inputs()
    prefix = random_prefix(ours.config, 3)
    batch = ours(ids, mask, types, prefix_kv=prefix)
    # row 1 alone, without its padding, gives the same states: padding is masked, prefix is seen
    n = int(mask[1].sum())
    alone = ours(ids[1:2, :n], mask[1:2, :n], types[1:2, :n], prefix_kv=prefix)
    assert torch.allclose(batch[1, :n], alone[0], atol=1e-5)
    # and a prefix whose keys are hugely negative along the query direction is ignored only
    # if masked; here it is not masked, so zero values with equal keys still change attention
    zero = [(k, torch.zeros_like(v)) for k, v in prefix]
    assert not torch.allclose(ours(ids, mask, types, prefix_kv=zero)[1, :n], ours(ids, mask, types)[1, :n], atol=1e-4)


def test_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="absolute position"):
        BertEncoder(tiny_config(position_embedding_type="relative_key"))


@torch.no_grad()
def test_fused_qkv_equals_separate_projections():
    from peft_lightning.adapters import LoRA
    from peft_lightning.adapters.fused_qkv import install_fused_qkv

    for targets in (["all"], ["query", "value"], None):
        _, ours = pair()
        if targets:
            LoRA(rank=3, targets=targets, scaling="rslora").attach(ours)
            for m in ours.modules():
                if hasattr(m, "lora_B"):
                    m.lora_B.data.normal_(0, 0.1)
        else:
            install_fused_qkv(ours)  # plain layers: the stacked product
        ids, mask, types = inputs()
        fused = ours(ids, mask, types)
        for layer in ours.encoder.layer:
            layer.attention.self.qkv = None
        assert torch.allclose(fused, ours(ids, mask, types), atol=1e-5), targets
