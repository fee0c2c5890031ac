"""`python -m peft_lightning.cost_bench --data DIR`: what a run costs, at a base commit and at this tree.

Runs the `budget=cpu` main study's four strategies, one seed each, with the code of `--base`
(checked out into a temporary git worktree) and with this working tree, one after the other in
this one invocation on this machine, and prints per strategy the wall time of the run's process,
the share of it spent outside training, and the ratio of the two wall times. The frozen strategy
runs twice at this tree: with an empty feature cache (the first run of a study) and with the
cache the first filled (every later frozen run of the same rows). A benchmark, not a test.

    python -m peft_lightning.cost_bench --data /path/to/data --base d1aacba --out cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = ["frozen", "lora", "prefix", "full"]


def run(code: Path, adapter: str, data: Path, out: Path, cache: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "peft_lightning.train",
        "budget=cpu",
        f"adapter={adapter}",
        "seed=1",
        f"data.dir={data}",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={out}",
        "logger=none",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    train = res["train_time_s"]
    return {"process_s": round(wall, 1), "train_s": train, "outside_share": round(1 - train / wall, 3), "res": res}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cost_bench", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--base", default="d1aacba", help="the commit to compare against")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--out", type=Path, help="a JSONL file for the rows")
    p.add_argument(
        "--base-rows",
        type=Path,
        help="the base's rows from an earlier invocation's --out or log (its runs are not redone)",
    )
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    data = args.data.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(base), args.base], check=True)
        try:
            # token caches warmed beforehand: both sides start from tokenised data
            if args.base_rows:
                for line in args.base_rows.read_text().splitlines():
                    if line.startswith("{") and json.loads(line)["code"] == args.base:
                        rows.append(json.loads(line))
            done = {r["strategy"] for r in rows}
            cases = [(args.base, base, s, tmp / "cache-base", []) for s in args.strategies if s not in done]
            head = subprocess.run(
                ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            )
            mine = head.stdout.strip() + ("+" if _dirty(here) else "")
            for s in args.strategies:
                cases.append((mine, here, s, tmp / "cache-mine", []))
                if s == "frozen":  # again, from the feature cache the first run filled
                    cases.append((mine + " (cached)", here, s, tmp / "cache-mine", ["force=true"]))
            for label, code, strategy, cache, extra in cases:
                out = tmp / "runs" / "".join(c if c.isalnum() else "_" for c in label) / strategy
                r = run(code, strategy, data, out, cache, extra)
                row = {"code": label, "strategy": strategy, **{k: v for k, v in r.items() if k != "res"}}
                row["dev_avg"] = round(r["res"]["best"].get("dev_avg") or float("nan"), 4)
                row["timing"] = r["res"].get("timing")
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(base)], check=False)
    base_wall = {r["strategy"]: r["process_s"] for r in rows if r["code"] == args.base}
    print(f"\n| code | strategy | process s | outside training | vs {args.base} | dev avg |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = base_wall[r["strategy"]] / r["process_s"]
        print(
            f"| {r['code']} | {r['strategy']} | {r['process_s']:.1f} | {100 * r['outside_share']:.0f}% "
            f"| {ratio:.2f}x faster | {r['dev_avg']} |"
        )
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _dirty(repo: Path) -> bool:
    out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
    return bool(out.stdout.strip())


if __name__ == "__main__":
    main()
