"""(IA)^3: parity with PEFT, merging, counts, options."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    assert_encodes_like,
    assert_merges_exactly,
    bert_base_encoder,
    inputs,
    needs_peft,
    pair,
    trainable,
)

from peft_lightning.adapters import IA3, IA3Linear
from peft_lightning.encoder import BertEncoder


def randomise_ia3(encoder: BertEncoder, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, IA3Linear):
            m.ia3_l.data = 1 + 0.5 * torch.randn(m.ia3_l.shape, generator=g)


@needs_peft
@pytest.mark.parametrize(
    "targets,feedforward",
    [(["key", "value", "output.dense"], ["output.dense"]), (["query", "value", "intermediate.dense"], [])],
)
@pytest.mark.parametrize("fuse_qkv", [True, False])
@torch.no_grad()
def test_ia3_equals_peft(targets, feedforward, fuse_qkv):
    import peft

    hf, ours = pair()
    adapter = IA3(targets=targets, feedforward=feedforward)
    adapter.attach(ours)
    for m in list(ours.modules()):
        if hasattr(m, "qkv") and not fuse_qkv:
            m.qkv = None
    randomise_ia3(ours)
    cfg = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    copied = 0
    for name, m in ours.named_modules():
        if isinstance(m, IA3Linear):
            target = pm.base_model.model.get_submodule(name)
            assert target.is_feedforward == m.feedforward, name
            target.ia3_l["default"].data.copy_(m.ia3_l.data.view_as(target.ia3_l["default"]))
            copied += 1
    peft_layers = [n for n, m in pm.named_modules() if "default" in getattr(m, "ia3_l", {})]
    assert copied == len(adapter.target_names) == len(peft_layers) == (8 if feedforward else 6)  # tiny: 2 layers
    assert_encodes_like(ours, pm, adapted=True)


@torch.no_grad()
def test_ia3_starts_as_the_base_model_and_merges_exactly():
    _, base = pair()
    _, ours = pair()
    adapter = IA3()
    adapter.attach(ours)
    ids, mask, types = inputs()
    assert torch.equal(ours(ids, mask, types), base(ids, mask, types))  # every vector starts at one
    randomise_ia3(ours)
    assert_merges_exactly(adapter, ours)


def test_ia3_closed_form_counts_on_bert_base_shape():
    enc = bert_base_encoder()
    IA3().attach(enc)
    # 12 layers: key and value outputs (768 each), the attention output's and FFN output's inputs (768, 3072)
    assert trainable(enc) == 12 * (768 + 768 + 768 + 3072) == 64_512


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: IA3(targets=["qkv"]), r"adapter.targets=\['qkv'\] matched no linear layer"),
        (lambda: IA3(targets=["key"], feedforward=["value"]), r"adapter.feedforward must be among the targets"),
    ],
)
def test_ia3_option_errors(make, match):
    _, ours = pair()
    with pytest.raises(ValueError, match=match):
        make().attach(ours)
