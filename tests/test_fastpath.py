"""The fast path (fused passes, fused q/k/v, bucketed padding, fused AdamW, compile) changes no result."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from peft_lightning.adapters import DoRA, LoRA, Prefix
from peft_lightning.backbone import load_backbone
from peft_lightning.bench import OpCounter
from peft_lightning.data import MultiTaskDataModule
from peft_lightning.fastpath.precision import store_frozen_in
from peft_lightning.model import MultiTaskModel
from peft_lightning.module import MultiTaskModule
from peft_lightning.tasks import TASKS


def losses(
    tiny_model_dir, data_dir, tmp_path, make_adapter, fast: bool, steps: int = 3, compile: bool | str = False
) -> list[float]:
    torch.manual_seed(0)
    bb = load_backbone(str(tiny_model_dir), "mean")
    module = MultiTaskModule(
        MultiTaskModel(
            bb.encoder, make_adapter(), pooling="mean", fuse_passes=fast, pair_features="sbert", compile=compile
        )
    )
    for layer in module.encoder.encoder.layer:
        if not fast:
            layer.attention.self.qkv = None  # q, k, v each its own product
    module.configure_model()  # compiles the encoder when asked, as the Trainer does
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path, pad_to_multiple_of=16 if fast else 1)
    dm.setup()
    module.eval()  # no dropout: both paths see the same function
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fast, foreach=None if fast else False)
    return run_steps(module, dm, opt, steps)


def run_steps(module, dm, opt, steps: int, bf16: bool = False) -> list[float]:
    """Summed task losses of `steps` training steps (batches moved to the module's device)."""
    out = []
    for batch, _ in zip(dm.train_dataloader(), range(steps)):
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        with torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = sum(TASKS[t].loss(o, batch[t]["labels"]) for t, o in module(batch).items())
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(float(loss.detach()))
    return out


@pytest.mark.parametrize(
    "make_adapter",
    [lambda: LoRA(rank=4), lambda: Prefix(2, mlp=True), lambda: DoRA(rank=4)],
    ids=["lora", "prefix", "dora"],
)
def test_fast_path_gives_the_same_losses(tiny_model_dir, data_dir, tmp_path, make_adapter):
    slow = losses(tiny_model_dir, data_dir, tmp_path, make_adapter, fast=False)
    fast = losses(tiny_model_dir, data_dir, tmp_path, make_adapter, fast=True)
    assert slow == pytest.approx(fast, rel=1e-4, abs=1e-5)
    assert slow[0] != pytest.approx(slow[-1], abs=1e-3)  # training moved the loss at all


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, concat",
    [(True, False), (True, True)],
    ids=["default", "concat"],
)  # concat: LoRA's concatenated form under compile; on CPU reduce-overhead compiles as the default
# (no CUDA graphs), and its plumbing is test_module's test_compile_mode_reaches_training
def test_compiled_encoder_gives_the_same_losses(tiny_model_dir, data_dir, tmp_path, mode, concat):
    eager = losses(tiny_model_dir, data_dir, tmp_path, lambda: LoRA(rank=4), fast=True)
    compiled = losses(tiny_model_dir, data_dir, tmp_path, lambda: LoRA(rank=4, concat=concat), fast=True, compile=mode)
    assert eager == pytest.approx(compiled, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_compiled_dora_gives_the_same_losses(tiny_model_dir, data_dir, tmp_path):
    eager = losses(tiny_model_dir, data_dir, tmp_path, lambda: DoRA(rank=4), fast=True)
    compiled = losses(tiny_model_dir, data_dir, tmp_path, lambda: DoRA(rank=4), fast=True, compile=True)
    assert eager == pytest.approx(compiled, rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("concat", [False, True], ids=["plain", "concat"])
def test_compiled_lora_gives_the_eager_gradients(tiny_model_dir, concat):
    """One backward, with every B non-zero (at init B = 0 hides most of the branch's gradient):
    the compiled encoder's gradients of every trainable parameter equal eager's."""
    from peft_lightning.bench import make_batches

    torch.manual_seed(0)
    bb = load_backbone(str(tiny_model_dir), "mean")
    eager = MultiTaskModule(MultiTaskModel(bb.encoder, LoRA(rank=4, concat=concat), pooling="mean", fuse_passes=True))
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    compiled = copy.deepcopy(eager)
    compiled.compile_encoder = True
    compiled.configure_model()
    batch = make_batches(3, 16, bb.encoder.config.vocab_size, eager.device, cls_id=bb.tokenizer.cls_token_id)
    grads = []
    for module in (eager, compiled):
        module.eval()  # no dropout
        sum(TASKS[t].loss(o, batch[t]["labels"]) for t, o in module(batch).items()).backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    torch._dynamo.reset()
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("concat", [False, True], ids=["plain", "concat"])
def test_compiled_encoder_does_not_recompile_every_batch(tiny_model_dir, concat, monkeypatch):
    """Bucketed lengths and a short last batch: the first shape compiles, the next length makes that
    dimension dynamic (one more), the short batch the batch dimension (one more); then no batch of any
    bucket compiles again, and evaluation adds one graph (no grad, no dropout) for all its shapes.
    Graphs are dynamo's business, whatever the backend: the eager backend keeps this test seconds
    long (inductor's code generation is what the same-losses tests above check)."""
    from torch._dynamo.utils import counters

    from peft_lightning.bench import make_batches, ours_step

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: compile_(self, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    bb = load_backbone(str(tiny_model_dir), "mean")
    module = MultiTaskModule(
        MultiTaskModel(bb.encoder, LoRA(rank=4, concat=concat), pooling="mean", fuse_passes=True, compile=True)
    )
    module.configure_model()
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    vocab, cls = bb.encoder.config.vocab_size, bb.tokenizer.cls_token_id
    compiled = []
    for i, (B, L) in enumerate([(4, 16), (4, 32), (4, 48), (3, 32), (4, 64), (2, 16), (4, 48), (4, 16)]):
        ours_step(module, opt, make_batches(B, L, vocab, module.device, seed=i, cls_id=cls), amp=False)
        compiled.append(counters["stats"]["unique_graphs"])
    assert compiled == [1, 2, 2, 3, 3, 3, 3, 3]
    module.eval()
    with torch.no_grad():
        for B, L in [(4, 16), (4, 64), (1, 32)]:
            module(make_batches(B, L, vocab, module.device, cls_id=cls))
    assert counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


def test_unknown_compile_mode_is_refused(tiny_model_dir):
    bb = load_backbone(str(tiny_model_dir), "mean")
    with pytest.raises(ValueError, match=r"model.compile='fast' is unknown; expected true, false or one of"):
        MultiTaskModule(MultiTaskModel(bb.encoder, LoRA(rank=4), pooling="mean", compile="fast"))


def gpu_losses(
    model_dir,
    data_dir,
    tmp_path,
    fast: bool,
    compile: bool | str = False,
    concat: bool = False,
    scaling: str = "fixed",
    steps: int = 6,
) -> list[float]:
    """Training losses on CUDA: fp32 eager reference, or the fast path as `trainer=gpu_fast` runs it
    (bf16 autocast, frozen weights stored in bf16, fused passes and q/k/v, bucketed padding, fused
    AdamW, optionally the compiled encoder)."""
    torch.manual_seed(0)
    bb = load_backbone(str(model_dir), "mean")
    module = MultiTaskModule(
        MultiTaskModel(
            bb.encoder,
            LoRA(rank=4, concat=concat, scaling=scaling),
            pooling="mean",
            fuse_passes=fast,
            pair_features="sbert",
            compile=compile,
        )
    )
    module = module.cuda()
    for layer in module.encoder.encoder.layer:
        if not fast:
            layer.attention.self.qkv = None  # q, k, v each its own product
    if fast:
        store_frozen_in(module.encoder, torch.bfloat16)
    module.configure_model()
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path, pad_to_multiple_of=16 if fast else 1)
    dm.setup()
    module.eval()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, fused=fast)
    return run_steps(module, dm, opt, steps, bf16=fast)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "compile, concat, scaling",
    [
        (False, False, "fixed"),
        (False, True, "fixed"),
        (False, True, "alpha_over_r"),  # scale 4: the scaled products of the arena's folded forms
        (True, False, "fixed"),
        ("reduce-overhead", False, "fixed"),
        ("reduce-overhead", True, "fixed"),
    ],
    ids=["eager", "eager_concat", "eager_concat_scaled", "compiled", "cuda_graphs", "cuda_graphs_concat"],
)
def test_gpu_fast_path_gives_the_same_losses(tmp_path_factory, data_dir, tmp_path, compile, concat, scaling):
    from conftest import make_model_dir

    model_dir = make_model_dir(tmp_path_factory.mktemp("gpu_model"), hidden=64, layers=2, heads=4)
    ref = gpu_losses(model_dir, data_dir, tmp_path, fast=False, scaling=scaling)
    fast = gpu_losses(model_dir, data_dir, tmp_path, fast=True, compile=compile, concat=concat, scaling=scaling)
    assert ref == pytest.approx(fast, rel=5e-2, abs=5e-2)  # bf16 activations: a few 1e-2 after 6 steps
    assert ref[0] != pytest.approx(ref[-1], abs=1e-2)


