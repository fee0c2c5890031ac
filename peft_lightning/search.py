"""`peft-tune search=optuna`: each strategy's configuration searched by Optuna, losing trials pruned.

Per strategy, an Optuna study (TPE sampling, `tune.sampler_seed`) over the strategy's search space
(`conf/tune/<strategy>.yaml`, composed into `tune.space.<strategy>`: a log-uniform lr range that fits
the strategy, and optional axes such as rank, dropout, prefix length, the heads' lr or warmup, each
switched on with `use: true`). A trial is an ordinary run, `<sweep root>/tune_optuna/<its
overrides>`, with its results.json, so the report, resume and sharing work on it. It trains with
`tune.search_seed` (by default one past the budget's largest seed, main's included: the final runs' seeds are not
the search's) and no test predictions. After every epoch its selection-split avg (`select/avg`:
rows held out of training; never dev) is reported to Optuna (with `tune.epoch_parts` = K, a pass
over the training data is K Lightning epochs, `data.epoch_parts`, so the pruner sees K scores a
pass: budget=cpu trains one pass and cuts it in four), and optuna-integration's Lightning
pruning callback stops it when the pruner (`tune.pruner`: median, sha (successive halving) or
none) says it is losing; its results.json then says `pruned`.

Storage is an Optuna journal file, `<sweep root>/tune_optuna/journal.log`: no database server, and
safe for several processes on one file system. Killing peft-tune and running the same command
again continues each study: finished trials are kept; a trial that was cut off (left `RUNNING` by
a process that is gone) is marked failed and its parameters are asked again, so the same folder
resumes from its last.ckpt. One peft-tune command owns a journal at a time.

Workers: `tune.workers=1` (this CPU) runs the trials in peft-tune's own process. With more, the
workers are the jobs of a Hydra sweep (`peft-train -m tune.worker=0,...,W-1` with the launcher given,
e.g. `hydra/launcher=gpus`: one worker per GPU slot, or slurm / ray), each asking the shared journal
for its next trial; Optuna hands every trial to one worker only. A trial is one process: DDP
trials are refused (the pruning callback needs an RDB storage under DDP).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from peft_lightning.checks import whole
from peft_lightning.config import ConfigError, _run_name, compose
from peft_lightning.results import read_results, selection_score

log = logging.getLogger(__name__)

STUDY = "tune_optuna"  # the sweep folder's study name
EDGE = 0.05  # a chosen value within 5% of its range (log scale for log axes) is at the edge
FIGURES = 3  # a sampled float is rounded to 3 significant figures: what the run trains at and is named by


def sampler(seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=3)


def pruner(name: str, startup: int = 2):
    """`tune.pruner`; `startup` (tune.pruner_startup): the median pruner's trials run whole before it
    prunes (below the median of earlier trials at the same epoch)."""
    import optuna

    whole("tune.pruner_startup", startup, 1, ConfigError)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner={name!r} is unknown; expected median, sha or none")


def axes(cfg: DictConfig, strategy: str) -> dict[str, dict]:
    """The search space's axes in use for `strategy`: {name: spec} with spec's `key` (the config key
    a trial sets) and `low`/`high`(/`log`) or `choices`."""
    space = (cfg.tune.get("space") or {}).get(strategy)
    if space is None:
        raise ConfigError(f"no search space for {strategy!r}: add conf/tune/{strategy}.yaml (see conf/tune/lora.yaml)")
    out = {}
    for name, spec in OmegaConf.to_container(space, resolve=True).items():
        if not isinstance(spec, dict) or not spec.get("use", True):
            continue
        where = f"tune.space.{strategy}.{name}"
        if "key" not in spec:
            raise ConfigError(f"{where}: no `key` (the config key the axis sets, e.g. optim.adapter_lr)")
        if "choices" in spec:
            if not spec["choices"]:
                raise ConfigError(f"{where}.choices is empty")
        elif not ("low" in spec and "high" in spec) or not float(spec["low"]) < float(spec["high"]):
            raise ConfigError(f"{where}: expected low < high, or choices; got {spec}")
        elif spec.get("log") and float(spec["low"]) <= 0:
            raise ConfigError(f"{where}: a log axis needs low > 0; got {spec['low']}")
        out[name] = spec
    if not out:
        raise ConfigError(f"tune.space.{strategy}: no axis in use")
    return out


def distributions(space: dict[str, dict]) -> dict:
    import optuna.distributions as d

    out = {}
    for name, spec in space.items():
        if "choices" in spec:
            out[name] = d.CategoricalDistribution(list(spec["choices"]))
        elif spec.get("int"):
            out[name] = d.IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            out[name] = d.FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return out


def rounded(value):
    """A float to FIGURES significant figures (ints, strings and choices as they are)."""
    if isinstance(value, float) and value != 0 and math.isfinite(value):
        return float(f"{value:.{FIGURES}g}")
    return value


def trial_overrides(strategy: str, space: dict[str, dict], params: dict, seed: int) -> list[str]:
    """What a trial's run is: its strategy, each axis's value at its config key, and the seed."""
    sets = {space[name]["key"]: rounded(value) for name, value in params.items() if name in space}
    return [
        f"adapter={strategy}",
        *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(sets.items())),
        f"seed={seed}",
    ]


def run_name(overrides: list[str]) -> str:
    return _run_name(",".join(sorted(overrides)))


def journal(root: Path):
    """The Optuna journal storage of a sweep root's search (created on first use)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    folder = root / STUDY
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "journal.log")))


