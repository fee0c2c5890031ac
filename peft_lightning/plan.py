"""A plan before a long command, and progress while it runs: `peft-reproduce` and `peft-tune`.

`study_jobs` lists the jobs Hydra's basic sweeper will launch for `peft-train -m experiment=<study>`
(the experiment's `hydra.sweeper.params` and the command line's own sweeps, expanded by Hydra's
`BasicSweeper.split_arguments`), each with its run folder and state: complete, shared (a complete
run elsewhere under the sweep root has its training config: `sharing.py`), resume (a last.ckpt to
go on from), failed, or to run. `estimate` prices a job from the measured runs of its strategy, of
its adapter settings where this machine measured them (`Costs`: the per-epoch training and
validation time, start-up and prediction in their results.json), scaled to its epochs. `Progress`
watches the planned folders while the sweeps run and prints one line per finished job: k of N,
elapsed, ETA.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # how Hydra's own sweeper expands jobs
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import OmegaConf

from peft_lightning.config import ConfigError, compose
from peft_lightning.results import machine, machine_label, strategy_kind
from peft_lightning.sharing import complete_runs, covers, find_shared


@dataclass
class Job:
    study: str
    overrides: list[str]
    run_dir: Path
    adapter: str
    epochs: int
    state: str = "to run"  # complete | shared | resume | failed | to run
    estimate_s: float | None = None
    source: Path | None = None  # the run a shared job is taken from
    config: dict = field(default_factory=dict, repr=False)
    pattern: str | None = None  # a job whose folder is known only once it runs (peft-tune's final runs): a regex

    def folders(self) -> list[Path]:
        if self.pattern is None:
            return [self.run_dir]
        parent = self.run_dir.parent
        return sorted(p for p in parent.iterdir() if re.fullmatch(self.pattern, p.name)) if parent.is_dir() else []

    @property
    def name(self) -> str:
        return f"{self.study}/{self.run_dir.name}"

    @property
    def kind(self) -> str:
        """What prices the job: its strategy, and its multi-task aggregator when it has one."""
        return strategy_kind(self.adapter, self.config.get("mtl"))


def job_overrides(study: str, budget: str, rest: list[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper makes them from the experiment's sweep
    params and the command line."""
    cfg = compose([f"experiment={study}", f"budget={budget}", *rest], hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + [f"experiment={study}", f"budget={budget}", *rest]
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def resolved(cfg) -> dict:
    """A composed job config as a plain dict, without what only a running Hydra job resolves."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("output_dir", "overrides", "hydra")])
    return OmegaConf.to_container(cfg, resolve=True)


def study_jobs(study: str, budget: str, rest: list[str], shared_root: Path | None = None, runs=None) -> list[Job]:
    """The jobs of one study's sweep, in launch order, with their states."""
    jobs = []
    for overrides in job_overrides(study, budget, rest):
        cfg = compose(overrides, hydra_config=True)
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        config = resolved(cfg)
        job = Job(study, overrides, run_dir, adapter_name(cfg), int(cfg.trainer.max_epochs), config=config)
        job.state = run_state(run_dir)
        if job.state == "to run" and not cfg.get("force"):
            root = shared_root or Path(str(cfg.sweep_root))
            found = find_shared(config, run_dir, root, runs)
            if found is not None:
                job.state, job.source = "shared", found[0]
        jobs.append(job)
    return jobs


def share_within(jobs: list[Job]) -> list[Job]:
    """A job to run whose training config an earlier job of the plan has: shared from that job's
    folder once it is complete (the sweeps run one study after another)."""
    earlier: list[Job] = []
    for job in jobs:
        if not job.config:
            continue
        source = next((e for e in earlier if covers(e.config, job.config)), None)
        if source is not None and job.state == "to run":
            job.state, job.source = "shared", source.run_dir
        earlier.append(job)
    return jobs


def adapter_name(cfg) -> str:
    try:
        return get_class(cfg.adapter._target_).name
    except Exception:  # a plan must not fail on an adapter it cannot import
        return str(cfg.adapter.get("_target_", "?")).rsplit(".", 1)[-1].lower()


def run_state(run_dir: Path) -> str:
    try:
        res = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        res = {}
    status = res.get("status")
    if status == "complete":
        return "complete"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "resume"
    return "failed" if status == "failed" else "to run"


@dataclass
class Cost:
    """Measured seconds of one strategy's runs: per epoch (training and validation), and once a run."""

    per_epoch: float
    once: float
    runs: int
    this_machine: bool = True  # measured on the machine that plans (else on others: a rougher price)


class Costs:
    """Per strategy, the median measured cost of the complete runs under some folders: of those that
    trained on this machine (`results.machine_label`) where there are any, else of all of them. A
    2-core VM may land on another CPU from one sitting to the next, and one CPU's runs took 25-35%
    longer than the other's: a median over both priced the later sitting's jobs too low.

    A job whose adapter settings (its `adapter:` config: LoRA's rank, a prefix's length) were
    measured on this machine is priced by those runs alone: a LoRA r=64 run cost 1.3x an r=2 one here,
    and a strategy's median priced every rank of `lora_rank` the same. A run's epochs are passes
    over the training data: an Optuna trial's parts (`data.epoch_parts`) are fractions of one.

    Args:
        roots: folders searched for complete runs.
        here: the machine's label (default: this process's, `results.machine`).
    """

    def __init__(self, roots: list[Path], here: str | None = None):
        here = machine_label({"machine": machine()}) if here is None else here
        samples: dict[tuple[str, str | None], dict[bool, list[tuple[float, float]]]] = {}
        for root in roots:
            for _, res in complete_runs(root):
                config = res.get("config") or {}
                parts = (config.get("data") or {}).get("epoch_parts") or 1
                epochs = (len(res.get("history") or []) or 1) / parts
                wall = res.get("wall_time_s")
                name = (res.get("adapter") or {}).get("name")
                if not wall or not name:
                    continue
                name = strategy_kind(name, res.get("mtl"))
                timing = res.get("timing") or {}
                if timing:
                    per_epoch = (
                        timing.get("train", 0) + timing.get("validation", 0) + timing.get("checkpoint", 0)
                    ) / epochs
                    once = max(0.0, wall - per_epoch * epochs)
                else:  # an older results.json: all of its time scales with epochs but a start-up share
                    per_epoch, once = wall / epochs, 0.0
                keys = [(name, None)] + ([(name, adapter_setting(config))] if config.get("adapter") else [])
                for key in keys:  # its kind's, and its adapter settings' where the run records them
                    by_machine = samples.setdefault(key, {True: [], False: []})
                    by_machine[machine_label(res) == here].append((per_epoch, once))
        self.costs: dict[str, Cost] = {}  # per kind
        self.settings: dict[tuple[str, str], Cost] = {}  # per kind and adapter settings
        for (name, setting), by_machine in samples.items():
            s = by_machine[True] or by_machine[False]
            per_epoch, once = statistics.median(p for p, _ in s), statistics.median(o for _, o in s)
            cost = Cost(per_epoch, once, len(s), this_machine=bool(by_machine[True]))
            if setting is None:
                self.costs[name] = cost
            else:
                self.settings[(name, setting)] = cost

    def estimate(self, job: Job) -> float | None:
        return self.price(job.adapter, job.kind, job.epochs, adapter_setting(job.config))

    def price(self, adapter: str, kind: str, epochs: int, setting: str | None = None) -> float | None:
        """A run of `kind` (`results.strategy_kind`) over `epochs`, from its measured runs: those of its
        adapter `setting` (`adapter_setting`) where this machine measured them (or where nothing of
        its kind was measured here), else its kind's. An aggregator never measured with its strategy
        is priced by the strategy's other aggregators (their steps cost about the same), never by its
        summed-loss runs. None when nothing of its kind was measured."""
        cost = self.costs.get(kind)
        exact = self.settings.get((kind, setting))
        if exact is not None and (exact.this_machine or not cost.this_machine):
            cost = exact
        if cost is None and kind != adapter:
            others = [c for k, c in self.costs.items() if k.startswith(f"{adapter}+")]
            if others:
                cost = Cost(
                    statistics.median(c.per_epoch for c in others), statistics.median(c.once for c in others), 0
                )
        if cost is None:
            return None
        return cost.once + cost.per_epoch * epochs


def adapter_setting(config: dict) -> str:
    """A run's or job's adapter settings as one key (its resolved `adapter:` config)."""
    return json.dumps(config.get("adapter") or {}, sort_keys=True, default=str)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def describe(jobs: list[Job], costs: Costs, extra: list[str] | None = None) -> str:
    """The plan as text: a line per job, the counts, and the estimate for what is left to run."""
    lines = []
    for job in jobs:
        if job.state in ("to run", "resume", "failed"):
            job.estimate_s = costs.estimate(job)
        note = f" <- {job.source}" if job.source else ""
        est = f"  ~{fmt_s(job.estimate_s)}" if job.estimate_s is not None else ""
        lines.append(f"  {job.state:<8} {job.name}{note}{est}")
    counts = {s: sum(j.state == s for j in jobs) for s in ("complete", "shared", "resume", "failed", "to run")}
    todo = [j for j in jobs if j.state in ("to run", "resume", "failed")]
    known = [j.estimate_s for j in todo if j.estimate_s is not None]
    lines.append(
        f"{len(jobs)} jobs: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + f"; estimated {fmt_s(sum(known))} for the {len(known)} to train"
        + (f" ({len(todo) - len(known)} more with no measured run of their strategy)" if len(known) < len(todo) else "")
    )
    if costs.costs:
        lines.append(
            "  measured: "
            + ", ".join(
                f"{n} {fmt_s(c.per_epoch)}/epoch + {fmt_s(c.once)}"
                + f" ({c.runs} runs{'' if c.this_machine else ' on other machines than this one'})"
                for n, c in sorted(costs.costs.items())
            )
        )
    lines += extra or []
    return "\n".join(lines)


class Progress:
    """Prints a line as each planned job finishes (its results.json turns complete or failed)."""

    def __init__(self, jobs: list[Job], out=sys.stdout, every: float = 2.0):
        self.todo = [j for j in jobs if j.state in ("to run", "resume", "failed", "shared")]
        self.total, self.out, self.every = len(self.todo), out, every
        self.done: list[Job] = []
        self.status: dict[int, str] = {}  # id(job) -> how it ended
        self.t0 = time.time()
        self.before = {id(j): self._stamp(j) for j in self.todo}  # a failed job's old file is not news
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll()

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    @staticmethod
    def _stamp(job: Job) -> tuple:
        return tuple((f / "results.json").stat().st_mtime_ns for f in job.folders() if (f / "results.json").is_file())

    def poll(self) -> None:
        for job in list(self.todo):
            if self._stamp(job) == self.before[id(job)]:
                continue
            status = None
            for folder in job.folders():
                try:
                    status = json.loads((folder / "results.json").read_text()).get("status")
                except (OSError, ValueError):
                    continue
                if status == "complete":
                    break
            if status in ("complete", "failed", "interrupted"):
                self.todo.remove(job)
                self.done.append(job)
                self.status[id(job)] = status
                print(self.line(job, status), file=self.out, flush=True)

    def tally(self) -> str:
        """ "k of N jobs complete", with how many failed, were interrupted or never ran."""
        ended = list(self.status.values())
        parts = [f"{ended.count(s)} {s}" for s in ("failed", "interrupted") if ended.count(s)]
        parts += [f"{len(self.todo)} not run"] if self.todo else []
        line = f"{ended.count('complete')} of {self.total} jobs complete"
        return line + (f" ({', '.join(parts)})" if parts else "")

    def eta(self) -> float | None:
        """What is left, priced at the pace so far against the plan's estimates (else per job)."""
        elapsed = time.time() - self.t0
        planned = [j.estimate_s for j in self.done if j.estimate_s]
        left = [j.estimate_s for j in self.todo if j.estimate_s]
        if planned and len(left) == len(self.todo):
            return sum(left) * elapsed / sum(planned)
        return elapsed / len(self.done) * len(self.todo) if self.done else None

    def line(self, job: Job, status: str) -> str:
        elapsed = time.time() - self.t0
        return (
            f"[{len(self.done)}/{self.total}] {job.name}: {status}; elapsed {fmt_s(elapsed)}, "
            f"ETA {fmt_s(self.eta()) if self.todo else 'done'}"
        )


def sweep_dir(study: str, budget: str, overrides: list[str]) -> Path:
    """Where `peft-train -m experiment=<study> budget=<budget> <overrides>` puts its jobs: Hydra's
    own `hydra.sweep.dir` for that command (`sweep_root`, `hydra.sweep.dir=...` or any override
    that moves it), so the report is read from where the runs went."""
    cfg = compose([f"experiment={study}", f"budget={budget}", *overrides], hydra_config=True)
    return Path(str(cfg.hydra.sweep.dir))


def plan_options(argv: list[str]) -> tuple[bool | None, list[Path], list[str]]:
    """(`plan=true` / `--dry-run`: True, the plan only; `plan=false`: False, no plan and no progress
    lines; else None), the folders of measured runs (`plan_from=`), and the other arguments."""
    plan, sources, rest = None, [], []
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg == "--dry-run":
            plan = True
        elif key == "plan":
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"plan={value!r}: expected true or false")
            plan = value.lower() == "true"
        elif key == "plan_from":
            sources.append(Path(value))
        else:
            rest.append(arg)
    return plan, sources, rest


