"""DoRA: parity with PEFT (forward and gradients), its row norms, merging, counts, options."""

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
    trainable,
)

from peft_lightning.adapters import DoRA, DoRALinear
from peft_lightning.encoder import BertEncoder


def randomise_dora(encoder: BertEncoder, seed: int = 5) -> None:
    randomise_lora_like(encoder, DoRALinear, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for m in encoder.modules():
        if isinstance(m, DoRALinear):
            m.magnitude.data *= 1 + 0.3 * torch.randn(m.magnitude.shape, generator=g)


@needs_peft
@pytest.mark.parametrize(
    "targets,scaling,peft_targets,peft_alpha,rs",
    [PEFT_CASES[0], PEFT_CASES[3], PEFT_CASES[4]],  # all linear fixed, q/v alpha/r, all linear rsLoRA
)
@pytest.mark.parametrize("fuse_qkv", [True, False])  # q, k, v as one product, or each its own
def test_dora_equals_peft_forward_and_gradients(targets, scaling, peft_targets, peft_alpha, rs, fuse_qkv):
    import peft

    hf, ours = pair()
    rank = 4
    adapter = DoRA(rank=rank, targets=targets, scaling=scaling, alpha=16.0)
    adapter.attach(ours)
    attentions = [m for m in ours.modules() if hasattr(m, "qkv")]
    for m in attentions:
        if not fuse_qkv:
            m.qkv = None
    assert all((m.qkv is not None and m.qkv.low_rank) == (fuse_qkv and targets == ["all"]) for m in attentions)
    ids, mask, types = inputs()
    with torch.no_grad():  # magnitude ||W||, B = 0: the base model
        assert torch.allclose(ours(ids, mask, types), pair()[1](ids, mask, types), atol=1e-6)
    randomise_dora(ours)
    alpha = rank if scaling == "fixed" else peft_alpha
    cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=peft_targets, use_rslora=rs, lora_dropout=0.0, use_dora=True
    )
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    theirs = {}
    for name, m in ours.named_modules():
        if isinstance(m, DoRALinear):
            t = pm.base_model.model.get_submodule(name)
            t.lora_A["default"].weight.data.copy_(m.lora_A.data)
            t.lora_B["default"].weight.data.copy_(m.lora_B.data)
            t.lora_magnitude_vector["default"].weight.data.copy_(m.magnitude.data)
            theirs[name] = t
    assert (
        len(theirs)
        == len(adapter.target_names)
        == len([n for n, m in pm.named_modules() if "default" in getattr(m, "lora_magnitude_vector", {})])
    )
    h, ref = assert_encodes_like(ours, pm, adapted=True)
    # the same gradients, the norm a constant to backward in both
    weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    ((h * weights).sum() + ours.pool(h, mask, "pooler").sum()).backward()
    ((ref.last_hidden_state * weights).sum() + ref.pooler_output.sum()).backward()
    for name, m in ours.named_modules():
        if isinstance(m, DoRALinear):
            t = theirs[name]
            for mine, other in [
                (m.lora_A, t.lora_A["default"].weight),
                (m.lora_B, t.lora_B["default"].weight),
                (m.magnitude, t.lora_magnitude_vector["default"].weight),
            ]:
                assert mine.grad.abs().max() > 0, name
                assert torch.allclose(mine.grad, other.grad, atol=1e-5, rtol=1e-4), name


@torch.no_grad()
def test_dora_weight_norm_is_the_norm_of_the_adapted_weight():
    _, ours = pair()
    adapter = DoRA(rank=4, scaling="alpha_over_r", alpha=8.0)
    adapter.attach(ours)
    randomise_dora(ours)
    for m in adapter.layers:
        direct = torch.linalg.vector_norm(m.base.weight + m.scale * m.lora_B @ m.lora_A, dim=1)
        assert torch.allclose(m.weight_norm(), direct, rtol=1e-5)
        m.base.weight.mul_(2)  # a changed frozen weight (a load): its cached ||W||^2 is not reused
        direct = torch.linalg.vector_norm(m.base.weight + m.scale * m.lora_B @ m.lora_A, dim=1)
        assert torch.allclose(m.weight_norm(), direct, rtol=1e-5)
        m.base.weight.data = m.base.weight.data.to(torch.bfloat16)  # the GPU fast path's storage
        direct = torch.linalg.vector_norm(m.base.weight.float() + m.scale * m.lora_B @ m.lora_A, dim=1)
        assert m.weight_norm().dtype == torch.float32
        assert torch.allclose(m.weight_norm(), direct, rtol=1e-3)


