"""The floor every fine-tuned encoder should clear: a bag-of-words model on the full training sets.

TF-IDF of word unigrams and bigrams (scikit-learn's `TfidfVectorizer`, fitted on each task's
training sentences), then logistic regression for SST-5 and QQP and ridge regression for STS-B.
A pair is [u; v; |u - v|; u * v] of its two sentences' vectors (as the sbert pair features). It
trains on the whole training sets in seconds of CPU, so it does not move with a budget's row
limit, and it is written as a run (`<root>/floor/bow/`: results.json, dev predictions with labels,
test predictions) that the report scores on the same dev rows, with the same intervals, as every
other row. It has no seed: its interval holds the dev rows only, and it pairs with every seed.

    peft-report DIR --floor-data DATA    # fits the floor into DIR/floor/bow once, then reports
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge

from peft_lightning.data.readers import Split, detect_layout, read_split
from peft_lightning.files import atomic_write, atomic_write_text
from peft_lightning.stats import metric_rows
from peft_lightning.tasks import TASK_NAMES, TASKS

FLOOR_DIR = Path("floor") / "bow"


def features(vectorizer: TfidfVectorizer, split: Split):
    """A row's sparse features: its sentence's TF-IDF vector, or a pair's [u; v; |u - v|; u * v]."""
    columns = list(zip(*split.texts))
    vecs = [vectorizer.transform(list(c)) for c in columns]
    if len(vecs) == 1:
        return vecs[0]
    u, v = vecs
    return sparse.hstack([u, v, abs(u - v), u.multiply(v)]).tocsr()


def fit_task(data_dir: Path, task: str, layout: str) -> dict[str, tuple[Split, np.ndarray]]:
    """The floor model of one task, fitted on its training set; its dev and test predictions."""
    t = TASKS[task]
    splits = {s: read_split(data_dir, t, s, layout) for s in ("train", "dev", "test")}
    train = splits["train"]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=50_000, sublinear_tf=True)
    vectorizer.fit([s for row in train.texts for s in row])
    x, y = features(vectorizer, train), np.array(train.labels)
    model = Ridge(alpha=1.0) if t.is_regression else LogisticRegression(C=1.0, max_iter=2000)
    model.fit(x, y if t.is_regression else y.astype(int))
    out = {}
    for name in ("dev", "test"):
        pred = model.predict(features(vectorizer, splits[name]))
        out[name] = (splits[name], np.clip(pred, *t.label_range) if t.is_regression else pred.astype(int))
    return out


def _write_tsv(path: Path, split: Split, pred: np.ndarray, regression: bool) -> None:
    def fmt(x) -> str:
        return f"{float(x):.6g}" if regression else str(int(x))

    def write(f) -> None:
        has_labels = split.labels is not None
        f.write("id\tprediction" + ("\tlabel" if has_labels else "") + "\n")
        for i, row_id in enumerate(split.ids):
            label = "\t" + fmt(split.labels[i]) if has_labels else ""
            f.write(f"{row_id}\t{fmt(pred[i])}{label}\n")

    atomic_write(path, write)


def write_floor(data_dir: str | Path, root: str | Path) -> Path:
    """Fit the floor on `data_dir` and write it as a run under `root/floor/bow`; returns that folder."""
    data_dir, run_dir = Path(data_dir), Path(root) / FLOOR_DIR
    layout = detect_layout(data_dir)
    t0 = time.perf_counter()
    dev: dict[str, dict[str, float]] = {}
    written = {}
    for task in TASK_NAMES:
        t = TASKS[task]
        for name, (split, pred) in fit_task(data_dir, task, layout).items():
            path = run_dir / "predictions" / f"{task}-{name}.tsv"
            _write_tsv(path, split, pred, t.is_regression)
            written[f"{task}-{name}"] = str(path.relative_to(run_dir))
            if name == "dev":
                label = np.array(split.labels)
                metrics = (
                    ["pearson", "spearman"] if t.is_regression else ["acc"] + (["f1"] if t.num_labels == 2 else [])
                )
                dev[task] = {m: float(metric_rows(m, pred.astype(float), label)) for m in metrics}
    avg = float(np.mean([dev[t][TASKS[t].main_metric] for t in dev]))
    best = {"epoch": 1, "dev": dev, "dev_avg": avg, "train": {}, "train_avg": None}
    result = {
        "run_name": "bow",
        "study": "floor",
        "status": "complete",
        "adapter": {"name": "floor"},
        "model": {"name": "tfidf", "source": "scikit-learn TF-IDF (1-2 grams) + logistic / ridge regression"},
        "seed": None,
        "overrides": [],
        "history": [best],
        "best": best,
        "predictions": written,
        "data_dir": str(data_dir),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(run_dir / "results.json", json.dumps(result, indent=2) + "\n")
    return run_dir