def test_frozen_weights_are_stored_once_in_the_compute_dtype():
    from test_encoder import pair

    _, enc = pair()
    LoRA(rank=2).attach(enc)
    store_frozen_in(enc, torch.bfloat16)
    layer = enc.encoder.layer[0]
    assert layer.intermediate.dense.base.weight.dtype == torch.bfloat16
    assert layer.intermediate.dense.base.bias.dtype == torch.bfloat16
    assert enc.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert layer.output.LayerNorm.weight.dtype == torch.float32  # autocast runs LayerNorm in fp32
    assert all(p.dtype == torch.float32 for p in enc.parameters() if p.requires_grad)  # LoRA A, B


def bf16_lora_step(module, batch, packed: bool) -> tuple[float, dict, dict]:
    """One bf16-autocast step on CPU (loss, grads, op counts), with or without LoRA's packed casts."""
    module.zero_grad(set_to_none=True)
    counter = OpCounter()
    if not packed:
        module.adapter.compute_dtype_weights = contextlib.nullcontext  # autocast casts each A and B itself
    try:
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(TASKS[t].loss(o, batch[t]["labels"]) for t, o in module(batch).items())
            loss.backward()
    finally:
        if not packed:
            del module.adapter.compute_dtype_weights
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return float(loss), grads, counter.counts


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused_qkv", "lora_dropout"])
def test_packed_casts_change_nothing_but_the_number_of_casts(tiny_model_dir, data_dir, tmp_path, dropout):
    bb = load_backbone(str(tiny_model_dir), "mean")
    module = MultiTaskModule(
        MultiTaskModel(bb.encoder, LoRA(rank=4, dropout=dropout), pooling="mean", fuse_passes=True)
    )
    store_frozen_in(module.encoder, torch.bfloat16)  # as on the GPU fast path
    module.eval()
    for layer in module.adapter.layers:  # B = 0 at init would hide a wrong B layout
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path, pad_to_multiple_of=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    loss, grads, ops = bf16_lora_step(module, batch, packed=True)
    torch.manual_seed(0)
    loss_ref, grads_ref, ops_ref = bf16_lora_step(module, batch, packed=False)
    assert loss == loss_ref
    assert grads.keys() == grads_ref.keys()  # the LoRA matrices and the heads
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name
    lora = [g for name, g in grads.items() if ".lora_" in name]
    assert len(lora) == 2 * len(module.adapter.layers) and all(g.abs().sum() > 0 for g in lora)
    # autocast casts each matrix it sees forward and its gradient back: each A and B, except that a
    # fused q/k/v layer casts its stacked A and block-diagonal B (2 instead of 6); packed: 2 casts in all
    seen = len(lora) - (4 * module.encoder.num_layers if dropout == 0.0 else 0)
    assert ops_ref["_to_copy"] - ops["_to_copy"] == 2 * seen - 2
    if dropout == 0.0:  # fused q/k/v: the stacked A and block-diagonal B come packed too
        assert ops_ref["block_diag"] == module.encoder.num_layers and "block_diag" not in ops
    assert all(layer.cast is None for layer in module.adapter.layers)  # nothing is left set after the pass


