"""The encoder's composed kernels: CPU dropout, written-out attention, the fused low-rank add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_lightning.fastpath.cast import CastLayout, cast_packed
from peft_lightning.fastpath.kernels import _ConcatLowRankLinear, add_low_rank, low_rank_linear
from peft_lightning.layers import Dropout, attention, dropout


def test_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.1) < 0.003  # binomial sd is 0.0005
    p = round(0.1 * 2**15) / 2**15  # 0.100006: the p a 15-bit lane draws (layers.keep_mask)
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))  # E[y] = x (fp32)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask / (1 - p)) / dx = mask / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(dropout(torch.ones(400_000), 0.1, training=True), y.detach())  # seeded
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.01, 1e-4])
def test_the_mask_drops_each_element_with_its_p_independently_of_its_neighbours(p):
    """Four mask elements come from one 64-bit draw: each still drops with p (to 15 bits, or to 31
    where 15 bits cannot hold p to 0.1%), and two elements of one word drop together with p^2."""
    from peft_lightning.layers import keep_mask

    torch.manual_seed(1)
    n = 4_000_001  # not a multiple of four
    keep, drawn = keep_mask(torch.Size([n]), p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert abs(drawn - p) <= 1e-3 * p
    assert drawn == (round(p * 2**15) / 2**15 if p >= 0.01 else round(p * 2**31) / 2**31)
    dropped = (~keep).double()
    sd = (drawn * (1 - drawn) / n) ** 0.5
    assert abs(dropped.mean().item() - drawn) < 5 * sd
    for lag in (1, 2, 3, 4):  # lanes of one word (1, 2, 3) and the next word's (4)
        both = (dropped[:-lag] * dropped[lag:]).mean().item()
        assert abs(both - drawn**2) < 5 * (drawn**2 * (1 - drawn**2) / n) ** 0.5 + 1e-9


def test_dropout_module_is_a_drop_in_for_nn_dropout():
    m = Dropout(0.25)
    assert m.state_dict() == {} and m.p == 0.25
    x = torch.ones(100_000)
    assert abs((m(x) == 0).float().mean().item() - 0.25) < 0.01
    assert torch.equal(m.eval()(x), x)


@pytest.mark.parametrize("S", [7, 11])  # S > T: prefix keys in front of the T real ones
def test_attention_equals_sdpa(S):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 7, 8, generator=g)
    k, v = torch.randn(3, 2, S, 8, generator=g), torch.randn(3, 2, S, 8, generator=g)
    keep = torch.ones(3, S, dtype=torch.bool)
    keep[0, -3:] = False  # padding
    mask = keep[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(attention(q, k, v, mask, 0.0), want, atol=1e-6)


def test_attention_dropout_zeroes_about_p_of_the_weights():
    torch.manual_seed(0)
    q, k = torch.zeros(4, 2, 50, 8), torch.zeros(4, 2, 50, 8)  # uniform attention: weights 1/50
    v = torch.eye(50).expand(4, 2, 50, 50)  # output = the attention weights themselves
    out = attention(q, k, v, torch.ones(4, 1, 1, 50, dtype=torch.bool), 0.2)
    assert abs((out == 0).float().mean().item() - 0.2) < 0.01
    p = round(0.2 * 2**15) / 2**15  # the p a 15-bit lane draws (layers.keep_mask)
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 50 / (1 - p)))


def test_add_low_rank_is_y_plus_scaled_ab_with_gradients():
    g = torch.Generator().manual_seed(2)
    y, a, b = (torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 5, 6), (2, 5, 3), (6, 3)))
    out = add_low_rank(y, a, b, 0.5)
    want = y + 0.5 * a @ b.t()
    assert out.shape == (2, 5, 6) and torch.allclose(out, want, atol=1e-6)
    w = torch.randn(2, 5, 6, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (y, a, b))
    want_grads = torch.autograd.grad((want * w).sum(), (y, a, b))
    for got, exp in zip(grads, want_grads):
        assert torch.allclose(got, exp, atol=1e-5)


def reference_low_rank(x, w, bias, a, b, scale, gelu):
    h = F.gelu(x) if gelu else x
    return F.linear(h, w, bias) + scale * F.linear(F.linear(h, a), b)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
def test_low_rank_linear_matches_the_composition(gelu, input_grad):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=input_grad)
    w, bias = torch.randn(7, 12, generator=g), torch.randn(7, generator=g)  # frozen
    a = torch.randn(3, 12, generator=g, requires_grad=True)
    b = torch.randn(7, 3, generator=g, requires_grad=True)
    out = low_rank_linear(x, w, bias, a, b, 0.7, gelu)
    want = reference_low_rank(x, w, bias, a, b, 0.7, gelu)
    assert torch.allclose(out, want, atol=1e-5)
    upstream = torch.randn(2, 5, 7, generator=g)
    inputs = (x, a, b) if input_grad else (a, b)
    for got, exp in zip(
        torch.autograd.grad((out * upstream).sum(), inputs), torch.autograd.grad((want * upstream).sum(), inputs)
    ):
        assert torch.allclose(got, exp, atol=1e-4)


@pytest.mark.parametrize("rank", [3, 8, 24])  # padded to 8, 8 and 24 columns
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_the_concatenated_form_matches_the_composition(rank, gelu, bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(24, 16, generator=g)
    b0 = torch.randn(24, generator=g) if bias else None
    a = torch.randn(rank, 16, generator=g, requires_grad=True)
    b = torch.randn(24, rank, generator=g, requires_grad=True)
    out = _ConcatLowRankLinear.apply(x, w, b0, a, b, 0.7, gelu)
    want = reference_low_rank(x, w, b0, a, b, 0.7, gelu)
    assert out.shape == (2, 5, 24) and torch.allclose(out, want, atol=1e-5)
    upstream = torch.randn(2, 5, 24, generator=g)
    got = torch.autograd.grad((out * upstream).sum(), (x, a, b))
    exp = torch.autograd.grad((want * upstream).sum(), (x, a, b))
    for name, u, v in zip("xab", got, exp):
        assert u.shape == v.shape and torch.allclose(u, v, atol=1e-4), name


def test_low_rank_linear_takes_the_concatenated_form_only_when_compiling_and_asked():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 16, generator=g)
    w, a, b = torch.randn(8, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    seen = []

    def backend(gm, example_inputs):  # records the ops of the traced graph, runs it as it is
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    for concat in (False, True):
        fn = torch.compile(lambda x, c=concat: low_rank_linear(x, w, None, a, b, 1.0, concat=c), backend=backend)
        assert torch.allclose(fn(x), reference_low_rank(x, w, None, a, b, 1.0, False), atol=1e-5)
        torch._dynamo.reset()
    assert not any("cat" in op for op in seen[0])  # the plain composition: x W^T, x A^T, + z B^T
    assert any("cat" in op for op in seen[1])  # [x | x A^T] [W | B]^T

    # and with gradients, traced forward and backward (AOT autograd), GELU in front
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    fn = torch.compile(lambda x: low_rank_linear(x, w, None, a, b, 0.5, gelu=True, concat=True), backend="aot_eager")
    got = torch.autograd.grad(fn(x).square().sum(), (x, a, b))
    exp = torch.autograd.grad(reference_low_rank(x, w, None, a, b, 0.5, True).square().sum(), (x, a, b))
    torch._dynamo.reset()
    for name, u, v in zip("xab", got, exp):
        assert torch.allclose(u, v, atol=1e-4), name


def test_low_rank_linear_under_autocast_and_what_it_keeps():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 48, generator=g, requires_grad=True)
    w, bias = torch.randn(16, 48, generator=g).bfloat16(), torch.randn(16, generator=g).bfloat16()
    a = torch.randn(2, 48, generator=g, requires_grad=True)
    b = torch.randn(16, 2, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_linear(x, w, bias, a, b, 1.0, gelu=True)
        want = reference_low_rank(x, w, bias, a, b, 1.0, gelu=True)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want.float()).norm() / want.float().norm() < 1e-2  # bf16 rounding only
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0 and x.grad is not None

    def saved_bytes(fn) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    big = torch.randn(256, 48, requires_grad=True)
    fused = saved_bytes(lambda: low_rank_linear(big, w.float(), bias.float(), a, b, 1.0, gelu=True))
    plain = saved_bytes(lambda: reference_low_rank(big, w.float(), bias.float(), a, b, 1.0, gelu=True))
    assert fused < plain - 256 * 48 * 4 * 0.9  # GELU's (N, in) output is not kept


def test_cast_packed_equals_per_tensor_casts_cat_and_block_diag():
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 6), (3, 6), (6, 2), (4, 3), (5, 1), (1, 7)]
    ts = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]
    layout = CastLayout([("stack", shapes[:2]), ("diag", shapes[2:4]), ("stack", [shapes[4]]), ("diag", [shapes[5]])])
    out = cast_packed(layout, torch.bfloat16, ts)
    want = [
        torch.cat(ts[:2]).bfloat16(),
        torch.block_diag(*ts[2:4]).bfloat16(),
        ts[4].bfloat16(),
        ts[5].bfloat16(),
    ]
    assert [o.shape for o in out] == [(5, 6), (10, 5), (5, 1), (1, 7)]
    for o, w in zip(out, want):
        assert o.dtype == torch.bfloat16 and torch.equal(o, w)
    ups = [torch.randn(o.shape, generator=g).bfloat16() for o in out]
    got = torch.autograd.grad(sum((o * u).float().sum() for o, u in zip(out, ups)), ts)
    exp = torch.autograd.grad(sum((w * u).float().sum() for w, u in zip(want, ups)), ts)
    for a, b in zip(got, exp):
        assert a.dtype == torch.float32 and torch.equal(a, b)  # off-diagonal gradient is dropped


def test_cast_layout_without_block_diagonal_is_the_identity_and_bad_input_is_named():
    assert CastLayout([("stack", [(2, 3), (4, 3)]), ("diag", [(5, 5)])]).index(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="differ in columns"):
        CastLayout([("stack", [(2, 3), (2, 4)])])
    with pytest.raises(ValueError, match="kind 'ring' is unknown"):
        CastLayout([("ring", [(2, 3), (2, 3)])])
    with pytest.raises(ValueError, match=r"shapes \[\(2, 3\)\] != layout \[\(3, 2\)\]"):
        cast_packed(CastLayout([("stack", [(3, 2)])]), torch.bfloat16, [torch.zeros(2, 3)])


def test_cast_packed_gives_no_gradient_to_inputs_of_an_unused_output():
    a, b, c = (torch.randn(2, 3, requires_grad=True) for _ in range(3))
    layout = CastLayout([("stack", [(2, 3), (2, 3)]), ("diag", [(2, 3)])])
    ab, cc = cast_packed(layout, torch.bfloat16, [a, b, c])
    cc.float().sum().backward()  # ab unused, as an untouched LoRA layer's A and B would be
    assert a.grad is None and b.grad is None  # AdamW then skips them, as it would without packing
    assert torch.equal(c.grad, torch.ones(2, 3))
