"""Run records: each run's results.json as a dict, and what the report modules ask of one.

The bottom layer of the report modules (`comparisons`, `findings`, `tables`, `report`): a run's
overrides, its strategy, the keys that vary across a study's runs, the complete ones, a score.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path

from peft_lightning.config import train_yaml
from peft_lightning.results import RESULTS


def load_runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.rglob(RESULTS)):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            res = {"status": "failed", "error": f"unreadable results.json: {err}"}
        res["dir"] = str(path.parent.relative_to(root))
        res["path"] = str(path.parent)  # its predictions/ folder, for the paired bootstrap
        res.setdefault("study", path.parent.parent.name)
        runs.append(res)
    return runs


@functools.cache
def ignored_keys() -> frozenset[str]:
    """Overrides that are not a setting of a row: the seed (averaged over), and those that Hydra
    leaves out of a run folder's name (conf/train.yaml's `exclude_keys`: where the data, the sweep
    and the logs live, `budget.seeds`, the launcher), which a rerun or a resume may change."""
    cfg = train_yaml()
    return frozenset(["seed", *cfg.hydra.job.config.override_dirname.exclude_keys])


def overrides(run: dict) -> dict[str, str]:
    out = {}
    for item in run.get("overrides") or []:
        key, _, value = item.partition("=")
        # Hydra names a sweep's booleans as Python prints them (adapter.mlp=True): the same setting as `true`
        out[key.lstrip("+~")] = value.lower() if value in ("True", "False") else value
    return out


def strategy(run: dict) -> str:
    """The run's adapter: as results.json describes it, else its `adapter=` override."""
    return (run.get("adapter") or {}).get("name") or overrides(run).get("adapter", "?")


def varying_keys(runs: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for k in overrides(r):
            if k not in keys and k not in ignored_keys():
                keys.append(k)
    return [k for k in keys if len({overrides(r).get(k) for r in runs}) > 1] or keys[:1]


def fmt(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.mean(values) if values else None


def score(entry: dict | None, part: str, task: str, metric: str) -> float | None:
    return ((entry or {}).get(part) or {}).get(task, {}).get(metric)


def complete(members: list[dict]) -> tuple[list[dict], list[str]]:
    """The complete runs (with a best epoch), and a "status: error" line for each of the others."""
    ok = [r for r in members if r.get("status") == "complete" and r.get("best")]
    return ok, [f"{r.get('status', '?')}: {r.get('error', '')}".strip(": ") for r in members if r not in ok]
