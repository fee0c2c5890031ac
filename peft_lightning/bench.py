"""`peft-bench`: time the study's multi-task training step, ours against transformers + PEFT.

One step = SST-5 batch + both sentences of a QQP batch + both sentences of an STS-B batch (five
encoder passes), per-task losses summed, backward, AdamW step. Both sides get the same weights and
the same random token batches (fixed length, no padding) in one process on one device; each case
prints one JSON line per implementation with ms/step (median of timed steps, the two
implementations' steps interleaved so that clock or cache drift hits both alike), samples/s
(3 x B examples a step), peak memory, `ops_per_step` (aten ops the step dispatches, views left out:
about the kernels it launches, the count that bounds a launch-bound GPU step), `gemms_per_step`
(the matrix products among them) and `ratio_vs_peft`
(ours / theirs, lower is better). Each case other than full also times our full fine-tuning step in
the same interleaved loop: `ratio_vs_our_full` (and on CUDA `mem_vs_our_full`), e.g. whether LoRA
is faster than full fine-tuning in our hands (`--no-vs-full` skips it). On CUDA, `host_ms_per_step`
is the time until the step returned, before the GPU was waited for; `--profile DIR` writes op tables
of our steps and adds `kernels_per_step` and `device_busy_ms` (see `profile_step`).
Random-init weights: speed does not depend on them. On CUDA, peak memory is what the
implementation's steps allocate on top of what existed before it was built (its weights, gradients,
optimizer state and activations); on CPU it is the process RSS high-water mark, not per case.

    peft-bench --device cpu --model minilm --batch-sizes 8
    peft-bench --device cuda --model bert_base --batch-sizes 8 32 --compile
    peft-bench --device cpu --model bert_base --bf16 --batch-sizes 2 --length 16 --steps 3   # GPU-path op counts
    peft-bench --device cpu --model overhead --bf16 --batch-sizes 2 --length 8 --steps 40   # its host time
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft_lightning import checks
from peft_lightning.adapters import BitFit, Bottleneck, DoRA, Frozen, Full, LoRA, Prefix
from peft_lightning.encoder import BertEncoder
from peft_lightning.fastpath.precision import COMPILE_MODES, store_frozen_in
from peft_lightning.model import MultiTaskModel
from peft_lightning.mtl import aggregated_backward, aggregator
from peft_lightning.tasks import TASKS

MODELS = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    # bert-base's 12 layers at width 64: the arithmetic is negligible, so with a small batch ms/step is
    # the host time (dispatch, autograd, Python) that a launch-bound GPU step pays, measurable on a CPU
    "overhead": dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=256),
}
STUDY_CASES = {  # the default cases
    "frozen": (Frozen, {}),
    "full": (Full, {}),
    "lora_r8": (LoRA, {"rank": 8}),
    "lora_r64": (LoRA, {"rank": 64}),
    "prefix_p4_mlp": (Prefix, {"length": 4, "mlp": True}),
    "prefix_p4": (Prefix, {"length": 4, "mlp": False}),
}
CASES = {
    **STUDY_CASES,
    "lora_r8_no_arena": (LoRA, {"rank": 8, "arena": False}),  # the arena's effect (bf16, eager)
    "lora_r8_concat": (LoRA, {"rank": 8, "concat": True}),  # the concatenated form (compiled; eager: in the arena)
    "dora_r8": (DoRA, {"rank": 8}),  # beyond the study: against PEFT's LoRA with use_dora
}


# beyond the study, with no PEFT counterpart (bottleneck adapters, the multi-task gradient methods):
# timed against our own LoRA r=8 step in the same interleaved loop (`ratio_vs_our_lora`); the last
# item is the `mtl` method (mtl.py) the step combines the tasks' gradients with
METHOD_CASES = {
    "bitfit": (BitFit, {}, "sum"),
    "bottleneck": (Bottleneck, {}, "sum"),
    "bottleneck_pfeiffer": (Bottleneck, {"placement": "pfeiffer"}, "sum"),
    **{f"lora_r8_{m}": (LoRA, {"rank": 8}, m) for m in ("upgrad", "pcgrad", "mgda", "cagrad", "nashmtl")},
}
METHOD_SETS = {"methods": list(METHOD_CASES)}  # `--cases methods`: all of them


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, views and other metadata-only ops left out."""

    METADATA = {
        "view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "split", "split_with_sizes",
        "detach", "alias", "as_strided", "unsqueeze", "squeeze", "permute", "unbind", "narrow", "lift_fresh",
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_reshape_alias",
        "view_as", "reshape", "unflatten", "diagonal", "_local_scalar_dense", "is_same_size",
        "_has_compatible_shallow_copy_type", "_record_function_enter_new", "_record_function_exit",
    }  # fmt: skip

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}  # op name -> times dispatched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name not in self.METADATA:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm")