def open_study(storage, strategy: str, tune: DictConfig, worker: int = 0):
    """The strategy's study in the journal (created on first use). The sampler's seed is
    tune.sampler_seed, moved on by the worker and by the trials already there: identically seeded
    workers, or a resumed search, would propose the same values again."""
    import optuna

    study = optuna.create_study(
        study_name=strategy,
        storage=storage,
        direction="maximize",
        pruner=pruner(str(tune.pruner), tune.get("pruner_startup", 2)),
        load_if_exists=True,
    )
    # a resumed search must not draw its first values again: the seed moves on with the trials there
    study.sampler = sampler(int(tune.sampler_seed) + 1000 * worker + len(study.get_trials(deepcopy=False)))
    return study


def recover(study) -> list[int]:
    """Trials left RUNNING by a process that is gone: marked failed, their parameters asked again
    (the same run folder, which resumes). Returns their numbers."""
    from optuna.trial import TrialState

    cut = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in cut:
        study._storage.set_trial_system_attr(t._trial_id, "cut_off", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number}, skip_if_exists=False)
    if cut:
        log.info("%s: %d trial(s) cut off (%s) asked again", study.study_name, len(cut), [t.number for t in cut])
    return [t.number for t in cut]


def counted(study) -> int:
    """Trials that count against tune.trials: finished (complete or pruned) or running."""
    from optuna.trial import TrialState

    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        for t in study.get_trials(deepcopy=False)
    )


