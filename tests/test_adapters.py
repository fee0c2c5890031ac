"""The contract every strategy keeps: ordered closed-form counts, bit-identical frozen weights, option errors."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    bert_base_encoder,
    inputs,
    pair,
    trainable,
)

from peft_lightning.adapters import IA3, Frozen, Full, LoRA, Prefix


def test_closed_form_counts_on_bert_base_shape():
    enc = bert_base_encoder()
    lora = LoRA(rank=8)
    lora.attach(enc)
    # 12 layers x r(in+out) over q,k,v,o (768+768), intermediate (768+3072), output (3072+768), + pooler
    assert trainable(enc) == 12 * 8 * (4 * 1536 + 3840 + 3840) + 8 * 1536 == 1_339_392
    enc = bert_base_encoder()
    LoRA(rank=8, targets=["query", "value"]).attach(enc)
    assert trainable(enc) == 294_912
    enc = bert_base_encoder()
    LoRA(rank=64).attach(enc)
    assert trainable(enc) == 10_715_136
    enc = bert_base_encoder()
    prefix = Prefix(length=4, mlp=False)
    prefix.attach(enc)
    assert trainable(enc, prefix) == 12 * 2 * 4 * 768 == 73_728
    enc = bert_base_encoder()
    prefix = Prefix(length=4, mlp=True)
    prefix.attach(enc)
    assert trainable(enc, prefix) == 4 * 768 + (768 * 768 + 768) + (768 * 18432 + 18432)  # PEFT's 14.8M
    enc = bert_base_encoder(pooler=False)
    LoRA(rank=8).attach(enc)  # include_pooler=auto: no pooler in use, none adapted
    assert trainable(enc) == 1_327_104


def test_count_ordering():
    counts = {}
    for name, make in [
        ("frozen", Frozen),
        ("full", Full),
        ("lora", lambda: LoRA(rank=8)),
        ("prefix", lambda: Prefix(4, mlp=False)),
    ]:
        enc = bert_base_encoder()
        adapter = make()
        adapter.attach(enc)
        counts[name] = trainable(enc, adapter)
    assert counts["frozen"] == 0 < counts["prefix"] < counts["lora"] < counts["full"]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: LoRA(rank=0), "rank must be a whole number >= 1"),
        (lambda: LoRA(rank=True), "rank must be a whole number >= 1, got True"),  # adapter.rank=true
        (lambda: LoRA(rank=4, scaling="sqrt"), "scaling='sqrt' is unknown"),
        (lambda: Prefix(length=0), "length must be a whole number >= 1"),
        (lambda: Prefix(length=True), "length must be a whole number >= 1, got True"),
        (lambda: Prefix(length=2, mlp_hidden=True), "mlp_hidden must be a positive integer or null"),
        (lambda: Prefix(length=2, mlp="yes"), "mlp must be true or false"),
    ],
)
def test_adapter_option_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make",
    [Frozen, Full, lambda: LoRA(rank=4, dropout=0.1), lambda: Prefix(2, mlp=True), IA3],
    ids=["frozen", "full", "lora", "prefix", "ia3"],
)
def test_frozen_parameters_are_bit_identical_after_steps(make):
    torch.manual_seed(0)
    _, ours = pair()
    adapter = make()
    adapter.attach(ours)
    head = torch.nn.Linear(32, 3)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    params = [p for p in [*ours.parameters(), *adapter.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids, mask, types = inputs()
    ours.train()
    trained_before = [p.detach().clone() for p in params]
    for _ in range(3):
        with torch.set_grad_enabled(not adapter.freeze_encoder):
            h = ours(ids, mask, types, prefix_kv=adapter.prefix_kv())
        loss = head(h[:, 0]).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        adapter.merge()
        adapter.unmerge()
    for n, p in ours.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [
        not torch.equal(a, p) for a, p in zip(trained_before, params) if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert moved and all(moved)
