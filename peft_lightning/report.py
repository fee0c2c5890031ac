"""`peft-report <multirun dir>`: every run's results.json -> report.md, one CSV per table, PNG plots.

A table per study found (main, epochs, lora_rank, prefix_length, prefix_mlp, and each
beyond-the-study experiment that ran), built by `peft_lightning.tables`; multitask_vs_single has a
table of its own (each task trained alone beside trained with the other two, and the change).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from peft_lightning import search
from peft_lightning.comparisons import StudyComparison
from peft_lightning.dashboards import replay_runs
from peft_lightning.figures import plot_epochs, plot_search, plot_study
from peft_lightning.findings import MARGIN, findings
from peft_lightning.floor import FLOOR_DIR, write_floor
from peft_lightning.results import RESULTS, machine_label, strategy_kind
from peft_lightning.runs import Num, load_runs, varying_keys
from peft_lightning.tables import bold_best, epochs_table, multitask_table, protocol, study_table
from peft_lightning.tasks import TASKS

PAPER_STUDIES = ["main", "epochs", "lora_rank", "prefix_length", "prefix_mlp"]
BEYOND = ["lora_scaling", "lora_targets", "multitask_vs_single", "sts_head", "peft_methods", "mtl_methods"]
ORDER = PAPER_STUDIES + BEYOND
TITLES = {
    "main": "Main comparison (dev)",
    "epochs": "Epoch budgets: train and dev (overfitting)",
    "lora_rank": "LoRA rank: train and dev",
    "prefix_length": "Prefix length (dev)",
    "prefix_mlp": "Prefix tuning with and without the MLP reparameterisation (dev)",
    "lora_scaling": "LoRA scaling across ranks (dev)",
    "lora_targets": "LoRA target modules (dev)",
    "multitask_vs_single": "Multi-task vs single-task training (dev)",
    "sts_head": "STS-B head: MLP vs cosine similarity (dev)",
    "peft_methods": "PEFT methods: the study's four strategies, (IA)^3, DoRA, BitFit and bottleneck adapters (dev)",
    "mtl_methods": "Multi-task gradient methods against the summed loss, LoRA and full (dev)",
    "tune_lr": "Learning-rate search per strategy (chosen on the selection split, one seed)",
    "tuned": "Each strategy at its own tuned learning rate (dev)",
    "tune_optuna": "Optuna search trials (selection split, one seed)",
}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A table as CSV with numbers, not the report's text: a column of `runs.Num` cells becomes a
    column per number behind them (`dev avg mean`, `dev avg std`, `dev avg n`; an interval's
    `... value`, `... lo`, `... hi`, `... n`; a count keeps its name), empty where a row has none;
    text columns (settings, status) stay text."""
    columns = []
    for j, name in enumerate(header):
        fields: list[str] = []
        for row in rows:
            for field in getattr(row[j], "values", {}):
                if field not in fields:
                    fields.append(field)
        if not any(isinstance(row[j], Num) for row in rows):
            columns.append((name, lambda row, j=j: str(row[j]).replace("**", "")))
            continue
        if not fields:  # numbers, none of which any row has ("-" everywhere)
            columns.append((name, lambda row: ""))
            continue
        for field in fields:
            label = name if fields == ["value"] else f"{name} {field}"
            columns.append((label, lambda row, j=j, field=field: number(getattr(row[j], "values", {}).get(field))))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([label for label, _ in columns])
        w.writerows([[get(row) for _, get in columns] for row in rows])


def number(value) -> str:
    """A number as a CSV cell: ints as they are, floats to 10 significant digits, nothing as empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value) if isinstance(value, int) else format(value, ".10g")


def tuned_lrs(root: Path) -> list[str]:
    """The lr `peft-tune` chose for each strategy, and the grid's selection score behind it (dev avg
    for searches from before the selection split, or under the study's protocol)."""
    lines = []
    for path in sorted(root.rglob("tuned_lr.json")):
        chosen = json.loads(path.read_text()).get("strategies", {})
        rows = [
            [
                name,
                f"{c['lr']:g}",
                c["sets"],
                f"{c.get('score', c.get('dev_avg')):.4f} ({c.get('on', 'dev')} avg)",
                ", ".join(f"{lr}: {v:.4f}" for lr, v in c["grid"].items()),
            ]
            for name, c in chosen.items()
        ]
        lines += [
            "Tuned learning rates (`peft-tune`):",
            "",
            markdown(["strategy", "lr", "sets", "search score", "grid"], rows),
            "",
        ]
    return lines


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _unit(parts: int) -> str:
    """What a trial's Lightning epoch is, with `tune.epoch_parts` = parts: epochs, half-epochs, ..."""
    return {1: "epochs", 2: "half-epochs", 3: "third-epochs", 4: "quarter-epochs"}.get(parts, f"1/{parts}-epochs")