def quoted(text: str) -> str:
    """`text` as a Hydra override's quoted value (a run folder's name has `=` and `,`)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_config(budget: str, rest: list[str], root: Path, overrides: list[str]) -> DictConfig:
    """A trial's run config. With tune.epoch_parts = K > 1, each pass over the training data is K
    Lightning epochs (`data.epoch_parts`), each validated on the selection split alone (no train_eval
    sample), so the pruner sees the trial K times a pass: at budget=cpu's one epoch, without parts,
    a trial is over before it can be pruned."""
    name = run_name(overrides)
    base = [f"budget={budget}", *rest, *overrides]
    plain = compose(base)
    parts = whole("tune.epoch_parts", plain.tune.get("epoch_parts", 1), 1, ConfigError)
    cut = []
    if parts > 1:
        epochs = int(plain.trainer.max_epochs)
        cut = [f"data.epoch_parts={parts}", f"trainer.max_epochs={epochs * parts}", "data.train_eval=0"]
    return compose(
        [
            *base,
            *cut,
            f"study={STUDY}",
            "predict=false",
            f"output_dir={quoted(str(root / STUDY / name))}",
            f"overrides=[{','.join(repr(o) for o in overrides)}]",
        ]
    )


def work(
    strategy: str, budget: str, rest: list[str], root: Path, cfg: DictConfig, trials: int, train, worker: int = 0
) -> None:
    """Ask the strategy's study for trials until it has `trials` (complete, pruned or running), and
    run each as an ordinary run in this process (`train`: peft-train's, which imports this module)."""
    import optuna
    from optuna.trial import TrialState
    from optuna_integration import PyTorchLightningPruningCallback

    space = axes(cfg, strategy)
    dists = distributions(space)
    study = open_study(journal(root), strategy, cfg.tune, worker)
    seed = search_seed(cfg)
    while True:
        waiting = any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))
        if counted(study) >= trials and not waiting:
            return
        trial = study.ask(dists)
        overrides = trial_overrides(strategy, space, trial.params, seed)
        run_cfg = trial_config(budget, rest, root, overrides)
        if str(run_cfg.trainer.get("strategy", "auto")).startswith("ddp"):
            study.tell(trial, state=TrialState.FAIL)
            raise ConfigError("peft-tune search=optuna runs a trial in one process: trainer.strategy=ddp is refused")
        trial.set_user_attr("run", run_name(overrides))
        trial.set_user_attr("overrides", overrides[1:-1])  # what the final runs train with (less strategy and seed)
        trial.set_user_attr("epochs", int(run_cfg.trainer.max_epochs))  # Lightning epochs: parts of passes
        trial.set_user_attr("parts", int(run_cfg.data.get("epoch_parts") or 1))
        trial.set_user_attr("worker", worker)
        print(f"== {strategy} trial {trial.number}: {' '.join(overrides[1:-1])}", flush=True)
        # a folder this trial resumes (a cut-off trial asked again): its recorded epochs reported first,
        # so the pruner sees the trial's whole curve, wherever it was cut
        for epoch, value in epoch_scores(read_results(run_cfg.output_dir) or {}):
            trial.report(value, epoch)
        try:
            res = train(run_cfg, callbacks=[PyTorchLightningPruningCallback(trial, monitor=monitor(run_cfg))])
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"   trial {trial.number} pruned", flush=True)
            continue
        except Exception as err:  # noqa: BLE001 (a failed trial is recorded; the search goes on)
            study.tell(trial, state=TrialState.FAIL)
            print(f"   trial {trial.number} failed: {err}", flush=True)
            continue
        score = trial_score(res)
        if res.get("status") == "pruned":  # a pruned run taken again (its folder says so)
            study.tell(trial, state=TrialState.PRUNED)
        elif score is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            reported = study._storage.get_trial(trial._trial_id).intermediate_values
            for epoch, value in epoch_scores(res):
                if epoch not in reported:  # a complete folder taken as it is: its curve, for the pruner
                    trial.report(value, epoch)
            study.tell(trial, score)
            print(f"   trial {trial.number}: {score:.4f}", flush=True)


def monitor(cfg: DictConfig) -> str:
    return "select/avg" if cfg.data.select_on == "selection" else "val/avg"


def search_seed(cfg: DictConfig) -> int:
    seed = cfg.tune.get("search_seed")
    if seed is not None:
        return int(seed)
    reported = [*cfg.budget.seeds, *(cfg.budget.get("main_seeds") or [])]  # every seed a report shows
    return max(int(s) for s in reported) + 1


def trial_score(res: dict) -> float | None:
    return selection_score(res["best"]) if res.get("status") == "complete" and res.get("best") else None


def epoch_scores(res: dict) -> list[tuple[int, float]]:
    out = []
    for h in res.get("history") or []:
        value = selection_score(h)
        if value is not None:
            out.append((int(h["epoch"]) - 1, value))  # the callback's steps are 0-based epochs
    return out


