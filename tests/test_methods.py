"""Beyond the study's strategies: bottleneck adapters, BitFit, LoRA+ and multi-task gradient methods."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bert_base_encoder, compose, inputs, pair, tiny_overrides, trainable

from peft_lightning.adapters import BitFit, Bottleneck, BottleneckLinear
from peft_lightning.build import build
from peft_lightning.mtl import AGGREGATORS, MTL, aggregated_backward, aggregator
from peft_lightning.optim import Optim, param_groups

H, M = 768, 48  # BERT-base hidden size; its bottleneck at reduction factor 16


def one_adapter(h: int, m: int) -> int:
    return 2 * h * m + m + h  # W_down, b_down, W_up, b_up


def test_bottleneck_trainable_counts_are_the_closed_form_on_bert_base():
    for placement, adapters in (("houlsby", 24), ("pfeiffer", 12)):
        enc = bert_base_encoder()
        Bottleneck(placement=placement).attach(enc)
        assert trainable(enc) == adapters * one_adapter(H, M)
    assert one_adapter(H, M) * 24 == 1_789_056
    enc = bert_base_encoder()
    Bottleneck(size=64).attach(enc)
    assert trainable(enc) == 24 * one_adapter(H, 64) == 2_379_264
    enc = bert_base_encoder()
    Bottleneck(placement="pfeiffer", train_layernorm=True).attach(enc)
    layernorms = (1 + 2 * 12) * 2 * H  # the embeddings' and two a layer, weight and bias
    assert trainable(enc) == 12 * one_adapter(H, M) + layernorms


def test_bitfit_trains_exactly_the_chosen_biases():
    enc = bert_base_encoder()
    bitfit = BitFit()
    bitfit.attach(enc)
    chosen = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert chosen == {n for n, _ in enc.named_parameters() if n.endswith(".bias")}  # the pooler's too (auto)
    per_layer = 4 * H + 3072 + H + 2 * H  # q, k, v, attention output; FFN in, out; two LayerNorms
    assert trainable(enc) == 12 * per_layer + H + H == 102_912  # + the embeddings' LayerNorm, the pooler
    assert {id(p) for p in bitfit.encoder_params()} == {id(p) for p in enc.parameters() if p.requires_grad}
    enc = bert_base_encoder(pooler=False)
    BitFit().attach(enc)
    assert trainable(enc) == 102_144
    enc = bert_base_encoder()
    subset = BitFit(targets=["query", "intermediate.dense"])
    subset.attach(enc)
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names == {
        f"encoder.layer.{i}.{m}.bias" for i in range(12) for m in ("attention.self.query", "intermediate.dense")
    }
    assert trainable(enc) == 12 * (H + 3072) == 46_080
    with pytest.raises(ValueError, match="matched no linear layer"):
        BitFit(targets=["nothing"]).attach(bert_base_encoder())


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_bottleneck_starts_as_the_frozen_encoder_and_one_step_moves_only_adapter_and_head(placement):
    _, plain = pair()
    _, ours = pair()
    adapter = Bottleneck(placement=placement, size=8, nonlinearity="gelu")
    adapter.attach(ours)
    assert sum(isinstance(m, BottleneckLinear) for m in ours.modules()) == (4 if placement == "houlsby" else 2)
    ids, mask, types = inputs()
    with torch.no_grad():
        assert torch.equal(ours(ids, mask, types), plain(ids, mask, types))  # a(y) = y at init
    ours.train()
    head = torch.nn.Linear(32, 3)
    before = {n: p.detach().clone() for n, p in [*ours.named_parameters(), *head.named_parameters()]}
    params = [p for p in [*ours.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss = head(ours(ids, mask, types)[:, 0]).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in [*ours.named_parameters(), *head.named_parameters()] if not torch.equal(p, before[n])}
    assert changed and all(".adapter_" in n or n in ("weight", "bias") for n in changed), changed
    assert any(n.endswith("adapter_up.weight") for n in changed)
    with torch.no_grad():
        assert not torch.equal(ours(ids, mask, types), plain(ids, mask, types))


def test_adapter_option_errors_name_the_option():
    with pytest.raises(ValueError, match="adapter.placement='middle'"):
        Bottleneck(placement="middle")
    with pytest.raises(ValueError, match="adapter.nonlinearity='sigmoid'"):
        Bottleneck(nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="adapter.size=0"):
        Bottleneck(size=0)
    with pytest.raises(ValueError, match="optim.loraplus_ratio=4.0 is LoRA\\+"):
        Optim.from_config({"loraplus_ratio": 4.0}, "bitfit")
    with pytest.raises(ValueError, match="optim.loraplus_ratio"):
        Optim(loraplus_ratio=0)


def lora_groups(tiny_model_dir, data_dir, tmp_path, *extra):
    cfg = compose(
        tiny_overrides(
            tiny_model_dir, data_dir, tmp_path, "adapter=lora", "optim.adapter_lr=1e-3", "optim.head_lr=5e-4", *extra
        )
    )
    _, _, module = build(cfg)
    names = {id(p): n for n, p in module.model.named_parameters()}
    groups = param_groups(module.optim.parts(*module.model.parts()), module.optim.weight_decay)
    return [(g["lr"], {names[id(p)].rsplit(".", 1)[-1] for p in g["params"]}) for g in groups]


def test_loraplus_puts_b_in_a_group_at_ratio_times_a_lr(tiny_model_dir, data_dir, tmp_path):
    plain = lora_groups(tiny_model_dir, data_dir, tmp_path)
    plus = lora_groups(tiny_model_dir, data_dir, tmp_path, "optim.loraplus_ratio=16")
    a_lr = {lr for lr, kinds in plus if "lora_A" in kinds}
    b_lr = {lr for lr, kinds in plus if "lora_B" in kinds}
    assert a_lr == {1e-3} and len(b_lr) == 1 and b_lr.pop() == pytest.approx(1.6e-2)
    assert all(kinds == {"lora_B"} for lr, kinds in plus if "lora_B" in kinds)  # B alone in its group
    # the default is unchanged: A and B share adapter_lr, one group
    assert [kinds for lr, kinds in plain if lr == 1e-3] == [{"lora_A", "lora_B"}]


# ---- multi-task gradient methods ------------------------------------------------------------


def toy(seed: int = 0):
    """Two tasks on a shared linear layer, each with its own head and its own batch."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.nn.Linear(6, 5)
    heads = [torch.nn.Linear(5, 1), torch.nn.Linear(5, 1)]
    with torch.no_grad():
        for m in [shared, *heads]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    xs = [torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)]
    ys = [torch.randn(4, 1, generator=g), torch.randn(3, 1, generator=g)]

    def losses():
        return [torch.nn.functional.mse_loss(h(torch.tanh(shared(x))), y) for h, x, y in zip(heads, xs, ys)]

    return shared, heads, losses


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_each_aggregator_update_equals_torchjds_on_the_explicit_jacobian(name):
    options = {"cagrad": {"c": 0.4}}.get(name, {})
    shared, heads, losses = toy()
    params = list(shared.parameters())
    # reference: the Jacobian row by row with plain autograd, then torchjd's aggregator on it
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]) for loss in losses()]
    expected = aggregator(name, 2, options)(torch.stack(rows))
    head_expected = [torch.autograd.grad(loss, list(h.parameters())) for loss, h in zip(losses(), heads)]
    aggregated_backward(losses(), params, [p for h in heads for p in h.parameters()], aggregator(name, 2, options))
    got = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)
    for h, want in zip(heads, head_expected):
        for p, w in zip(h.parameters(), want):
            assert torch.allclose(p.grad, w, atol=1e-7)  # a head gets its own task's gradient only
    assert got.abs().sum() > 0


