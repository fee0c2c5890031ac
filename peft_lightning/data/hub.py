"""`peft-data --out DIR`: write the TSV layout from the Hugging Face hub (needs internet).

Sources: SetFit/sst5 (text, label), glue/qqp (question1, question2, label, idx),
glue/stsb (sentence1, sentence2, label, idx). The hub's `validation` split becomes `dev`; GLUE test
labels are -1 (held out), so test files are written without labels, as in the shared layout.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from peft_lightning.tasks import TASKS

SOURCES = {
    "sst5": ("SetFit/sst5", None),
    "qqp": ("glue", "qqp"),
    "stsb": ("glue", "stsb"),
}
SPLIT_NAMES = {"train": "train", "validation": "dev", "test": "test"}


def dataset_rows(task: str, split: str, ds) -> tuple[list[str], list[list]]:
    """Header and rows of our TSV layout for one hub split (a `datasets.Dataset`)."""
    t = TASKS[task]
    labelled = split != "test"
    header = ["id", *t.text_columns] + ([t.label_column] if labelled else [])
    rows = []
    for i, ex in enumerate(ds):
        if task == "sst5":
            texts = [ex["text"]]
            id_ = f"{split}-{i:05d}"
        else:
            texts = [ex["question1"], ex["question2"]] if task == "qqp" else [ex["sentence1"], ex["sentence2"]]
            id_ = str(ex["idx"]) if task == "qqp" else f"{split}-{ex['idx']:04d}"
        texts = [" ".join(str(s).split()) for s in texts]  # fields never hold tabs or newlines
        row = [id_, *texts]
        if labelled:
            label = ex["label"]
            row.append(f"{float(label):.3f}" if t.is_regression else str(int(label)))
        rows.append(row)
    return header, rows


def write_split(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def download(out: Path, tasks: list[str]) -> None:
    from datasets import load_dataset

    for task in tasks:
        name, config = SOURCES[task]
        dd = load_dataset(name, config) if config else load_dataset(name)
        for hub_split, split in SPLIT_NAMES.items():
            if hub_split not in dd:
                continue
            header, rows = dataset_rows(task, split, dd[hub_split])
            write_split(out / task / f"{split}.tsv", header, rows)
            print(f"{out / task / f'{split}.tsv'}: {len(rows)} rows")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peft-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data directory to write (sst5/, qqp/, stsb/)")
    parser.add_argument("--tasks", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    args = parser.parse_args(argv)
    try:
        download(Path(args.out), args.tasks)
    except Exception as err:  # the hub out of reach (offline, a proxy, a firewall) or a dataset gone
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {first[:200]}"
        raise SystemExit(
            f"peft-data: could not download {', '.join(args.tasks)} from the Hugging Face hub ({why}). "
            "Without the hub, put the TSV files in a folder (sst5/, qqp/, stsb/: README, Data) and pass it "
            "as data.dir=..."
        ) from None


if __name__ == "__main__":
    main()
