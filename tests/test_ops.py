"""The encoder's composed kernels: CPU dropout, written-out attention, the fused low-rank add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_lightning.ops import Dropout, add_low_rank, attention, dropout


def test_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.1) < 0.003  # binomial sd is 0.0005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask / (1 - p)) / dx = mask / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(dropout(torch.ones(400_000), 0.1, training=True), y.detach())  # seeded
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x


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
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 50 / 0.8))


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