def search_section(root: Path, out: Path) -> list[str]:
    """peft-tune search=optuna, read from its journal: per strategy the best configuration, the
    trials (complete, pruned, failed), the epochs pruning saved, values at the edge of their range,
    and a figure of the trials' scores with Optuna's parameter importances."""
    folder = next((p.parent.parent for p in sorted(root.rglob(f"{search.STUDY}/journal.log"))), None)
    if folder is None:
        return []
    found = [s for s in (search.summary(folder, name) for name in search.strategies(folder)) if s]
    rows = []
    for s in found:
        best, total = s.get("best"), s.get("epochs_without_pruning", 0)
        saved = total - s.get("epochs_trained", 0)
        rows.append(
            [
                s["strategy"],
                _params(best["params"]) if best else "-",
                f"{best['score']:.4f} (trial {best['trial']})" if best else "-",
                f"{s['trials']} ({s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed)",
                f"{saved} of {total} {_unit(s.get('parts', 1))} ({saved / max(1, total):.0%})" if best else "-",
                "; ".join(s.get("at_edge") or []) or "no",
            ]
        )
    header = ["strategy", "best configuration", "select avg", "trials", "training saved by pruning", "at the edge"]
    parts = max((s.get("parts", 1) for s in found), default=1)
    when = "each epoch" if parts == 1 else f"each {_unit(parts)[:-1]} (`tune.epoch_parts={parts}`)"
    lines = [
        f"Optuna search (`peft-tune search=optuna`: TPE, pruned on the selection split's avg after {when}; "
        "the final runs in `tuned` train with other seeds):",
        "",
        markdown(header, rows),
        "",
    ]
    trials = []
    number = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
    for s in found:
        for t in s[
            "scores"
        ]:  # numbers: a complete trial's score (Optuna gives a pruned one its last), the last reported
            passes = f"{t['epochs'] / s.get('parts', 1):.3g}"  # passes over the training data
            trials.append(
                [s["strategy"], t["trial"], t["state"], number(t["score"] if t["state"] == "complete" else None)]
                + [number(t.get("last")), t["epochs"], passes]
                + [_params(t["params"])]
            )
    header = ["strategy", "trial", "state", "select_avg", "last_reported", "epochs", "passes", "params"]
    write_csv(out / "search_trials.csv", header, trials)
    lines += ["Every trial: `search_trials.csv`.", ""]
    imps = {s["strategy"]: search.importances(folder, s["strategy"]) for s in found}
    if plot_search(out / "search.png", found, imps):
        lines += ["![Optuna search: trials and parameter importances](search.png)", ""]
    return lines


def rows_line(study: str, runs: list[dict]) -> str:
    """ "Dev rows: ..." — the rows every complete run of the study predicted, which its intervals rest on."""
    groups = {(i,): [r] for i, r in enumerate(runs) if r.get("status") == "complete"}
    comp = StudyComparison(groups, n_boot=2) if groups else None
    if comp is None or not comp.tasks:
        return ""
    return "Dev rows the intervals rest on: " + ", ".join(f"{t} {comp.rows(t):,}" for t in comp.tasks) + ". "