def test_dora_in_bf16_with_frozen_weights_stored_in_bf16(tiny_model_dir, data_dir, tmp_path):
    """DoRA on the GPU fast path's storage (frozen weights in bf16, autocast): the fp32 step's loss and
    gradients to bf16 rounding, its magnitudes and LoRA matrices still fp32."""
    torch.manual_seed(0)
    bb = load_backbone(str(tiny_model_dir), "mean")
    module = MultiTaskModule(MultiTaskModel(bb.encoder, DoRA(rank=4), pooling="mean", fuse_passes=True)).eval()
    for layer in module.adapter.layers:  # B = 0 at init would hide a wrong update
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    dm = MultiTaskDataModule(data_dir, bb.tokenizer, cache_dir=tmp_path, pad_to_multiple_of=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))

    def step(bf16: bool) -> tuple[float, dict]:
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sum(TASKS[t].loss(o, batch[t]["labels"]) for t, o in module(batch).items())
        loss.backward()
        return float(loss), {
            n: p.grad.clone() for n, p in module.named_parameters() if ".lora_" in n or "magnitude" in n
        }

    loss32, grads32 = step(False)
    store_frozen_in(module.encoder, torch.bfloat16)
    assert module.adapter.layers[0].base.weight.dtype == torch.bfloat16
    loss16, grads16 = step(True)
    assert loss16 == pytest.approx(loss32, rel=5e-3)
    assert grads16.keys() == grads32.keys() and len(grads16) == 3 * len(module.adapter.layers)
    for name, g in grads16.items():
        assert g.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads32[name].flatten(), dim=0)
        assert cos > 0.995, (name, float(cos))  # 0.9993 at worst here