def test_dora_norms_are_computed_once_a_step_and_follow_the_optimizer(monkeypatch):
    _, ours = pair()
    adapter = DoRA(rank=4)
    adapter.attach(ours)
    randomise_dora(ours)
    computed = []
    real = DoRALinear._weight_norm
    monkeypatch.setattr(DoRALinear, "_weight_norm", lambda self, *a: computed.append(self) or real(self, *a))
    # fused AdamW does not move the parameters' version counters: a cache keyed on them would go stale
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05, fused=True)
    ids, mask, types = inputs()
    used = len([n for n in adapter.target_names if not n.startswith("pooler.")])  # hidden states: no pooler
    for step in range(2):
        computed.clear()
        with adapter.compute_dtype_weights():  # what the module wraps one step's encoder passes in
            loss = sum(ours(ids, mask, types).square().mean() for _ in range(5))
        assert len(computed) == len({id(m) for m in computed}) == used  # once a layer, not once a pass
        for m in adapter.layers:
            with torch.no_grad():
                direct = torch.linalg.vector_norm(m.base.weight + m.scale * m.lora_B @ m.lora_A, dim=1)
            assert torch.allclose(m.weight_norm(), direct, rtol=1e-5), step  # not last step's
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(m._norm is None and not m.keep_norm for m in adapter.layers)  # nothing kept after a step
    computed.clear()
    ours(ids, mask, types)
    ours(ids, mask, types)
    assert len(computed) == 2 * used  # outside a step: every call


@torch.no_grad()
def test_dora_merges_exactly_and_stays_unmerged_in_16_bit():
    _, ours = pair()
    adapter = DoRA(rank=4)
    adapter.attach(ours)
    randomise_dora(ours)
    assert_merges_exactly(adapter, ours)
    assert_stays_unmerged_in_16_bit(adapter, ours)
    layer = adapter.layers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, layer.base.in_features)).dtype == torch.bfloat16  # not promoted by m / n


def test_dora_with_dropout_is_peft_form_and_plain_in_eval():
    _, ours = pair()
    adapter = DoRA(rank=4, dropout=0.5)
    adapter.attach(ours)
    randomise_dora(ours)
    m = adapter.layers[0]
    x = torch.randn(6, m.base.in_features, generator=torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        f = m.factor()
        want = f * (x @ m.base.weight.T + m.scale * (x @ m.lora_A.T) @ m.lora_B.T) + m.base.bias
        assert torch.allclose(m(x), want, atol=1e-5)
    m.train()
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    d = m.dropout(x)  # the same mask
    wd = d @ m.base.weight.T
    want = m.base(x) + (f - 1) * wd + f * m.scale * ((d @ m.lora_A.T) @ m.lora_B.T)
    assert torch.allclose(y, want, atol=1e-5)
    assert not torch.allclose(y, m.eval()(x), atol=1e-3)


def test_dora_closed_form_counts_on_bert_base_shape():
    enc = bert_base_encoder()
    DoRA(rank=8).attach(enc)
    # LoRA's 1,339,392 and a magnitude per output row: 12 x (4 x 768 + 3072 + 768) + the pooler's 768
    assert trainable(enc) == 1_339_392 + 12 * (4 * 768 + 3072 + 768) + 768 == 1_423_104


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: DoRA(rank=0), "rank must be a whole number >= 1"),
        (lambda: DoRA(scaling="sqrt"), "scaling='sqrt' is unknown"),
        (lambda: DoRA(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_dora_option_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
