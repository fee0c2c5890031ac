"""Time LoRA's arena sites at bert-base width, plain against `concat` (folded updates), forward and backward.

    python -m peft_lightning.arena_bench [--device cpu|cuda] [--rows N ...] [--repeats K]

One JSON line per site and row count: the median ms of the plain and the folded site, timed
interleaved in one process, and their ratio. bf16, rank 8, scale 1, the sites as the encoder
calls them (q/k/v fused and its output kept; the FFN's first layer with a contiguous output; the
second with GELU in front). On a CPU this says little about a GPU, whose rank-8 updates are bound
by memory traffic; it is there to be run on one.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from peft_lightning.bench import alternate
from peft_lightning.fastpath.arena import Arena, ArenaCast, ArenaSite, arena_linear
from peft_lightning.fastpath.cast import cast_packed

SITES = {  # name: (outs, in, gelu, keep_output, contiguous_output)
    "qkv": ((768, 768, 768), 768, False, True, False),
    "attention_output": ((768,), 768, False, False, False),
    "ffn_in": ((3072,), 768, False, True, True),
    "ffn_out": ((768,), 3072, True, False, False),
}


def site_step(name: str, rows: int, device: torch.device, rank: int = 8):
    """A function (concat) -> None that runs one forward and backward of the site."""
    outs, n, gelu, keep, contiguous = SITES[name]
    dtype = torch.bfloat16
    arena = Arena([(list(outs), n, [rank] * len(outs), True)], dtype, device)
    site = arena.sites[0]
    arena.matrix(0)[: site.out_features, : site.in_features].normal_(0, 0.02)  # the frozen W; A and B below
    a_s = [torch.randn(rank, n, device=device).mul_(n**-0.5).requires_grad_() for _ in outs]
    b_s = [torch.randn(o, rank, device=device).mul_(0.02).requires_grad_() for o in outs]
    x = torch.randn(rows, n, dtype=dtype, device=device, requires_grad=True)
    up = torch.randn(rows, sum(outs), dtype=dtype, device=device)

    def run(concat: bool) -> None:
        a, b = cast_packed(arena.layout, dtype, [*a_s, *b_s], into=arena)
        y = arena_linear(x, ArenaCast(a, b, ArenaSite.of(arena, 0), concat), 1.0, gelu, keep, contiguous)
        y.backward(up)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, nargs="+", default=[2048])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    for rows in args.rows:
        for name in SITES:
            run = site_step(name, rows, device)
            for concat in (False, True):  # warm-up
                run(concat)
            times = alternate({c: functools.partial(run, c) for c in (False, True)}, args.repeats, device)
            plain, folded = times[False][0], times[True][0]  # medians of the whole step's ms
            print(json.dumps({"site": name, "device": args.device, "rows": rows, "plain_ms": round(plain, 3),
                              "concat_ms": round(folded, 3), "ratio": round(folded / plain, 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
