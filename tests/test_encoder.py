"""Our BertEncoder against transformers' BertModel, and the prefix attention path."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from peft_lightning.encoder import BertEncoder


def tiny_config(**kw) -> BertConfig:
    base = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    base.update(kw)
    return BertConfig(**base)


def pair(seed: int = 0, **kw) -> tuple[BertModel, BertEncoder]:
    torch.manual_seed(seed)
    hf = BertModel(tiny_config(**kw)).eval()
    ours = BertEncoder(hf.config)
    ours.load_state_dict(hf.state_dict())
    return hf, ours.eval()


def inputs(B: int = 3, T: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 4:] = 1
    return ids, mask, types


def assert_encodes_like(ours: BertEncoder, reference, adapted: bool = False):
    """Our encoder's hidden states (real tokens) and pooler output equal `reference`'s (a BertModel,
    or a PEFT model around one) on `inputs()`; with `adapted`, they also differ from the plain
    encoder's (the adapter is in use). Returns our hidden states and the reference's output."""
    ids, mask, types = inputs()
    ref = reference(input_ids=ids, attention_mask=mask, token_type_ids=types)
    h = ours(ids, mask, types)
    real = mask.bool()
    assert torch.allclose(h[real], ref.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(ours.pool(h, mask, "pooler"), ref.pooler_output, atol=1e-5)
    if adapted:
        with torch.no_grad():
            assert (pair()[1](ids, mask, types)[real] - h[real]).abs().max() > 1e-2
    return h, ref


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

    for targets in (["all"], ["query", "value"], None):
        _, ours = pair()
        if targets:
            LoRA(rank=3, targets=targets, scaling="rslora").attach(ours)
            for m in ours.modules():
                if hasattr(m, "lora_B"):
                    m.lora_B.data.normal_(0, 0.1)
        ids, mask, types = inputs()
        fused = ours(ids, mask, types)
        for layer in ours.encoder.layer:
            layer.attention.self.fuse_qkv = False
        assert torch.allclose(fused, ours(ids, mask, types), atol=1e-5), targets