def test_mtl_sum_is_the_plain_summed_backward():
    assert not MTL("sum", 3).active and MTL("sum", 3).aggregate is None
    with pytest.raises(ValueError, match="mtl.name='gradnorm' is unknown"):
        MTL("gradnorm", 3)
    with pytest.raises(ValueError, match="mtl=cagrad"):
        MTL("cagrad", 3, {"gamma": 1.0})


def run(tiny_model_dir, data_dir, out, *extra):
    from peft_lightning.train import train

    cfg = compose(tiny_overrides(tiny_model_dir, data_dir, out, "trainer.max_epochs=1", *extra))
    res = train(cfg)
    assert res["status"] == "complete", res.get("error")
    return res, torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]


def test_mtl_sum_trains_bit_identically_to_the_default_and_an_aggregator_trains(tiny_model_dir, data_dir, tmp_path):
    res, default = run(tiny_model_dir, data_dir, tmp_path / "default", "adapter=lora")
    _, summed = run(tiny_model_dir, data_dir, tmp_path / "sum", "adapter=lora", "mtl=sum")
    assert res["mtl"] == {"name": "sum"} and default.keys() == summed.keys()
    assert all(torch.equal(default[k], summed[k]) for k in default)
    steps = res["steps"]
    res, upgrad = run(tiny_model_dir, data_dir, tmp_path / "upgrad", "adapter=lora", "mtl=upgrad")
    assert res["mtl"] == {"name": "upgrad"} and res["steps"] == steps > 0
    assert any(not torch.equal(default[k], upgrad[k]) for k in default if "lora_B" in k)
    written = json.loads((tmp_path / "upgrad" / "results.json").read_text())
    assert written["config"]["mtl"] == {"name": "upgrad"}


