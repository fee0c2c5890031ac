"""LoRA's arena: frozen W with A below and B beside it, 6 GEMMs a layer, the same numbers as without."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from peft_lightning.adapters import LoRA
from peft_lightning.bench import GEMMS, OpCounter
from peft_lightning.fastpath.arena import Arena, ArenaCast, ArenaSite, arena_linear
from peft_lightning.fastpath.cast import cast_packed
from peft_lightning.fastpath.precision import store_frozen_in
from peft_lightning.model import MultiTaskModel
from peft_lightning.module import MultiTaskModule
from peft_lightning.tasks import TASKS


def site_operands(outs, in_f, ranks, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o, in_f, generator=g) for o in outs]
    bs = [torch.randn(o, generator=g) for o in outs] if bias else None
    As = [torch.randn(r, in_f, generator=g, requires_grad=True) for r in ranks]
    Bs = [torch.randn(o, r, generator=g, requires_grad=True) for o, r in zip(outs, ranks)]
    return ws, bs, As, Bs


@pytest.mark.parametrize("concat", [False, True], ids=["", "concat"])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("keep_output,contiguous_output", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize(
    "outs,ranks,scale,bias",
    [((7,), (3,), 1.0, True), ((6, 6, 6), (3, 3, 3), 0.5, True), ((5,), (8,), 2.0, False), ((12,), (2,), 3.0, True)],
    ids=["narrowing", "qkv_padded", "no_bias", "square"],
)
def test_arena_linear_equals_the_lora_composition(
    outs, ranks, scale, bias, gelu, keep_output, contiguous_output, concat
):
    in_f = 12
    ws, bs, As, Bs = site_operands(outs, in_f, ranks, bias=bias)
    arena = Arena([(list(outs), in_f, list(ranks), bias)], torch.float32, torch.device("cpu"))
    matrix, abias = arena.matrix(0), arena.bias(0)
    for w, rows in zip(ws, arena.member_rows(0)):
        matrix[rows, :in_f] = w
    if bias:
        for b, rows in zip(bs, arena.member_rows(0)):
            abias[rows] = b
    R = sum(ranks)
    assert matrix.shape == (sum(outs) + -(-R // 8) * 8, in_f + -(-R // 8) * 8)  # room rounded up to 8
    a, b = cast_packed(arena.layout, torch.float32, [*As, *Bs], into=arena)
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(1), requires_grad=True)
    cast = ArenaCast(a, b, ArenaSite.of(arena, 0), concat)
    out = arena_linear(x, cast, scale, gelu, keep_output, contiguous_output)
    fold, fold_back = concat and not gelu and sum(outs) >= in_f, concat and in_f > sum(outs)  # see _ArenaLinear
    assert out.is_contiguous() == (contiguous_output or fold)  # else a view with rows of O + Rp

    h = F.gelu(x) if gelu else x
    want = torch.cat(
        [F.linear(h, w, bb) + scale * F.linear(F.linear(h, A), B) for w, bb, A, B in zip(ws, bs or [None] * 3, As, Bs)],
        dim=-1,
    )
    assert out.shape == want.shape and torch.allclose(out, want, atol=1e-5)
    assert torch.count_nonzero(matrix[sum(outs) :, in_f:]) == 0  # the corner stays zero
    assert torch.count_nonzero(matrix[: sum(outs), in_f + R :]) == 0  # and the padding beside B
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    seen = []
    x.register_hook(seen.append)
    got = torch.autograd.grad((out * up).sum(), [x, *As, *Bs])
    assert seen[0].is_contiguous() == (gelu or fold_back)  # else a view of [g W | g B | 0]
    exp = torch.autograd.grad((want * up).sum(), [x, *As, *Bs])
    for gg, ee in zip(got, exp):
        assert gg.shape == ee.shape and torch.allclose(gg, ee, atol=1e-4)


@pytest.mark.parametrize("outs", [(64,), (64, 64, 64)], ids=["one_layer", "qkv"])
@pytest.mark.parametrize("rank", range(1, 10))
def test_the_arena_output_and_input_gradient_have_16_byte_aligned_rows(outs, rank):
    # cuDNN attention reads q/k/v (outputs of the q/k/v site) and, in its backward, the attention
    # output layer's input gradient: rows of in + R elements made 'misaligned address' on an H100 (r=4)
    in_f, ranks = 64, [rank] * len(outs)
    arena = Arena([(list(outs), in_f, ranks, True)], torch.bfloat16, torch.device("cpu"))
    As = [torch.randn(rank, in_f, requires_grad=True) for _ in outs]
    Bs = [torch.randn(o, rank, requires_grad=True) for o in outs]
    a, b = cast_packed(arena.layout, torch.bfloat16, [*As, *Bs], into=arena)
    x = torch.randn(4, 16, in_f, dtype=torch.bfloat16, requires_grad=True)
    strides = []
    x.register_hook(lambda g: strides.append(g.stride()))
    out = arena_linear(x, ArenaCast(a, b, ArenaSite.of(arena, 0)), 1.0, keep_output=True)
    out.sum().backward()
    elements = 16 * 8 // torch.finfo(torch.bfloat16).bits  # bf16 elements in 16 bytes: 8
    assert out.stride(-2) % elements == 0 and out.stride(-1) == 1
    assert strides[0][-2] % elements == 0 and strides[0][-1] == 1
    assert x.grad.shape == x.shape


def test_arena_linear_keeps_the_products_storage_only_when_the_output_is_kept():
    arena = Arena([([64], 32, [4], True)], torch.float32, torch.device("cpu"))
    a, b = cast_packed(arena.layout, torch.float32, [torch.randn(4, 32), torch.randn(64, 4)], into=arena)
    x = torch.randn(256, 32, requires_grad=True)

    def saved_storage(keep: bool) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            arena_linear(x, ArenaCast(a, b, ArenaSite.of(arena, 0)), 1.0, keep_output=keep)
        return sum(seen.values())

    # not kept: a (256, 4) copy of the product, not the (256, 64 + 8) output storage
    assert saved_storage(False) - saved_storage(True) == 256 * 4 * 4 - 256 * 72 * 4


def bf16_module(tiny_model_dir, rank=4, use_arena=True, concat=False, scaling="fixed", b_std=0.5):
    from peft_lightning.backbone import load_backbone

    bb = load_backbone(str(tiny_model_dir), "mean")
    lora = LoRA(rank=rank, arena=use_arena, concat=concat, scaling=scaling)
    module = MultiTaskModule(MultiTaskModel(bb.encoder, lora, pooling="mean", fuse_passes=True))
    store_frozen_in(module.encoder, torch.bfloat16)  # as on the GPU fast path
    for layer in module.adapter.layers:  # B = 0 at init would hide a wrong B layout
        torch.nn.init.normal_(layer.lora_B, std=b_std, generator=torch.Generator().manual_seed(len(layer.lora_B)))
    module.eval()
    return bb, module


def bf16_step(module, batch, autocast=True) -> tuple[torch.Tensor, dict, dict]:
    module.zero_grad(set_to_none=True)
    with OpCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the forward only, as bf16-mixed
            loss = sum(TASKS[t].loss(o, batch[t]["labels"]) for t, o in module(batch).items())
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}, counter.counts


def twins_and_batch(tiny_model_dir, data_dir, tmp_path):
    """The tiny model with the arena and without it (the same weights), and a training batch."""
    from peft_lightning.data import MultiTaskDataModule

    bb, module = bf16_module(tiny_model_dir)
    _, plain = bf16_module(tiny_model_dir, use_arena=False)
    plain.load_state_dict(module.state_dict())
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path, pad_to_multiple_of=16)
    dm.setup()
    return module, plain, next(iter(dm.train_dataloader()))


def test_a_lora_step_in_the_arena_is_the_same_step_with_six_gemms_fewer_a_layer(tiny_model_dir, data_dir, tmp_path):
    arena_module, plain_module, batch = twins_and_batch(tiny_model_dir, data_dir, tmp_path)
    loss, grads, ops = bf16_step(arena_module, batch)
    loss_ref, grads_ref, ops_ref = bf16_step(plain_module, batch)
    assert arena_module.adapter._plan[1][4] is not None and plain_module.adapter._plan[1][4] is None
    assert torch.allclose(loss, loss_ref, rtol=1e-2)
    assert grads.keys() == grads_ref.keys()
    for name in grads:  # bf16 GEMMs over other blockings: rounding only
        assert (grads[name] - grads_ref[name]).norm() <= 2e-2 * grads_ref[name].norm() + 1e-6, name
    # sites: fused q/k/v and attention output, two GEMMs fewer each (one fewer for the first q/k/v,
    # whose input, the embeddings, needs no gradient: g B alone); the FFN's two layers one fewer
    # each (the intermediate's output and the FFN output's input gradient go to GELU: kept contiguous)
    layers = arena_module.encoder.num_layers
    assert sum(ops_ref.get(k, 0) for k in GEMMS) - sum(ops.get(k, 0) for k in GEMMS) == 6 * layers - 1
    # the two output layers' products are copied out of their outputs' storage
    assert ops.get("clone", 0) - ops_ref.get("clone", 0) == 2 * layers

    # every frozen weight of a LoRA layer is a view of the arena: no second copy, no stacked q/k/v
    arena = arena_module.adapter._plan[1][4]

    def inside(t, buf):
        return buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + buf.nbytes

    for layer in arena_module.adapter.layers:
        assert inside(layer.base.weight, arena.flat) and inside(layer.base.bias, arena.bias_flat)
    assert all(layer.attention.self.qkv._frozen is None for layer in arena_module.encoder.encoder.layer)


@pytest.mark.parametrize("rank,scaling", [(4, "fixed"), (3, "rslora")], ids=["r4", "r3_padded_scaled"])
def test_concat_in_the_arena_is_the_same_step_with_two_gemms_fewer_a_layer(
    tiny_model_dir, data_dir, tmp_path, rank, scaling
):
    from peft_lightning.data import MultiTaskDataModule

    torch.manual_seed(0)  # A's init
    # B of a trained adapter's size: with B ~ N(0, 0.5) and rsLoRA's scale of 9 the updates swamp the
    # frozen layers, attention saturates, and bf16 gradients are off by 100 % either way (rounding
    # decides which key wins): no test of anything but chaos
    bb, concat = bf16_module(tiny_model_dir, rank, concat=True, scaling=scaling, b_std=0.05)
    arena, ref = (bf16_module(tiny_model_dir, rank, use_arena=a, scaling=scaling)[1] for a in (True, False))
    for twin in (arena, ref):
        twin.load_state_dict(concat.state_dict())
    ref.float()  # the same (bf16-rounded) frozen weights, computed in fp32
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path, pad_to_multiple_of=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    loss, grads, ops = bf16_step(concat, batch)
    loss_arena, grads_arena, ops_arena = bf16_step(arena, batch)
    loss_ref, grads_ref, _ = bf16_step(ref, batch, autocast=False)
    assert concat.adapter._plan[1][4] is not None  # the arena is on
    assert torch.allclose(loss, loss_ref, rtol=1e-2) and torch.allclose(loss, loss_arena, rtol=1e-2)

    def errors(got):  # each LoRA parameter's gradient against fp32's, relative
        return torch.tensor([(got[n] - grads_ref[n]).norm() / grads_ref[n].norm() for n in grads_ref if "lora" in n])

    err, err_arena = errors(grads), errors(grads_arena)
    assert err.median() <= 1.5 * err_arena.median() + 1e-3 and err.max() <= 0.25, (err, err_arena)  # rounding only
    # the tiny model's FFN is 2x wide: its first layer's forward (y and z apart, then the update:
    # three GEMMs) and its second layer's input gradient (g W, g B, the update) take two GEMMs each
    layers = concat.encoder.num_layers
    assert sum(ops_arena.get(k, 0) for k in GEMMS) - sum(ops.get(k, 0) for k in GEMMS) == 2 * layers
    # folded: the forward of q/k/v, attention output and FFN input (out >= in), and the FFN
    # output's input gradient (in > out): one concatenation each
    assert not any("pooler" in name for name in concat.adapter.target_names)  # mean pooling: no pooler
    assert ops.get("cat", 0) - ops_arena.get("cat", 0) == 4 * layers
    # the attention output's product no longer comes out of its output's storage
    assert ops_arena.get("clone", 0) - ops.get("clone", 0) == layers


def test_the_arena_follows_optimizer_steps_loads_and_replaced_weights(tiny_model_dir, data_dir, tmp_path):
    module, plain, batch = twins_and_batch(tiny_model_dir, data_dir, tmp_path)
    # fused AdamW, as training uses: it updates the parameters without bumping their version counters
    opts = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True) for m in (module, plain)
    ]
    for _ in range(3):  # the A and B the arena computes with are those the optimizer wrote
        for m, opt in zip((module, plain), opts):
            bf16_step(m, batch)
            opt.step()
    loss, _, _ = bf16_step(module, batch)
    loss_ref, _, _ = bf16_step(plain, batch)
    assert torch.allclose(loss, loss_ref, rtol=1e-2)
    layer = module.adapter.layers[0]
    arena = module.adapter._plan[1][4]
    assert torch.equal(arena.handles()[0][: layer.rank], layer.lora_A.detach().bfloat16())

    # two passes before one backward: the second writes the same A and B again, which autograd
    # must not take for an in-place change of what the first pass saved
    _, grads1, _ = bf16_step(module, batch)
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss2 = sum(sum(TASKS[t].loss(o, batch[t]["labels"]) for t, o in module(batch).items()) for _ in range(2))
    loss2.backward()
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, 2 * grads1[n], rtol=1e-3, atol=1e-6), n

    # a frozen weight loaded in place lands in the arena; one replaced by a new tensor rebuilds it
    key = "model.encoder.encoder.layer.0.intermediate.dense.base.weight"
    new = torch.randn_like(module.state_dict()[key])
    module.load_state_dict({key: new}, strict=False)
    assert torch.equal(module.encoder.encoder.layer[0].intermediate.dense.base.weight, new)
    before = bf16_step(module, batch)[0]
    dense = module.encoder.encoder.layer[1].intermediate.dense.base
    dense.weight.data = torch.zeros_like(dense.weight)
    after = bf16_step(module, batch)[0]
    assert module.adapter._plan[1][4] is not arena and not torch.equal(before, after)
    assert torch.count_nonzero(dense.weight) == 0  # the zeros are what the new arena computes with


def test_a_copy_of_a_module_builds_its_own_arena(tiny_model_dir, data_dir, tmp_path):
    module, _, batch = twins_and_batch(tiny_model_dir, data_dir, tmp_path)
    loss, grads, _ = bf16_step(module, batch)
    twin = copy.deepcopy(module)
    assert twin.adapter._plan is None  # no copy of the first module's arena comes along
    twin_loss, twin_grads, _ = bf16_step(twin, batch)
    arena = twin.adapter._plan[1][4]
    assert arena is not module.adapter._plan[1][4]
    flat = arena.flat
    w = twin.adapter.layers[0].base.weight
    assert flat.data_ptr() <= w.data_ptr() < flat.data_ptr() + flat.nbytes
    assert torch.equal(loss, twin_loss)
    assert all(torch.equal(grads[n], twin_grads[n]) for n in grads)


def test_the_arena_site_bench_times_each_site_both_ways(capsys):
    from peft_lightning.arena_bench import SITES, main

    main(["--rows", "32", "--repeats", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["site"] for r in rows] == list(SITES)
    for r in rows:
        assert (
            r["plain_ms"] > 0
            and r["concat_ms"] > 0
            and r["ratio"] == pytest.approx(r["concat_ms"] / r["plain_ms"], rel=1e-2)
        )