def count_ops(step) -> tuple[int, int]:
    """(ops, GEMMs) one call of `step` dispatches (views and other metadata-only ops left out)."""
    with OpCounter() as counter:
        step()
    return sum(counter.counts.values()), sum(counter.counts.get(name, 0) for name in GEMMS)


def make_batches(B: int, L: int, vocab: int, device: torch.device, seed: int = 0, cls_id: int = 101) -> dict:
    """A random multi-task step of B rows a pass and L tokens a row (bert-base's [CLS] by default;
    token ids from 1000 up, or from the vocabulary's middle for a small one)."""
    g = torch.Generator().manual_seed(seed)

    def enc() -> dict:
        ids = torch.randint(min(1000, vocab // 2), vocab, (B, L), generator=g)
        ids[:, 0] = cls_id
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones(B, L, dtype=torch.long, device=device),
            "token_type_ids": torch.zeros(B, L, dtype=torch.long, device=device),
        }

    return {
        "sst5": {"inputs": [enc()], "labels": torch.randint(0, 5, (B,), generator=g).float().to(device)},
        "qqp": {"inputs": [enc(), enc()], "labels": torch.randint(0, 2, (B,), generator=g).float().to(device)},
        "stsb": {"inputs": [enc(), enc()], "labels": (torch.rand(B, generator=g) * 5).to(device)},
    }


def ours_step(model: MultiTaskModel, opt: torch.optim.Optimizer, batch: dict, amp: bool, aggregate=None):
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        outputs = model(batch)
        losses = [TASKS[t].loss(o, batch[t]["labels"]) for t, o in outputs.items()]
    if aggregate is None:
        sum(losses).backward()
    else:  # a multi-task gradient method (mtl.py), as MultiTaskModule.backward does
        encoder, adapter, heads = model.parts()
        aggregated_backward(losses, [p for _, p in encoder + adapter], [p for _, p in heads], aggregate)
    opt.step()
    opt.zero_grad(set_to_none=True)


class PeftMultiTask(nn.Module):
    """The same step built the usual way: transformers' BertModel, wrapped by PEFT, plus our heads."""

    def __init__(self, hf_model, heads: nn.ModuleDict, frozen: bool, prefix: bool):
        super().__init__()
        self.model, self.heads, self.frozen, self.prefix = hf_model, heads, frozen, prefix

    def encode(self, enc: dict) -> torch.Tensor:
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if not self.prefix:  # PEFT's prompt learning drops token_type_ids
            kwargs["token_type_ids"] = enc["token_type_ids"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model(**kwargs).last_hidden_state[:, 0]

    def forward(self, batch: dict) -> dict:
        return {t: self.heads[t]([self.encode(e) for e in sub["inputs"]]) for t, sub in batch.items()}


def peft_model(case: str, hf, kwargs: dict):
    import peft

    if case == "frozen":
        hf.requires_grad_(False)
        return hf.eval()
    if case == "full":
        return hf
    if case.startswith(("lora", "dora")):
        cfg = peft.LoraConfig(
            r=kwargs["rank"],
            lora_alpha=kwargs["rank"],
            target_modules="all-linear",
            lora_dropout=0.0,
            use_dora=case.startswith("dora"),
        )
        return peft.get_peft_model(hf, cfg)
    cfg = peft.PrefixTuningConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=kwargs["length"], prefix_projection=kwargs["mlp"]
    )
    return peft.get_peft_model(hf, cfg)


def peft_step(model: PeftMultiTask, opt, batch: dict, amp: bool, device: torch.device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(batch)
        loss = sum(
            F.mse_loss(o.float(), batch[t]["labels"])
            if t == "stsb"
            else F.cross_entropy(o.float(), batch[t]["labels"].long())
            for t, o in outputs.items()
        )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_and_warm(step, warmup: int, device: torch.device, base: int) -> float:
    """Warm one implementation up; its peak MiB above `base`, the allocation before it was built (CUDA):
    its weights, gradients, optimizer state and activations, not the other implementation's."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def alternate(steps: dict, n: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Median ms/step of each implementation, their steps interleaved (so drift hits both alike), and
    the median ms until the step returned to the host (on CUDA, before synchronising: a step whose
    host time is its whole time is bound by the host, one whose host time is short waits for the GPU)."""
    times = {k: [] for k in steps}
    host = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host[k].append(1000 * (time.perf_counter() - t0))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: (statistics.median(times[k]), statistics.median(host[k])) for k in steps}


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals (us in, ms out): how long the device was busy."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total / 1000


def profile_step(step, n: int, device: torch.device, path: Path) -> dict:
    """Profile `n` steps with torch.profiler: the op table (sorted by host time and, on CUDA, by device
    time) goes to `path`; on CUDA returns the kernels (and copies) a step launches and the ms a step the
    GPU was busy, else Nones. Where a step's busy ms is well under its ms/step, the GPU waits for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    tables = [f"{n} steps, sorted by self CPU time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40)]
    if cuda:
        tables.append(
            f"{n} steps, sorted by self device time\n" + averages.table(sort_by="self_device_time_total", row_limit=40)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables))
    if not cuda:
        return {"kernels_per_step": None, "device_busy_ms": None}
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return {"kernels_per_step": round(len(kernels) / n), "device_busy_ms": round(busy_ms(kernels) / n, 2)}


def build_ours(case: str, cfg, state: dict, batch: dict, args, device: torch.device) -> dict:
    """Our module for `case` from the shared weights, warmed up: its step, first-step seconds, peak
    MiB, ops a step, and a copy of its heads (for the PEFT side: same heads, same init)."""
    base = allocated(device)
    cls, kwargs, method = CASES[case] + ("sum",) if case in CASES else METHOD_CASES[case]
    torch.manual_seed(0)
    enc = BertEncoder(cfg, add_pooler=False)
    enc.load_state_dict(state)
    enc.to(device)
    compile = (args.compile_mode or True) if args.compile else False
    model = MultiTaskModel(enc, cls(**kwargs), pooling="cls", fuse_passes=args.fuse, compile=compile).to(device)
    if args.bf16:  # frozen weights stored once in the compute dtype, as training's on_fit_start does
        store_frozen_in(model.encoder, torch.bfloat16)
    heads = copy.deepcopy(model.heads)
    model.compile_encoder()  # in place, when asked, as training does
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    aggregate = aggregator(method, 3)
    step = lambda: ours_step(model, opt, batch, args.bf16, aggregate)  # noqa: E731
    t0 = time.perf_counter()
    step()  # the first step compiles
    first = time.perf_counter() - t0
    mem = peak_and_warm(step, args.warmup, device, base)
    return {
        "step": step, "first": first, "mem": mem, "ops": (None, None) if args.compile else count_ops(step), "heads": heads
    }  # fmt: skip


def run_method_case(case: str, B: int, args, device: torch.device) -> list[dict]:
    """A case with no PEFT counterpart (`METHOD_CASES`): our step and our LoRA r=8 step, interleaved."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**MODELS[args.model], vocab_size=30522, attn_implementation="sdpa")
    torch.manual_seed(0)
    state = BertModel(cfg, add_pooling_layer=False).state_dict()
    batch = make_batches(B, args.length, cfg.vocab_size, device)
    ours = build_ours(case, cfg, state, batch, args, device)
    lora = build_ours("lora_r8", cfg, state, batch, args, device)
    t = {k: ms for k, (ms, _) in alternate({"ours": ours["step"], "lora": lora["step"]}, args.steps, device).items()}
    cls, kwargs, method = METHOD_CASES[case]
    return [
        {
            "case": case,
            "impl": "ours",
            "device": device.type,
            "model": args.model,
            "batch_size": B,
            "length": args.length,
            "mtl": method,
            "ms_per_step": round(t["ours"], 2),
            "our_lora_r8_ms": round(t["lora"], 2),
            "ratio_vs_our_lora": round(t["ours"] / t["lora"], 3),
            "samples_per_s": round(3 * B / (t["ours"] / 1000), 1),
            "ops_per_step": ours["ops"][0],
            "gemms_per_step": ours["ops"][1],
        }
    ]


def run_case(case: str, B: int, args, device: torch.device) -> list[dict]:
    """The case's rows, ours and PEFT's; with `args.vs_full`, our row also has our full step's time and
    memory, that step timed interleaved with the other two (the comparison LoRA's targets make)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**MODELS[args.model], vocab_size=30522, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = BertModel(cfg, add_pooling_layer=False)  # on CPU until its turn: its memory is not ours
    batch = make_batches(B, args.length, cfg.vocab_size, device)
    kwargs = CASES[case][1]
    ours = build_ours(case, cfg, hf.state_dict(), batch, args, device)
    full = build_ours("full", cfg, hf.state_dict(), batch, args, device) if args.vs_full and case != "full" else None

    # transformers + PEFT
    base = allocated(device)
    model = PeftMultiTask(
        peft_model(case, hf.to(device), kwargs),
        ours["heads"],
        frozen=case == "frozen",
        prefix=case.startswith("prefix"),
    ).to(device)
    model.train()
    if case == "frozen":
        model.model.eval()
    opt2 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    theirs = lambda: peft_step(model, opt2, batch, args.bf16, device)  # noqa: E731
    theirs()
    mem_peft = peak_and_warm(theirs, args.warmup, device, base)
    ops_peft = count_ops(theirs)
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)

    steps = {"ours": ours["step"], "hf_peft": theirs}
    if full is not None:
        steps["ours_full"] = full["step"]
    timed = alternate(steps, args.steps, device)
    t = {k: ms for k, (ms, _) in timed.items()}
    profiled = {}
    if args.profile:  # after the timing, so that the profiler's overhead stays out of it
        for impl in ("ours", "ours_full"):
            if impl in steps:
                path = Path(args.profile) / f"{case}-b{B}-{impl}.txt"
                try:  # a profiler that cannot run (no CUPTI, say) must not cost the timings above
                    profiled[impl] = profile_step(steps[impl], args.profile_steps, device, path)
                except Exception as e:  # noqa: BLE001
                    profiled[impl] = {"profile_error": f"{type(e).__name__}: {e}"[:300]}
    rows = []
    for impl, mem, ops in (("ours", ours["mem"], ours["ops"]), ("hf_peft", mem_peft, ops_peft)):
        row = {
            "case": case,
            "impl": impl,
            "device": device.type,
            "model": args.model,
            "batch_size": B,
            "length": args.length,
            "ms_per_step": round(t[impl], 2),
            "samples_per_s": round(3 * B / (t[impl] / 1000), 1),
            "peak_mem_mib": round(mem, 1),
            "encoder_trainable": trainable,
            "ops_per_step": ops[0],
            "gemms_per_step": ops[1],
            "ratio_vs_peft": round(t[impl] / t["hf_peft"], 3),
        }
        if device.type == "cuda":
            row["host_ms_per_step"] = round(timed[impl][1], 2)
        if impl == "ours" and profiled:
            row.update(profiled["ours"])
        if impl == "ours" and full is not None:
            row["our_full_ms"] = round(t["ours_full"], 2)
            if device.type == "cuda":
                row["our_full_host_ms"] = round(timed["ours_full"][1], 2)
            if profiled:
                row.update({f"our_full_{k}": v for k, v in profiled["ours_full"].items()})
            row["ratio_vs_our_full"] = round(t["ours"] / t["ours_full"], 3)
            row["mem_vs_our_full"] = round(mem / full["mem"], 3) if device.type == "cuda" else None
        if impl == "ours" and args.compile:
            row["first_step_s"] = round(ours["first"], 1)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peft-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="minilm", choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(STUDY_CASES),
        choices=[*CASES, *METHOD_CASES, *METHOD_SETS],
        help="the study's strategies by default; `methods`: every case beyond PEFT (METHOD_CASES), timed "
        "against our LoRA r=8 step",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True, help="one encoder call per step")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast and frozen weights in bf16 (default: on CUDA only)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile our encoder")
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=list(COMPILE_MODES),
        help="torch.compile mode (implies --compile); reduce-overhead replays the encoder as CUDA graphs",
    )
    parser.add_argument(
        "--vs-full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time our full fine-tuning step, interleaved, for each other case (ratio_vs_our_full)",
    )
    parser.add_argument("--out", help="also append each JSON line to this file as it is printed")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after timing, profile our step (and our full step) with torch.profiler: op tables to "
        "DIR/<case>-b<B>-<impl>.txt; on CUDA, kernels_per_step and device_busy_ms in the row",
    )
    parser.add_argument("--profile-steps", type=int, default=3, help="steps to profile (with --profile)")
    args = parser.parse_args(argv)
    try:
        device = checks.device(args.device)
    except ValueError as err:
        parser.error(str(err))
    args.compile = args.compile or args.compile_mode is not None
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    header = {
        "bench": "peft-lightning",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "fuse": args.fuse,
        "bf16": args.bf16,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
    }
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name()

    def emit(record: dict) -> None:  # line by line: a run stopped part-way keeps what it measured
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    emit(header)
    cases = [c for name in args.cases for c in METHOD_SETS.get(name, [name])]
    for B in args.batch_sizes:
        for case in cases:
            for row in (run_method_case if case in METHOD_CASES else run_case)(case, B, args, device):
                emit(row)


if __name__ == "__main__":
    main()
