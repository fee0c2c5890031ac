"""`peft-reproduce budget=quick data.dir=<folder>`: every study of a budget as Hydra sweeps, then the report.

Each study is one `peft-train -m experiment=<study>` process (a crash in one study does not stop
the next); jobs whose results.json is complete are skipped, so rerunning the same command resumes
where it stopped. Other `key=value` arguments are passed to every sweep (for example
`hydra/launcher=gpus hydra.launcher.n_jobs=8` or `budget.seeds=[1,2,3]`).

    peft-reproduce budget=quick data.dir=/path/to/data
    peft-reproduce budget=paper studies=[main,lora_rank] hydra/launcher=slurm
    peft-reproduce budget=cpu 'studies=[main,tuned]' data.dir=/path/to/data   # tuned: peft-tune's fair comparison
    peft-reproduce budget=cpu 'studies=[paper]' plan=true   # the jobs and an estimate; nothing runs

`plan=true` (or `--dry-run`) lists every job (complete, shared with another study's run, resume,
to run) and estimates the wall time from the measured runs of each strategy under the sweep root
(`plan_from=<folder>` reads them from elsewhere, e.g. a committed report's runs). While the
sweeps run, a line per finished job says k of N, the time elapsed and the ETA.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from peft_lightning.config import ConfigError, check_budget, compose, conf_dir
from peft_lightning.interrupt import forward, run_command
from peft_lightning.plan import (
    Costs,
    Progress,
    fmt_s,
    plan_options,
    print_plan,
    share_within,
    study_jobs,
    sweep_dir,
    tuned_jobs,
)
from peft_lightning.report import BEYOND, PAPER_STUDIES, build_report


def parse(argv: list[str]) -> tuple[str, list[str], list[str]]:
    budget, studies, rest = "quick", list(PAPER_STUDIES), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "budget":
            budget = value
        elif key == "studies":
            names = [s.strip() for s in value.strip("[]").split(",") if s.strip()]
            studies = [
                s
                for n in names
                for s in ({"paper": PAPER_STUDIES, "beyond": BEYOND, "all": PAPER_STUDIES + BEYOND}.get(n, [n]))
            ]
        else:
            rest.append(arg)
    check_budget(budget, "peft-reproduce")
    unknown = [s for s in studies if s not in PAPER_STUDIES + BEYOND + ["tuned"]]
    if unknown:
        raise SystemExit(f"peft-reproduce: unknown studies {unknown}; known: {PAPER_STUDIES + BEYOND}")
    return budget, studies, rest


def main(argv: list[str] | None = None) -> None:
    """The command; SIGTERM / SIGINT are passed on to the running sweep, which records its job as
    interrupted, and end this command with 143 / 130 (the same command resumes)."""
    run_command("peft-reproduce", _main, argv, usage_errors=(ConfigError,))


def _main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(help_lists())
        return
    plan_only, sources, argv = plan_options(argv)
    budget, studies, rest = parse(argv)
    dirs = [sweep_dir(study, budget, rest) for study in studies]  # (tuned: its final runs' folder)
    report_root = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    if len(dirs) == 1:
        report_root = dirs[0].resolve().parent if dirs[0].name == studies[0] else dirs[0].resolve()
    root = Path(str(compose([f"budget={budget}", *rest]).sweep_root))
    costs = Costs([root, *sources])
    jobs, notes = [], []
    for study in studies:
        if study == "tuned":  # its final jobs depend on the search: priced from the search's
            tune_jobs, note = tuned_jobs(budget, rest)
            jobs += tune_jobs
            notes.append(note)
        else:
            jobs += study_jobs(study, budget, rest)
    share_within(jobs)
    print_plan(jobs, costs, notes)
    if plan_only:
        return
    if not sources and not costs.costs:
        print("  (no measured run yet: plan_from=<folder of runs> prices the jobs)", flush=True)
    t0 = time.time()
    failed = []
    with Progress(jobs) as progress:
        for study in studies:
            if study == "tuned":  # peft-tune: the lr search per strategy, then its seeds
                cmd = [sys.executable, "-m", "peft_lightning.tune", f"budget={budget}", "plan=false", *rest]
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "peft_lightning.train",
                    "-m",
                    f"experiment={study}",
                    f"budget={budget}",
                    *rest,
                ]
            print(f"== {study}: {' '.join(cmd[2:])}", flush=True)
            if forward(cmd) != 0:
                failed.append(study)
    print(f"{progress.tally()} in {fmt_s(time.time() - t0)}", flush=True)
    report_and_exit(report_root, t0, failed, "studies with a job that did not complete", budget, rest)


def help_lists() -> str:
    """The studies and budgets there are, and the defaults (for --help)."""
    budgets = sorted(p.stem for p in (Path(conf_dir()) / "budget").glob("*.yaml"))
    return (
        f"Studies (studies=[...]; default: the paper's five): {', '.join(PAPER_STUDIES)}\n"
        f"  beyond the paper (studies=[beyond]): {', '.join(BEYOND)}; tuned: peft-tune's fair comparison;\n"
        "  studies=[all]: both\n"
        f"Budgets (budget=; default quick): {', '.join(budgets)}"
    )


def report_and_exit(root: Path, t0: float, failed: list[str], what: str, budget: str, overrides: list[str]) -> None:
    """The report over `root` (into `root/report`, with the bag-of-words floor fitted on the runs'
    data and `report.margin`), its path and the time taken; exit 1 if any failed."""
    cfg = compose([f"budget={budget}", *overrides])
    data = Path(str(cfg.data.dir)).expanduser()
    report = build_report(root, root / "report", float(cfg.report.margin), data if data.is_dir() else None)
    print(f"report: {report} ({time.time() - t0:.0f} s)")
    if failed:
        print(f"{what}: {failed}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
