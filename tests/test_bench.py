"""peft-bench: one JSON line per implementation and case, ratios against PEFT from the same run."""

from __future__ import annotations

import json

import pytest
from conftest import needs_peft

from peft_lightning import bench  # noqa: E402


@needs_peft
def test_bench_prints_one_line_per_impl_with_ratios(tmp_path, capsys):
    import peft  # noqa: F401 (needs_peft)

    out = tmp_path / "bench.jsonl"
    argv = ["--device", "cpu", "--model", "tiny", "--batch-sizes", "2", "--length", "8"]
    bench.main([*argv, "--cases", "lora_r8", "frozen", "--steps", "2", "--warmup", "1", "--out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in out.read_text().splitlines()] == printed
    header, rows = printed[0], printed[1:]
    assert header["bench"] == "peft-lightning" and header["fuse"] is True and header["compile"] is False
    assert [(r["case"], r["impl"]) for r in rows] == [
        ("lora_r8", "ours"),
        ("lora_r8", "hf_peft"),
        ("frozen", "ours"),
        ("frozen", "hf_peft"),
    ]
    for ours, theirs in (rows[0:2], rows[2:4]):
        assert theirs["ratio_vs_peft"] == 1.0
        assert ours["ratio_vs_peft"] == pytest.approx(ours["ms_per_step"] / theirs["ms_per_step"], abs=2e-3)
        assert ours["samples_per_s"] == pytest.approx(3 * 2 / (ours["ms_per_step"] / 1000), rel=1e-2)
    # tiny: 2 layers x r (in + out) over q, k, v, o (64 + 64 each), intermediate (64 + 128), output (128 + 64)
    assert rows[0]["encoder_trainable"] == 2 * 8 * (4 * 128 + 192 + 192) == 14336
    assert rows[2]["encoder_trainable"] == 0
    for ours in (rows[0], rows[2]):  # our full step timed in the same loop: the LoRA-vs-full comparison
        assert ours["ratio_vs_our_full"] == pytest.approx(ours["ms_per_step"] / ours["our_full_ms"], abs=2e-3)
        assert ours["mem_vs_our_full"] is None  # CPU: process RSS, not per implementation
    assert "ratio_vs_our_full" not in rows[1]
    assert all(r["ops_per_step"] > 0 for r in rows)
    assert rows[2]["ops_per_step"] < rows[0]["ops_per_step"]  # frozen: no encoder backward at all


@needs_peft
def test_bench_dora_case_against_peft_dora(capsys):
    import peft  # noqa: F401 (needs_peft)

    argv = ["--device", "cpu", "--model", "tiny", "--batch-sizes", "2", "--length", "8", "--no-vs-full"]
    bench.main([*argv, "--cases", "dora_r8", "--steps", "1", "--warmup", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")][1:]
    assert [(r["case"], r["impl"]) for r in rows] == [("dora_r8", "ours"), ("dora_r8", "hf_peft")]
    # LoRA's 14,336 and a magnitude per output row (2 x (4 x 64 + 128 + 64)), counted alike in PEFT's model
    assert rows[0]["encoder_trainable"] == rows[1]["encoder_trainable"] == 14336 + 896


@needs_peft
def test_bench_bf16_counts_fewer_ops_with_packed_lora_casts(capsys):
    """The GPU path's bf16 step on CPU: LoRA's A and B arrive cast in a few ops, so a LoRA step
    dispatches fewer ops than a full fine-tuning step of the same model."""
    import peft  # noqa: F401 (needs_peft)

    argv = ["--device", "cpu", "--model", "tiny", "--bf16", "--batch-sizes", "2", "--length", "8"]
    cases = ["full", "lora_r8", "lora_r8_no_arena"]
    bench.main([*argv, "--cases", *cases, "--steps", "1", "--warmup", "1", "--no-vs-full"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed[0]["bf16"] is True
    assert all("ratio_vs_our_full" not in r for r in printed[1:])
    ops = {(r["case"], r["impl"]): r["ops_per_step"] for r in printed[1:]}
    assert ops[("lora_r8", "ours")] < ops[("full", "ours")]
    assert ops[("lora_r8", "ours")] < ops[("lora_r8", "hf_peft")]
    # the arena, in each of tiny's 2 layers: two GEMMs fewer for q/k/v and the attention output, one
    # fewer for each FFN layer (GELU's input and input gradient are kept contiguous), one fewer
    # again for the first q/k/v (its input needs no gradient); the attention and FFN outputs'
    # products are copied out (+2 a layer); A and B are written into the arena, not into a new
    # zeroed block-diagonal buffer (-1)
    assert ops[("lora_r8_no_arena", "ours")] - ops[("lora_r8", "ours")] == (6 * 2 - 1) - 2 * 2 + 1
    gemms = {(r["case"], r["impl"]): r["gemms_per_step"] for r in printed[1:]}
    assert gemms[("lora_r8_no_arena", "ours")] - gemms[("lora_r8", "ours")] == 6 * 2 - 1
    assert gemms[("full", "ours")] < gemms[("lora_r8", "ours")] < ops[("lora_r8", "ours")]


@needs_peft
@pytest.mark.slow
def test_bench_compile_mode_compiles_our_encoder(capsys):
    argv = ["--device", "cpu", "--model", "tiny", "--batch-sizes", "2", "--length", "8", "--steps", "1"]
    bench.main([*argv, "--cases", "lora_r8", "--warmup", "1", "--compile-mode", "reduce-overhead", "--no-vs-full"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header, ours, theirs = printed
    assert header["compile"] is True and header["compile_mode"] == "reduce-overhead"
    assert ours["first_step_s"] > 0 and "first_step_s" not in theirs
    assert ours["ops_per_step"] is None and theirs["ops_per_step"] > 0  # no op counting inside compiled code


@needs_peft
def test_bench_profile_writes_op_tables_for_ours_and_our_full(tmp_path, capsys):
    argv = ["--device", "cpu", "--model", "tiny", "--batch-sizes", "2", "--length", "8", "--steps", "1"]
    bench.main(
        [*argv, "--cases", "lora_r8", "--warmup", "1", "--profile", str(tmp_path / "prof"), "--profile-steps", "2"]
    )
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    ours = printed[1]
    assert ours["impl"] == "ours" and "host_ms_per_step" not in ours  # CPU: the host time is the step
    assert ours["kernels_per_step"] is None and ours["our_full_device_busy_ms"] is None  # CUDA only
    tables = {p.name: p.read_text() for p in (tmp_path / "prof").iterdir()}
    assert sorted(tables) == ["lora_r8-b2-ours.txt", "lora_r8-b2-ours_full.txt"]
    assert tables["lora_r8-b2-ours.txt"].startswith("2 steps, sorted by self CPU time")
    assert "_LowRankLinearBackward" in tables["lora_r8-b2-ours.txt"]  # fp32 on CPU: no arena
    assert "aten::_fused_adamw_" in tables["lora_r8-b2-ours_full.txt"]
    assert "_LowRankLinear" not in tables["lora_r8-b2-ours_full.txt"]


def test_busy_ms_is_the_union_of_kernel_intervals():
    assert bench.busy_ms([]) == 0
    # us in, ms out; overlaps (two streams) and nested intervals count once, gaps not at all
    assert bench.busy_ms([(0, 1000), (500, 1500), (2000, 2500), (2100, 2200)]) == pytest.approx(2.0)


def test_alternate_reports_host_time_and_total_time():
    import time

    ms = bench.alternate({"a": lambda: time.sleep(0.004), "b": lambda: None}, 3, bench.torch.device("cpu"))
    (a, a_host), (b, b_host) = ms["a"], ms["b"]
    assert 4 <= a_host <= a and b_host <= b < a  # on CPU the host time is the step's time