def summary(root: Path, strategy: str, epochs: int | None = None) -> dict | None:
    """A strategy's search, read from the journal: the best complete trial's configuration and
    score, each trial's state, score and values, the pruned count and the epochs pruning saved
    (against every trial run to `epochs`, each trial's own by default), and the axes at their edge."""
    import optuna
    from optuna.trial import TrialState

    path = root / STUDY / "journal.log"
    if not path.is_file():
        return None
    try:
        study = optuna.load_study(study_name=strategy, storage=journal(root))
    except KeyError:
        return None
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    out = {
        "strategy": strategy,
        "trials": len(trials),
        "complete": len(complete),
        "pruned": len(finished) - len(complete),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "scores": [
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "score": t.value,
                "params": {k: rounded(v) for k, v in t.params.items()},
                "epochs": len(t.intermediate_values),
                "last": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
            }
            for t in trials
        ],
        "parts": max((int(t.user_attrs.get("parts") or 1) for t in trials), default=1),
    }
    if not complete:
        return out
    best = max(complete, key=lambda t: t.value)
    full = lambda t: int(epochs or t.user_attrs.get("epochs") or max(len(t.intermediate_values), 1))  # noqa: E731
    trained = sum(len(t.intermediate_values) for t in finished)
    out.update(
        best={"trial": best.number, "score": best.value, "params": {k: rounded(v) for k, v in best.params.items()}},
        run=best.user_attrs.get("run"),
        overrides=list(best.user_attrs.get("overrides") or []),
        epochs_trained=trained,
        epochs_without_pruning=sum(full(t) for t in finished),
        at_edge=at_edge(best.distributions, best.params),
    )
    return out


def at_edge(dists: dict, params: dict) -> list[str]:
    """The numeric axes whose chosen value lies within EDGE of its range's ends (log scale where log)."""
    out = []
    for name, value in params.items():
        dist = dists.get(name)
        if dist is None or not hasattr(dist, "low"):
            continue
        low, high, v = float(dist.low), float(dist.high), float(value)
        if dist.log:
            low, high, v = math.log(low), math.log(high), math.log(v)
        where = (v - low) / (high - low)
        if where <= EDGE or where >= 1 - EDGE:
            end = "low" if where <= EDGE else "high"
            out.append(f"{name}={rounded(value):g} at the {end} end of [{dist.low:g}, {dist.high:g}]")
    return out


def strategies(root: Path) -> list[str]:
    """The studies (one per strategy) in a sweep root's journal."""
    import optuna

    if not (root / STUDY / "journal.log").is_file():
        return []
    return [s.study_name for s in optuna.get_all_study_summaries(journal(root), include_best_trial=False)]


def importances(root: Path, strategy: str) -> dict[str, float]:
    """Optuna's fANOVA importance of each axis (over complete trials; empty with fewer than two or one axis)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=strategy, storage=journal(root))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or len({k for t in complete for k in t.params}) < 2:
        return {}
    return dict(optuna.importance.get_param_importances(study))


def worker_job(cfg: DictConfig, train) -> None:
    """One worker of the search: `peft-train tune.worker=0` (one worker), or a job of `peft-train -m
    tune.worker=0,...` on the Hydra launcher given, as peft-tune launches them; it takes trials from
    the shared journal until each strategy's study has tune.trials."""
    from hydra.core.hydra_config import HydraConfig

    task = list(HydraConfig.get().overrides.task)
    budget = next((o.split("=", 1)[1] for o in task if o.startswith("budget=")), "quick")
    rest = [o for o in task if not o.startswith(("budget=", "study=", "tune.worker=", "hydra/", "hydra."))]
    root = Path(str(cfg.sweep_root))
    for strategy in cfg.tune.strategies:
        work(str(strategy), budget, rest, root, cfg, int(cfg.tune.trials), train, int(cfg.tune.worker))