def build_report(
    root: str | Path, out: str | Path | None = None, margin: float = MARGIN, floor_data: str | Path | None = None
) -> Path:
    """Write report.md, CSVs and PNGs for the runs under `root`; returns the report's path.

    Args:
        root: a sweep folder (every results.json under it is a run).
        out: where to write (default `root`).
        margin: the equivalence margin of the findings (`report.margin`).
        floor_data: a data folder: fit the bag-of-words floor on it into `root/floor/bow` if not there.
    """
    root = Path(root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    if floor_data is not None and not (root / FLOOR_DIR / RESULTS).is_file():
        write_floor(floor_data, root)
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f"peft-report: no {RESULTS} under {root}")
    floors = [r for r in runs if r.get("study") == "floor" and r.get("status") == "complete"]
    floor = floors[0] if floors else None
    runs = [r for r in runs if r.get("study") != "floor"]
    by_study: dict[str, list[dict]] = {}
    for r in runs:
        by_study.setdefault(r.get("study") or "adhoc", []).append(r)
    studies = [s for s in ORDER if s in by_study] + sorted(s for s in by_study if s not in ORDER)
    models = sorted({(r.get("model") or {}).get("name", "?") for r in runs})
    budgets = sorted({str(((r.get("config") or {}).get("budget") or {}).get("name", "?")) for r in runs})
    seeds = sorted({str(r.get("seed")) for r in runs if r.get("seed") is not None}, key=lambda s: (len(s), s))
    lines = [
        f"# Report: {', '.join(studies) or 'no study'} · budget {', '.join(budgets)} · model {', '.join(models)}",
        "",
        f"{len(runs)} runs under `{root.name}`; {sum(r.get('status') == 'complete' for r in runs)} complete; "
        f"seeds {', '.join(seeds) or '-'}.",
        "",
    ]
    unreadable = [r for r in runs if r.get("unreadable")]
    if unreadable:  # named here; in the tables they are failed rows
        lines += [f"{len(unreadable)} results.json could not be used:", ""]
        lines += [f"- `{r['error']}`" for r in unreadable] + [""]
    lines.append(
        "Scores are each run's chosen epoch (the protocol under each table says on which rows it was "
        "chosen); mean ± std over seeds where several ran; the best value of each column is in bold."
    )
    if "minilm" in models:
        lines.append(
            "The packaged MiniLM saw Quora duplicate pairs in pretraining: its QQP scores are not clean transfer."
        )
    lines += [
        "95% intervals hold both the dev rows and the seeds: the rows' part from a paired bootstrap over "
        "the dev rows every run of a study predicted (1,000 draws, seeded; what the seeds share), the "
        "seeds' part from the spread of the per-seed scores with Student's t on n - 1 degrees of freedom "
        "(`docs/studies.md`, Statistics). Seeds are paired by seed value; n is the number of seeds an "
        "interval rests on. `*` marks a difference whose interval excludes 0.",
        "",
    ]
    if any(s in by_study for s in PAPER_STUDIES):  # a search's or another study's report has no claim to check
        lines += [
            "## Findings of the study, checked",
            "",
            f"Verdicts: reproduced, contradicted, equivalent (within ±{margin:g}: two one-sided tests at "
            "0.05) or unresolved; each claim's comparisons are tested with Holm's adjustment (one-sided at "
            "0.025 for a direction).",
            "",
            markdown(
                ["claim", "study", "verdict", "evidence (difference [95% CI], seeds n)"], findings(by_study, margin)
            ),
            "",
        ]
    if floor is not None:
        fb = floor["best"]
        lines += [
            "Floor: a bag-of-words model (TF-IDF 1-2 grams, logistic regression for SST-5 and QQP, ridge for "
            "STS-B) on the full training sets: dev "
            + ", ".join(f"{t} {TASKS[t].main_metric} {fb['dev'][t][TASKS[t].main_metric]:.4f}" for t in fb["dev"])
            + f", dev avg {fb['dev_avg']:.4f}. Each table's `Δ dev avg vs floor` column is a row's dev avg "
            "against it, and the main and tuned tables set each task's main metric against it too "
            "(the floor has no seed: its interval is the rows').",
            "",
        ]
    for study in studies:
        srun = by_study[study]
        lines += [f"## {TITLES.get(study, study)}", ""]
        if study == "epochs":
            header, rows = epochs_table(srun)
        elif study == "multitask_vs_single":
            header, rows = multitask_table(srun)
        else:
            header, rows, numbers = study_table(study, srun, floor)
        shown = (
            bold_best(header, rows, numbers, len(varying_keys(srun)))
            if study not in ("epochs", "multitask_vs_single")
            else rows
        )
        lines += [
            markdown(header, shown),
            "",
            f"Protocol: {protocol(srun)}. {rows_line(study, srun)}CSV: `{study}.csv`",
            "",
        ]
        if study == "tuned":
            lines += tuned_lrs(root)
        if study == "tune_optuna":
            lines += search_section(root, out)
        write_csv(out / f"{study}.csv", header, rows)
        if study == "epochs":
            if plot_epochs(out / "epochs.png", srun, TITLES["epochs"]):
                lines += ["![train and dev avg per epoch](epochs.png)", ""]
        elif study != "multitask_vs_single" and plot_study(
            out / f"{study}.png", study, srun, TITLES.get(study, study), floor
        ):
            lines += [f"![{TITLES.get(study, study)}]({study}.png)", ""]
    lines += cost_section(runs, out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


COST_PARTS = ("startup", "features", "train", "validation", "predict")


def cost_section(runs: list[dict], out: Path) -> list[str]:
    """Where the time went, per strategy (with its multi-task aggregator, `results.strategy_kind`),
    epochs and machine (`results.machine`: times hold for one machine): each complete run trained
    once (a shared copy is counted in its source), the median wall time with the lowest and highest
    (a run that shared the machine with other work shows as the highest, without moving the
    median), the median step, and the share of each part (`results.Clock`) over the group's runs."""
    trained = [r for r in runs if r.get("status") == "complete" and not r.get("shared_from") and r.get("wall_time_s")]
    if not trained:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in trained:
        name = strategy_kind((r.get("adapter") or {}).get("name", "?"), r.get("mtl"))
        key = (name, r.get("epochs") or 0, machine_label(r))
        groups.setdefault(key, []).append(r)
    header = ["strategy", "epochs", "machine", "runs", "wall s (median) [lowest, highest]", "step ms (median)"]
    header += [*(f"{p} %" for p in COST_PARTS), "other %"]
    rows = []
    for (name, epochs, where), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        wall = sum(r["wall_time_s"] for r in rs)
        steps = [r["step_time_ms"] for r in rs if isinstance(r.get("step_time_ms"), (int, float))]
        cells = [name, Num(str(epochs or "-"), value=epochs or None), where, Num(str(len(rs)), value=len(rs))]
        walls = [r["wall_time_s"] for r in rs]
        mid, low, high = statistics.median(walls), min(walls), max(walls)
        cells.append(Num(f"{mid:.1f} [{low:.0f}, {high:.0f}]", median=mid, lowest=low, highest=high))
        cells.append(Num(f"{statistics.median(steps):.0f}", value=statistics.median(steps)) if steps else Num("-"))
        timed = [r for r in rs if r.get("timing")]
        if timed:
            total = sum(r["wall_time_s"] for r in timed)
            shares = [sum(r["timing"].get(p, 0.0) for r in timed) / total for p in COST_PARTS]
            shares.append(1 - sum(shares))
            cells += [Num(f"{100 * s:.0f}", value=100 * s) for s in shares]
        else:  # results.json of an older version: training time only
            train = sum(r.get("train_time_s") or 0 for r in rs) / wall
            dash = Num("-", value=None)
            cells += [dash, dash, Num(f"{100 * train:.0f}", value=100 * train), dash, dash]
            cells += [Num(f"{100 * (1 - train):.0f}", value=100 * (1 - train))]
        rows.append(cells)
    shared = sum(1 for r in runs if r.get("shared_from"))
    write_csv(out / "cost.csv", header, rows)
    machines = {key[2] for key in groups}
    return [
        "## Where the time went",
        "",
        markdown(header, rows),
        "",
        f"Each run trained once: {len(trained)} trained"
        + (f", {shared} more taken from another study's run with the same training config" if shared else "")
        + ". Other: checkpoints, results and predictions files, and what no part covers. "
        + (f"The runs trained on {len(machines)} machines: compare times within one. " if len(machines) > 1 else "")
        + "CSV: `cost.csv`",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peft-report", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a multirun folder (searched recursively for results.json)")
    parser.add_argument("--out", help="where to write report.md, CSVs and PNGs (default: the root)")
    parser.add_argument(
        "--margin", type=float, default=MARGIN, help="equivalence margin of the findings (default 0.01)"
    )
    parser.add_argument(
        "--floor-data", help="a data folder: fit the bag-of-words floor row on it (once, into ROOT/floor/bow)"
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log every complete run without a wandb run to one (from results.json; no training; "
        "offline without credentials: then `wandb sync ROOT/**/wandb/offline-run-*`)",
    )
    parser.add_argument("--wandb-project", help="the wandb project for --wandb (default: conf/logger/wandb.yaml's)")
    args = parser.parse_args(argv)
    if not args.margin > 0:
        parser.error(f"--margin must be a number > 0, got {args.margin}")
    if args.wandb:
        logged = replay_runs(load_runs(Path(args.root)), args.wandb_project)
        print(f"wandb: {len(logged)} runs logged (runs that have a wandb run already are left as they are)")
    print(build_report(args.root, args.out, args.margin, args.floor_data))


if __name__ == "__main__":
    main()
