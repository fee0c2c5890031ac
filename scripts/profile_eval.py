#!/usr/bin/env python
"""Where a bf16 evaluation pass goes on this CPU: `python scripts/profile_eval.py DATA_DIR [adapter]`.

The predict path of a bf16-mixed run (`budget=cpu`): the MiniLM encoder with the adapter attached,
frozen weights kept in bf16 (`store_frozen_in`), LoRA's A and B in the arena (`model.encode` enters
`compute_dtype_weights`), bf16 autocast, inference mode, length-sorted batches of 64 of the first
2,048 QQP dev sentences. Prints the pass's time three times, then torch.profiler's op table.
"""

import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.profiler import profile

from peft_lightning.build import build_adapter, build_backbone, build_model
from peft_lightning.fastpath.precision import store_frozen_in

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
data, adapter = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "lora"
torch.manual_seed(0)
with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
    cfg = compose("train", overrides=["model=minilm", f"adapter={adapter}", f"data.dir={data}"])
backbone = build_backbone(cfg)
model = build_model(cfg, backbone, build_adapter(cfg.adapter), ["sst5", "qqp", "stsb"]).eval()
store_frozen_in(model.encoder, torch.bfloat16)
model.adapter.merge()  # a no-op on bf16 weights: the update would round away (adapters.base)
rows = [line.rstrip("\n").split("\t") for line in open(Path(data) / "qqp" / "dev.tsv")][1:]
ids = [backbone.tokenizer(s, truncation=True, max_length=64)["input_ids"] for r in rows[:1024] for s in r[1:3]]
order = sorted(range(len(ids)), key=lambda i: len(ids[i]))


def batches(size: int = 64):
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        width = max(len(ids[i]) for i in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
        yield {"input_ids": x, "attention_mask": (x != 0).long(), "token_type_ids": torch.zeros_like(x)}


def one_pass() -> float:
    t = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for p in batches():
            model.encode([p])
    return time.perf_counter() - t


one_pass()
print(f"{len(ids)} sentences ({sum(map(len, ids)) / len(ids):.1f} tokens on average), {adapter}:",
      ", ".join(f"{one_pass():.2f}" for _ in range(3)), "s a pass", flush=True)  # fmt: skip
with profile() as prof:
    one_pass()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
