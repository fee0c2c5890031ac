"""LoRA, DoRA, (IA)^3 and prefix tuning: parity with PEFT, merging, counts, frozen weights, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from test_encoder import assert_encodes_like, inputs, pair
from transformers import BertConfig

from peft_lightning.adapters import IA3, DoRA, DoRALinear, Frozen, Full, IA3Linear, LoRA, LoRALinear, Prefix
from peft_lightning.encoder import BertEncoder

peft = pytest.importorskip("peft")


def randomise_lora(encoder: BertEncoder, seed: int = 7) -> None:
    randomise_lora_like(encoder, LoRALinear, seed)


def randomise_lora_like(encoder: BertEncoder, kind, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, kind):
            m.lora_A.data = torch.randn(m.lora_A.shape, generator=g) * 0.1
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


def copy_lora_into_peft(encoder: BertEncoder, peft_model) -> int:
    copied = 0
    for name, m in encoder.named_modules():
        if isinstance(m, LoRALinear):
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.data.copy_(m.lora_A.data)
            target.lora_B["default"].weight.data.copy_(m.lora_B.data)
            copied += 1
    return copied


PEFT_CASES = [
    (["all"], "fixed", "all-linear", 8, False),
    (["query", "value"], "fixed", ["query", "value"], 8, False),
    (["all"], "alpha_over_r", "all-linear", 16, False),
    (["query", "value"], "alpha_over_r", ["query", "value"], 16, False),
    (["all"], "rslora", "all-linear", 16, True),
    (["query", "value"], "rslora", ["query", "value"], 16, True),
]


@pytest.mark.parametrize("targets,scaling,peft_targets,peft_alpha,rs", PEFT_CASES)
@torch.no_grad()
def test_lora_equals_peft(targets, scaling, peft_targets, peft_alpha, rs):
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


def assert_merges_exactly(adapter, ours) -> None:
    """Merged equals unmerged to 1e-5 (fp32); unmerging gives back every frozen weight bit for bit."""
    ids, mask, types = inputs()
    frozen_before = {n: p.clone() for n, p in ours.named_parameters() if not p.requires_grad}
    unmerged = ours(ids, mask, types)
    adapter.merge()
    assert all(m.merged for m in adapter.layers)
    assert torch.allclose(ours(ids, mask, types), unmerged, atol=1e-5)
    adapter.unmerge()
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    assert torch.equal(ours(ids, mask, types), unmerged)


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


def assert_stays_unmerged_in_16_bit(adapter, ours) -> None:
    """With the frozen weights in bf16 (the GPU fast path), merging does nothing and changes nothing."""
    for layer in adapter.layers:
        layer.base.weight.data = layer.base.weight.data.to(torch.bfloat16)
    ids, mask, types = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unmerged = ours(ids, mask, types)
        adapter.merge()
        assert not any(m.merged for m in adapter.layers)
        assert torch.equal(ours(ids, mask, types), unmerged)


def bert_base_encoder(pooler: bool = True) -> BertEncoder:
    with torch.device("meta"):
        return BertEncoder(BertConfig(), add_pooler=pooler)


def trainable(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


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


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: LoRA(rank=0), "rank must be an integer >= 1"),
        (lambda: LoRA(rank=4, scaling="sqrt"), "scaling='sqrt' is unknown"),
        (lambda: Prefix(length=0), "length must be an integer >= 1"),
        (lambda: Prefix(length=2, mlp="yes"), "mlp must be true or false"),
    ],
)
def test_adapter_option_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_lora_pattern_that_matches_nothing():
    _, ours = pair()
    with pytest.raises(ValueError, match=r"targets=\['qkv'\] matched no linear layer"):
        LoRA(rank=2, targets=["qkv"]).attach(ours)


@torch.no_grad()
def test_prefix_equals_peft_prefix_tuning():
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


@pytest.mark.parametrize(
    "make", [Frozen, Full, lambda: LoRA(rank=4, dropout=0.1), lambda: Prefix(2, mlp=True), IA3], ids=str
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


def randomise_ia3(encoder: BertEncoder, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, IA3Linear):
            m.ia3_l.data = 1 + 0.5 * torch.randn(m.ia3_l.shape, generator=g)


@pytest.mark.parametrize(
    "targets,feedforward",
    [(["key", "value", "output.dense"], ["output.dense"]), (["query", "value", "intermediate.dense"], [])],
)
@pytest.mark.parametrize("fuse_qkv", [True, False])
@torch.no_grad()
def test_ia3_equals_peft(targets, feedforward, fuse_qkv):
    hf, ours = pair()
    adapter = IA3(targets=targets, feedforward=feedforward)
    adapter.attach(ours)
    for m in ours.modules():
        if hasattr(m, "fuse_qkv"):
            m.fuse_qkv = fuse_qkv
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


def randomise_dora(encoder: BertEncoder, seed: int = 5) -> None:
    randomise_lora_like(encoder, DoRALinear, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for m in encoder.modules():
        if isinstance(m, DoRALinear):
            m.magnitude.data *= 1 + 0.3 * torch.randn(m.magnitude.shape, generator=g)


@pytest.mark.parametrize(
    "targets,scaling,peft_targets,peft_alpha,rs",
    [PEFT_CASES[0], PEFT_CASES[3], PEFT_CASES[4]],  # all linear fixed, q/v alpha/r, all linear rsLoRA
)
@pytest.mark.parametrize("fuse_qkv", [True, False])  # q, k, v as one product, or each its own
def test_dora_equals_peft_forward_and_gradients(targets, scaling, peft_targets, peft_alpha, rs, fuse_qkv):
    hf, ours = pair()
    rank = 4
    adapter = DoRA(rank=rank, targets=targets, scaling=scaling, alpha=16.0)
    adapter.attach(ours)
    attentions = [m for m in ours.modules() if hasattr(m, "fuse_qkv")]
    for m in attentions:
        m.fuse_qkv = fuse_qkv
    assert all((m.fused_loras() is not None) == (fuse_qkv and targets == ["all"]) for m in attentions)
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
        (lambda: DoRA(rank=0), "rank must be an integer >= 1"),
        (lambda: DoRA(scaling="sqrt"), "scaling='sqrt' is unknown"),
        (lambda: DoRA(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_dora_option_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
