"""`peft-tune budget=quick data.dir=<folder>`: a fair comparison, each strategy at its own best configuration.

`search=grid` (the default):
1. The search (`experiment=tune_lr`): every strategy of `tune.strategies` at every lr of its grid
   (`tune.grids.<strategy>`, else `tune.grid`), with the budget's first seed, scored by the
   selection split's avg. `optim.tuned_lr` is the lr of the strategy's own parameters (full
   fine-tuning: the encoder's; frozen: the heads'; LoRA, prefix, (IA)^3, DoRA: the adapter's); the
   others keep the config's. A search run at the lr and seed of a complete study run is taken from
   it (`sharing`).
2. The final runs (`experiment=tuned`): each strategy at its best lr over `budget.seeds`, with
   test predictions.
3. `<sweep root>/tuned/tuned_lr.json` (each strategy's grid scores and chosen lr) and the report over
   the sweep root, whose `tuned` table compares the strategies at their own lrs (against full).

`search=optuna` (`search.py`): per strategy, `tune.trials` trials of Optuna's TPE over the
strategy's search space (`conf/tune/<strategy>.yaml`), losing trials pruned after an epoch, in an
Optuna journal that the same command resumes; then the best complete trial's configuration over
`budget.seeds` (`tuned`), `tuned/tuned_optuna.json` and the report with its search section.

Like `peft-reproduce`, complete jobs are skipped, so the same command resumes. `budget=paper`
keeps the study's single lr in its own studies; this is an addition, not a replacement.

    peft-tune budget=quick data.dir=/path/to/data
    peft-tune budget=quick 'tune.grid=[1e-4,1e-3]' 'tune.strategies=[lora,full]' hydra/launcher=gpus
    peft-tune budget=cpu 'tune.grids={full:[1e-5,3e-5,1e-4]}'   # full's own grid, the others tune.grid
    peft-tune budget=cpu search=optuna 'tune.strategies=[lora,full]' tune.trials=8
    peft-tune budget=paper search=optuna tune.workers=8 hydra/launcher=gpus tune.space.lora.rank.use=true
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from peft_lightning import search
from peft_lightning.config import ConfigError, check_budget, compose
from peft_lightning.interrupt import forward, run_command
from peft_lightning.optim import TUNED_ROLE
from peft_lightning.plan import (
    Costs,
    Progress,
    fmt_s,
    plan_options,
    print_plan,
    search_args,
    search_grids,
    sweep_dir,
    tuned_jobs,
)
from peft_lightning.reproduce import report_and_exit
from peft_lightning.results import selection_score, strategy_kind
from peft_lightning.runs import load_runs


def parse(argv: list[str]) -> tuple[str, list[str]]:
    """(budget, the other overrides); `search=X` is short for `tune.search=X`."""
    budget, rest = "quick", []
    for arg in argv:
        if arg.startswith("budget="):
            budget = arg.split("=", 1)[1]
        elif arg.startswith("search="):
            rest.append(f"tune.{arg}")
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
    if cfg.tune.search == "optuna":
        return optuna_main(cfg, budget, rest, plan_only)
    if cfg.tune.search != "grid":
        raise ConfigError(f"tune.search={cfg.tune.search!r} is unknown; expected grid or optuna")
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
    grids = search_grids(cfg)
    for name, grid in grids.items():
        print(
            f"== search: {name} at {len(grid)} lrs ({', '.join(f'{lr:g}' for lr in grid)}), seed {seeds[0]} -> {search}",
            flush=True,
        )
        forward(train_cmd("tune_lr", budget, *search_args(name, grid, seeds[0], rest)))
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


def optuna_main(cfg, budget: str, rest: list[str], plan_only: bool | None) -> None:
    """`peft-tune search=optuna` (search.py): each strategy's Optuna study, then its best complete
    trial's configuration over the budget's seeds, and the report."""
    strategies, seeds = [str(s) for s in cfg.tune.strategies], list(cfg.budget.seeds)
    trials, workers = int(cfg.tune.trials), int(cfg.tune.workers)
    for name in strategies:  # the spaces and the pruner checked before anything runs
        search.distributions(search.axes(cfg, name))
    search.pruner(str(cfg.tune.pruner), cfg.tune.get("pruner_startup", 2))
    if trials < 1 or workers < 1:
        raise ConfigError(f"tune.trials={trials}, tune.workers={workers}: expected whole numbers >= 1")
    if search.search_seed(cfg) in [int(s) for s in seeds]:
        raise ConfigError(
            f"tune.search_seed={search.search_seed(cfg)} is one of budget.seeds {seeds}: the final runs' seeds must not be the search's"
        )
    root = Path(str(cfg.sweep_root))
    costs = Costs([root])
    epochs = int(cfg.trainer.max_epochs)
    priced = {n: costs.price(n, strategy_kind(n, cfg.get("mtl")), epochs) for n in strategies}
    per_run = {n: s for n, s in priced.items() if s is not None}
    print(
        f"plan: optuna, {len(strategies)} strategies x {trials} trials (seed {search.search_seed(cfg)}, "
        f"pruner {cfg.tune.pruner}, {workers} worker(s)) -> {root / search.STUDY}, then each best over seeds {seeds}; "
        + (
            f"at most {fmt_s(sum(per_run.values()) * (trials + len(seeds)) / workers)} without pruning"
            if len(per_run) == len(strategies)
            else "no measured runs to estimate from"
        ),
        flush=True,
    )
    if plan_only:
        return
    t0 = time.time()
    storage = search.journal(root)
    for name in strategies:
        search.recover(search.open_study(storage, name, cfg.tune))
    kept = [a for a in rest if a.partition("=")[0] not in ("tune.search", "tune.worker")]
    workers_dir = root / search.STUDY / ".workers"
    if workers == 1:  # one peft-train process runs the trials in turn
        forward(
            train_cmd_worker(budget, "tune.worker=0", f"hydra.run.dir={search.quoted(str(workers_dir / '0'))}", *kept)
        )
    else:  # the workers are the jobs of a Hydra sweep on the launcher given (hydra/launcher=gpus, slurm, ray)
        ids = ",".join(str(w) for w in range(workers))
        sweep = [f"hydra.sweep.dir={search.quoted(str(workers_dir))}", "hydra.sweep.subdir=${tune.worker}"]
        forward(train_cmd_worker(budget, "-m", f"tune.worker={ids}", *sweep, *kept))
    final = sweep_dir("tuned", budget, rest)
    chosen, missing = {}, []
    for name in strategies:
        found = search.summary(root, name)
        if not found or not found.get("best"):
            missing.append(name)
            continue
        chosen[name] = found
        edge = f"; AT THE EDGE of its range: {', '.join(found['at_edge'])}" if found["at_edge"] else ""
        print(
            f"== {name}: trial {found['best']['trial']} ({' '.join(found['overrides'])}), select avg "
            f"{found['best']['score']:.4f}; {found['complete']} complete, {found['pruned']} pruned, {found['failed']} failed of {found['trials']} trials{edge}; seeds {seeds}",
            flush=True,
        )
        untuned = [a for a in rest if not a.lstrip("+~").startswith("tune.")]  # search settings name no final run
        if cfg.tune.final:
            forward(train_cmd("tuned", budget, f"adapter={name}", *found["overrides"], *untuned))
    final.mkdir(parents=True, exist_ok=True)
    (final / "tuned_optuna.json").write_text(
        json.dumps({"budget": budget, "seeds": seeds, "search": "optuna", "strategies": chosen}, indent=2, default=str)
        + "\n"
    )
    root_all = Path(os.path.commonpath([str(root.resolve()), str(final.resolve())]))
    report_and_exit(root_all, t0, missing, "strategies without a complete trial", budget, rest)


def train_cmd_worker(budget: str, *args: str) -> list[str]:
    """peft-train as the search's worker (search.worker_job): the trials run in that process."""
    flags = [a for a in args if a == "-m"]  # Hydra's -m before the overrides
    rest = [a for a in args if a != "-m"]
    base = [sys.executable, "-m", "peft_lightning.train", *flags]
    return [*base, f"budget={budget}", f"study={search.STUDY}", "tune.search=optuna", *rest]


if __name__ == "__main__":
    main()