def print_plan(jobs: list[Job], costs: Costs, extra: list[str] | None = None) -> None:
    print("plan:\n" + describe(jobs, costs, extra), flush=True)


TUNE_KEYS = ("tune.strategies", "tune.grid", "tune.grids")


def search_grids(cfg) -> dict[str, list[float]]:
    """Each strategy's lr grid: its `tune.grids` entry, or `tune.grid`."""
    grids = cfg.tune.get("grids") or {}
    out = {}
    for name in cfg.tune.strategies:
        grid = [float(lr) for lr in (grids.get(name) or cfg.tune.grid)]
        if not grid or any(lr <= 0 for lr in grid):
            raise ConfigError(f"tune.grids.{name} / tune.grid: {grid}; expected positive lrs")
        out[str(name)] = grid
    return out


def search_args(name: str, grid: list[float], seed: int, rest: list[str]) -> list[str]:
    """The search sweep's arguments for one strategy (its own grid), the caller's tune.* overrides
    replaced by this strategy's."""
    lrs = ",".join(f"{lr:g}" for lr in grid)
    kept = [a for a in rest if a.lstrip("+~").partition("=")[0] not in TUNE_KEYS]
    return [f"seed={seed}", f"tune.strategies=[{name}]", f"tune.grid=[{lrs}]", *kept]


def tuned_jobs(budget: str, rest: list[str]) -> tuple[list[Job], str]:
    """The search's jobs, and the final runs' (one per strategy and seed, at an lr the search picks:
    their folders are known once they run), priced like the search's jobs of their strategy."""
    cfg = compose([f"budget={budget}", *rest])
    strategies, seeds = list(cfg.tune.strategies), list(cfg.budget.seeds)
    grids = search_grids(cfg)
    search = [
        j for name in strategies for j in study_jobs("tune_lr", budget, search_args(name, grids[name], seeds[0], rest))
    ]
    final_dir = sweep_dir("tuned", budget, rest)
    epochs = int(compose(["experiment=tuned", f"budget={budget}", *rest]).trainer.max_epochs)
    final = []
    for name in strategies:
        for seed in seeds:
            job = Job("tuned", [], final_dir / f"adapter={name},seed={seed}", name, epochs)
            job.pattern = rf"adapter={re.escape(name)},(.*,)?seed={seed}(,.*)?"
            done = [f for f in job.folders() if run_state(f) == "complete"]
            job.state = "complete" if done else "to run"
            final.append(job)
    note = f"  tuned: {len(search)} search jobs, then {len(final)} final runs at the lr each strategy's search picks"
    return search + final, note