@pytest.mark.parametrize(
    "extra,match",
    [
        (("trainer.precision=16-mixed",), "fp16's GradScaler"),
        (("trainer=ddp",), "DDP all-reduces"),
        (("model.compile=true",), "the compiled backward"),
        (("data.schedule=round_robin",), "data.schedule=round_robin"),
        (("adapter=frozen",), "nothing but the heads trains"),
    ],
)
def test_what_an_aggregator_does_not_combine_with_is_a_config_error(tiny_model_dir, data_dir, tmp_path, extra, match):
    cfg = compose(tiny_overrides(tiny_model_dir, data_dir, tmp_path, "mtl=pcgrad", *extra))
    with pytest.raises(ValueError, match=match):
        build(cfg)


def read_tsv(path) -> list[list[str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


@pytest.mark.parametrize("extra", [(), ("adapter.train_layernorm=true", "adapter=bottleneck_pfeiffer")])
def test_bottleneck_export_then_load_run_and_peft_predict_reproduce_its_dev_predictions(
    tiny_model_dir, data_dir, tmp_path, capsys, extra
):
    from peft_lightning.api import load_run
    from peft_lightning.export import ExportError, export
    from peft_lightning.predict import main as predict_main

    run_dir = tmp_path / "run"
    run(tiny_model_dir, data_dir, run_dir, "adapter=bottleneck", "optim.adapter_lr=1e-2", *extra)
    with pytest.raises(ExportError, match="does not merge"):
        export(run_dir, tmp_path / "merged", merged=True)
    out = export(run_dir, tmp_path / "export")
    assert {"adapter.safetensors", "adapter.json", "heads.safetensors", "heads.json", "peft_lightning.json"} <= {
        f.name for f in out.iterdir()
    }
    spec = json.loads((out / "adapter.json").read_text())
    assert spec["format"].startswith("peft-lightning native adapter")
    assert any(k.endswith("output.dense.adapter.up.weight") for k in spec["tensors"])
    assert any("LayerNorm" in k for k in spec["tensors"]) == bool(extra)
    exported = load_run(out)
    for task in ("sst5", "qqp", "stsb"):
        dev = read_tsv(run_dir / "predictions" / f"{task}-dev.tsv")  # id, prediction, label
        rows = read_tsv(data_dir / task / "dev.tsv")[1:]
        texts = [r[1] for r in rows] if task == "sst5" else [(r[1], r[2]) for r in rows]
        got = exported.predict(task, texts)
        if task == "stsb":
            assert max(abs(a - float(r[1])) for a, r in zip(got, dev[1:])) < 1e-5
        else:
            assert got == [int(r[1]) for r in dev[1:]]
        rc = predict_main(
            [str(out), "--task", task, "--input", str(data_dir / task / "dev.tsv"), "--out", str(tmp_path / "p.tsv")]
        )
        assert rc == 0 and read_tsv(tmp_path / "p.tsv") == [r[:2] for r in dev]
    # the export is the adapter's: a changed tensor changes the predictions
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("adapter.up.weight"))
    del tensors[key]
    save_file(tensors, str(out / "adapter.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_run(out)


def test_peft_bench_times_each_new_method_against_our_lora_step(capsys):
    from peft_lightning.bench import METHOD_CASES
    from peft_lightning.bench import main as bench_main

    bench_main(["--device", "cpu", "--model", "tiny", "--batch-sizes", "2", "--length", "8", "--steps", "1"]
               + ["--warmup", "1", "--cases", "methods"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"case"')]
    assert [r["case"] for r in rows] == list(METHOD_CASES)
    for r in rows:
        assert r["ratio_vs_our_lora"] == pytest.approx(r["ms_per_step"] / r["our_lora_r8_ms"], rel=0.01)
        assert r["mtl"] == METHOD_CASES[r["case"]][2]
    # an aggregated step computes the Jacobian row by row: more ops than the summed loss's step
    ops = {r["case"]: r["ops_per_step"] for r in rows}
    assert ops["lora_r8_upgrad"] > ops["bottleneck"] > 0


@pytest.mark.slow
def test_peft_methods_and_mtl_methods_at_smoke_size_report_intervals_and_the_floor(tiny_model_dir, data_dir, tmp_path):
    """Both studies end to end (`peft-reproduce`): every job trains or is shared, and each study's
    report section has the intervals and the floor row."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    root = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "peft_lightning.reproduce", "budget=smoke", "studies=[peft_methods,mtl_methods]"]
    cmd += [f"sweep_root={root}", "model=local", f"model.source={tiny_model_dir}", f"data.dir={data_dir}"]
    cmd += [f"data.cache_dir={tmp_path / 'cache'}", "trainer.accelerator=cpu", "optim.adapter_lr=3e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = {p.parent.relative_to(root).as_posix(): json.loads(p.read_text()) for p in root.rglob("results.json")}
    methods = {r["adapter"]["name"] for k, r in runs.items() if k.startswith("peft_methods/")}
    assert methods == {"frozen", "full", "lora", "prefix", "ia3", "dora", "bitfit", "bottleneck", "bottleneck_pfeiffer"}
    mtl = {(r["adapter"]["name"], r["mtl"]["name"]) for k, r in runs.items() if k.startswith("mtl_methods/")}
    assert mtl == {(a, m) for a in ("lora", "full") for m in ("sum", "upgrad", "pcgrad", "cagrad", "nashmtl")}
    assert all(r["status"] == "complete" for r in runs.values())
    # the summed loss's LoRA and full runs are peft_methods' (the same training config): trained once
    shared = sorted(k.split("/")[1] for k, r in runs.items() if r.get("shared_from"))
    assert len(shared) == 2 and all("mtl=sum" in k for k in shared), shared
    text = (root / "report" / "report.md").read_text()
    for title in ("## PEFT methods", "## Multi-task gradient methods"):
        section = text.split(title, 1)[1].split("\n## ", 1)[0]
        assert "dev avg 95% CI" in section and "floor" in section, section[:1500]
    mtl_section = text.split("## Multi-task gradient methods", 1)[1].split("\n## ", 1)[0]
    assert "Δ dev avg vs mtl=sum" in mtl_section
