"""`peft-reproduce budget=quick data.dir=<folder>`: every study of a budget as Hydra sweeps, then the report.

Each study is one `peft-train -m experiment=<study>` process (a crash in one study does not stop
the next); jobs whose results.json is complete are skipped, so rerunning the same command resumes
where it stopped. Other `key=value` arguments are passed to every sweep (for example
`hydra/launcher=gpus hydra.launcher.n_jobs=8` or `budget.seeds=[1,2,3]`).

    peft-reproduce budget=quick data.dir=/path/to/data
    peft-reproduce budget=paper studies=[main,lora_rank] hydra/launcher=slurm
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

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
    unknown = [s for s in studies if s not in PAPER_STUDIES + BEYOND]
    if unknown:
        raise SystemExit(f"peft-reproduce: unknown studies {unknown}; known: {PAPER_STUDIES + BEYOND}")
    return budget, studies, rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    budget, studies, rest = parse(argv)
    sweep_root = next((a.split("=", 1)[1] for a in rest if a.startswith("sweep_root=")), f"multirun/{budget}")
    rest = [a for a in rest if not a.startswith("sweep_root=")]
    t0 = time.time()
    failed = []
    for study in studies:
        cmd = [
            sys.executable,
            "-m",
            "peft_lightning.train",
            "-m",
            f"experiment={study}",
            f"budget={budget}",
            f"sweep_root={sweep_root}",
            *rest,
        ]
        print(f"== {study}: {' '.join(cmd[2:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(study)
    report = build_report(sweep_root, Path(sweep_root) / "report")
    print(f"report: {report} ({time.time() - t0:.0f} s)")
    if failed:
        print(f"studies whose sweep process failed: {failed}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
