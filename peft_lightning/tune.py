"""`peft-tune budget=quick data.dir=<folder>`: a fair comparison, each strategy at its own best lr.

1. The search (`experiment=tune_lr`): every strategy of `tune.strategies` at every lr of
   `tune.grid`, with the budget's first seed, scored by dev avg. `optim.tuned_lr` is the lr of the
   strategy's own parameters (full fine-tuning: the encoder's; frozen: the heads'; LoRA, prefix,
   (IA)^3, DoRA: the adapter's); the others keep the config's.
2. The final runs (`experiment=tuned`): each strategy at its best lr over `budget.seeds`, with
   test predictions.
3. `<sweep root>/tuned/tuned_lr.json` (each strategy's grid scores and chosen lr) and the report over
   the sweep root, whose `tuned` table compares the strategies at their own lrs (against full).

Like `peft-reproduce`, complete jobs are skipped, so the same command resumes. `budget=paper`
keeps the study's single lr in its own studies; this is an addition, not a replacement.

    peft-tune budget=quick data.dir=/path/to/data
    peft-tune budget=quick 'tune.grid=[1e-4,1e-3]' 'tune.strategies=[lora,full]' hydra/launcher=gpus
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from peft_lightning.config import ConfigError, check_budget, compose
from peft_lightning.interrupt import forward, run_command
from peft_lightning.optim import TUNED_ROLE
from peft_lightning.plan import Costs, Progress, fmt_s, plan_options, print_plan, sweep_dir, tuned_jobs
from peft_lightning.reproduce import report_and_exit
from peft_lightning.results import selection_score
from peft_lightning.runs import load_runs


def parse(argv: list[str]) -> tuple[str, list[str]]:
    budget, rest = "quick", []
    for arg in argv:
        if arg.startswith("budget="):
            budget = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return budget, rest


def composed(budget: str, overrides: list[str]):
    return compose([f"budget={budget}", *overrides])


def choose(runs: list[dict], strategies: list[str]) -> dict[str, dict]:
    """Per strategy, the grid's selection score by lr and the lr with the highest (complete runs only).

    The score is each run's chosen epoch's avg on its selection split, held out of training, so the
    chosen lr never reads the dev rows the report scores; runs under the study's protocol
    (`data.select_on=dev`) have only dev, and `on` says so."""
    chosen = {}
    for name in strategies:
        scores: dict[float, float] = {}
        ons = set()
        for r in runs:
            lr = ((r.get("config") or {}).get("optim") or {}).get("tuned_lr")
            if (r.get("adapter") or {}).get("name") == name and r.get("status") == "complete" and r.get("best"):
                if lr is not None and selection_score(r["best"]) is not None:
                    scores[float(lr)] = selection_score(r["best"])
                    ons.add("select" if "select" in r["best"] else "dev")
        if scores:
            best = max(scores, key=scores.get)
            chosen[name] = {
                "lr": best,
                "sets": f"optim.{TUNED_ROLE.get(name, 'adapter_lr')}",
                "score": scores[best],
                "on": "/".join(sorted(ons)),
                "grid": {f"{lr:g}": v for lr, v in sorted(scores.items())},
            }
    return chosen


def train_cmd(experiment: str, budget: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "peft_lightning.train", "-m", f"experiment={experiment}", f"budget={budget}", *args]


def main(argv: list[str] | None = None) -> None:
    """The command; SIGTERM / SIGINT are passed on to the running sweep (see `peft-reproduce`)."""
    run_command("peft-tune", _main, argv, usage_errors=(ConfigError,))


def _main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    plan_only, sources, argv = plan_options(argv)
    budget, rest = parse(argv)
    check_budget(budget, "peft-tune")
    cfg = composed(budget, rest)
    strategies, seeds = list(cfg.tune.strategies), list(cfg.budget.seeds)
    progress = None
    if plan_only is not False:  # peft-reproduce passes plan=false: it shows the plan and the progress
        costs = Costs([Path(str(cfg.sweep_root)), *sources])
        jobs, note = tuned_jobs(budget, rest)
        print_plan(jobs, costs, [note])
        if plan_only:
            return
        progress = Progress(jobs).__enter__()
    t0 = time.time()
    search = sweep_dir("tune_lr", budget, rest)
    print(
        f"== search: {len(strategies)} strategies x {len(cfg.tune.grid)} lrs, seed {seeds[0]} -> {search}", flush=True
    )
    forward(train_cmd("tune_lr", budget, f"seed={seeds[0]}", *rest))
    chosen = choose(load_runs(search) if search.is_dir() else [], strategies)
    missing = [s for s in strategies if s not in chosen]
    final = sweep_dir("tuned", budget, rest)
    for name, pick in chosen.items():
        print(
            f"== {name}: lr {pick['lr']:g} ({pick['sets']}), {pick['on']} avg {pick['score']:.4f}; seeds {seeds}",
            flush=True,
        )
        forward(train_cmd("tuned", budget, f"adapter={name}", f"optim.tuned_lr={pick['lr']:g}", *rest))
    final.mkdir(parents=True, exist_ok=True)
    (final / "tuned_lr.json").write_text(
        json.dumps({"budget": budget, "seeds": seeds, "strategies": chosen}, indent=2) + "\n"
    )
    if progress is not None:
        progress.__exit__(None, None, None)
        print(f"{progress.tally()} in {fmt_s(time.time() - t0)}", flush=True)
    root = Path(os.path.commonpath([str(search.resolve()), str(final.resolve())]))
    report_and_exit(root, t0, missing, "strategies without a complete search run", budget, rest)


if __name__ == "__main__":
    main()
