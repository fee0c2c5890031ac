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
    """Every results.json under `root`; one that cannot be used (not a file, not UTF-8, not JSON,
    not an object, fields of the wrong type) is a failed row whose error names its file."""
    runs = []
    for path in sorted(root.rglob(RESULTS)):
        res, problem = read_run(path)
        if problem:
            res = {"status": "failed", "error": f"{path.relative_to(root)}: {problem}", "unreadable": True}
        res["dir"] = str(path.parent.relative_to(root))
        res["path"] = str(path.parent)  # its predictions/ folder, for the paired bootstrap
        res.setdefault("study", path.parent.parent.name)
        runs.append(res)
    return runs


# the fields a report reads, and the JSON type each must have where present (null allowed)
FIELDS = {
    "status": str,
    "error": str,
    "study": str,
    "run_name": str,
    "history": list,
    "best": dict,
    "adapter": dict,
    "config": dict,
    "overrides": list,
    "predictions": dict,
    "timing": dict,
    "wall_time_s": (int, float),
    "shared_from": str,
    "machine": dict,
}
JSON_TYPE = {str: "a string", list: "a list", dict: "an object", (int, float): "a number"}


def read_run(path: Path) -> tuple[dict, str | None]:
    """(results, None), or ({}, what is wrong with the file)."""
    if path.is_dir():
        return {}, "is a folder, not a file"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        return {}, f"cannot be read ({err.strerror or err})"
    except UnicodeDecodeError as err:
        return {}, f"not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    try:
        res = json.loads(text)
    except json.JSONDecodeError as err:
        return {}, f"unreadable JSON ({err.msg} at line {err.lineno} column {err.colno}; truncated?)"
    if not isinstance(res, dict):
        return {}, f"not a JSON object (a {type(res).__name__})"
    for key, kind in FIELDS.items():
        value = res.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return {}, f"field {key!r} should be {JSON_TYPE[kind]}, got {json.dumps(value)[:40]}"
    for i, record in enumerate([*(res.get("history") or []), *([res["best"]] if res.get("best") else [])]):
        where = "best" if i == len(res.get("history") or []) else f"history[{i}]"
        if not isinstance(record, dict):
            return {}, f"field {where!r} should be an object, got {json.dumps(record)[:40]}"
        for key in ("epoch", "dev_avg", "select_avg", "train_avg", "train_eval_avg"):
            value = record.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                return {}, f"field '{where}.{key}' should be a number, got {json.dumps(value)[:40]}"
        for split in ("dev", "select", "train_eval", "train"):
            scores = record.get(split)
            if scores is not None and not (
                isinstance(scores, dict)
                and all(
                    isinstance(ms, dict) and all(isinstance(v, (int, float)) or v is None for v in ms.values())
                    for ms in scores.values()
                )
            ):
                return {}, f"field '{where}.{split}' should map tasks to their metrics, got {json.dumps(scores)[:40]}"
    return res, None


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


class Num(str):
    """A table cell: the text a report shows, and the numbers behind it (`values`: mean, std, n; or
    value, lo, hi, n), which the CSVs write as columns of their own (`report.write_csv`)."""

    values: dict

    def __new__(cls, text: str, **values):
        cell = super().__new__(cls, text)
        cell.values = values
        return cell


def fmt(values: list[float], digits: int = 4) -> Num:
    """mean ± std over seeds (one value: itself), with the numbers behind the text."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return Num("-", mean=None, std=None, n=0)
    if len(values) == 1:
        return Num(f"{values[0]:.{digits}f}", mean=values[0], std=None, n=1)
    m, sd = statistics.mean(values), statistics.stdev(values)
    return Num(f"{m:.{digits}f} ± {sd:.{digits}f}", mean=m, std=sd, n=len(values))


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.mean(values) if values else None


def score(entry: dict | None, part: str, task: str, metric: str) -> float | None:
    return ((entry or {}).get(part) or {}).get(task, {}).get(metric)


def complete(members: list[dict]) -> tuple[list[dict], list[str]]:
    """The complete runs (with a best epoch), and a "status: error" line for each of the others."""
    ok = [r for r in members if r.get("status") == "complete" and r.get("best")]
    return ok, [f"{r.get('status', '?')}: {r.get('error', '')}".strip(": ") for r in members if r not in ok]
