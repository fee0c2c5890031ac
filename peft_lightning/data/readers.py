"""Readers for the two on-disk layouts, with validation that names file, line and field.

TSV layout (the default)::

    <dir>/sst5/{train,dev,test}.tsv   id, sentence, label
    <dir>/qqp/{train,dev,test}.tsv    id, sentence1, sentence2, label
    <dir>/stsb/{train,dev,test}.tsv   id, sentence1, sentence2, score

CS224N minBERT layout (tab-separated despite the `.csv` suffix, first column an unnamed index)::

    <dir>/ids-sst-{train,dev,test-student}.csv   id, sentence, sentiment
    <dir>/quora-{train,dev,test-student}.csv     id, sentence1, sentence2, is_duplicate
    <dir>/sts-{train,dev,test-student}.csv       id, sentence1, sentence2, similarity

Test files carry no labels; a label column present in a test file is ignored.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from peft_lightning.tasks import Task


class DataError(ValueError):
    """Bad input data; the message names the file, line and field and what was expected."""


@dataclass
class Split:
    """The rows of one task split, as read and validated."""

    task: str
    split: str
    path: Path
    ids: list[str]
    texts: list[tuple[str, ...]]
    labels: list[float] | None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


_CS224N_FILES = {
    ("sst5", "train"): "ids-sst-train.csv",
    ("sst5", "dev"): "ids-sst-dev.csv",
    ("sst5", "test"): "ids-sst-test-student.csv",
    ("qqp", "train"): "quora-train.csv",
    ("qqp", "dev"): "quora-dev.csv",
    ("qqp", "test"): "quora-test-student.csv",
    ("stsb", "train"): "sts-train.csv",
    ("stsb", "dev"): "sts-dev.csv",
    ("stsb", "test"): "sts-test-student.csv",
}
# CS224N column name -> our column name
_CS224N_COLUMNS = {"sentiment": "label", "is_duplicate": "label", "similarity": "score"}


def detect_layout(data_dir: Path) -> str:
    """Return `tsv` or `cs224n` for a data directory, or raise a DataError saying what is missing."""
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist; set data.dir=<folder> or $PEFT_DATA_DIR "
            "(expected sst5/, qqp/, stsb/ with train.tsv, dev.tsv, test.tsv)"
        )
    if any((data_dir / t).is_dir() for t in ("sst5", "qqp", "stsb")):
        return "tsv"
    if any((data_dir / f).is_file() for f in _CS224N_FILES.values()):
        return "cs224n"
    raise DataError(
        f"{data_dir} holds neither the TSV layout (sst5/, qqp/, stsb/ folders) nor the CS224N "
        "layout (ids-sst-*.csv, quora-*.csv, sts-*.csv)"
    )


def split_path(data_dir: Path, task: str, split: str, layout: str) -> Path:
    if layout == "cs224n":
        return data_dir / _CS224N_FILES[(task, split)]
    return data_dir / task / f"{split}.tsv"


def read_split(
    data_dir: str | Path, task: Task, split: str, layout: str | None = None, on_bad_row: str = "raise"
) -> Split:
    """Read and validate one split of one task.

    Args:
        data_dir: the data directory.
        task: the task whose split to read.
        split: `train`, `dev` or `test`.
        layout: `tsv` or `cs224n`; detected when None.
        on_bad_row: `raise` (default) stops at the first bad row; `skip` drops bad rows and
            records their messages in `Split.skipped`.

    Raises:
        DataError: missing file or column, empty file, a bad label, or an id repeated in the split.
    """
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"data.on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
    data_dir = Path(data_dir)
    layout = layout or detect_layout(data_dir)
    path = split_path(data_dir, task.name, split, layout)
    if not path.is_file():
        raise DataError(f"{path}: file not found (task {task.name}, split {split}, layout {layout})")
    return read_file(path, task, split, split != "test", on_bad_row, layout)


def read_file(
    path: Path,
    task: Task,
    split: str = "input",
    labels: bool | None = True,
    on_bad_row: str = "raise",
    layout: str = "tsv",
    ids: bool = True,
) -> Split:
    """Read and validate one file of a task's rows (`read_split` for a data directory's split).

    Args:
        path: the file (the columns of the task's TSV files).
        task: whose columns and labels it holds.
        split: the name the rows go by (messages, cache keys).
        labels: True: the label column is required; False: ignored; None: read when the header has it.
        on_bad_row: `raise` or `skip`.
        layout: `tsv`, or `cs224n` for that layout's column names.
        ids: the id column is required; False: optional, a file without one gets row numbers (1, 2, ...).
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found (task {task.name})")
    with_labels = labels
    ids: list[str] = []
    texts: list[tuple[str, ...]] = []
    values: list[float] = []
    skipped: list[str] = []
    first_line_of: dict[str, int] = {}
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: file is empty; expected a header row and data rows")
        if layout == "cs224n":
            header = [_CS224N_COLUMNS.get(c.strip(), c.strip()) for c in header]
        if with_labels is None:
            with_labels = task.label_column in header
        numbered = not ids and "id" not in header
        needed = ([] if numbered else ["id"]) + [*task.text_columns] + ([task.label_column] if with_labels else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {missing}; header is {header}, expected {needed}")
        col = {c: header.index(c) for c in needed}
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            try:
                id_, text, label = _parse_row(path, line, row, col, task, with_labels)
            except DataError as err:
                if on_bad_row == "raise":
                    raise
                skipped.append(str(err))
                continue
            if numbered:
                id_ = str(len(ids) + 1)
            if id_ in first_line_of:
                raise DataError(
                    f"{path}:{line}: field 'id': id {id_!r} repeats line {first_line_of[id_]}; "
                    "ids must be unique within a split"
                )
            first_line_of[id_] = line
            ids.append(id_)
            texts.append(text)
            if with_labels:
                values.append(label)
    if not ids:
        raise DataError(f"{path}: no data rows after the header")
    return Split(task.name, split, path, ids, texts, values if with_labels else None, skipped)


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without the byte-order mark that spreadsheet exports write.

    Raises:
        DataError: bytes that are not UTF-8, with the line and column of the first one.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: byte 0x{raw[err.start]:02x} at column {column} is not UTF-8 "
            "(expected a UTF-8 text file: re-save it as UTF-8)"
        ) from None


def _parse_row(
    path: Path, line: int, row: list[str], col: dict[str, int], task: Task, with_labels: bool
) -> tuple[str, tuple[str, ...], float]:
    def get(name: str) -> str:
        i = col[name]
        if i >= len(row):
            raise DataError(f"{path}:{line}: field {name!r}: row has {len(row)} fields, expected at least {i + 1}")
        return row[i].strip()

    if "id" not in col:  # an input without ids (read_file with `ids=False`): its row number
        id_ = ""
    else:
        id_ = get("id")
    if "id" in col and not id_:
        raise DataError(f"{path}:{line}: field 'id': empty; expected a non-empty id")
    text = tuple(get(c) for c in task.text_columns)
    for name, value in zip(task.text_columns, text):
        if not value:
            raise DataError(f"{path}:{line}: field {name!r}: empty; expected a sentence")
    if not with_labels:
        return id_, text, math.nan
    raw = get(task.label_column)
    return id_, text, _parse_label(path, line, task, raw)


def _parse_label(path: Path, line: int, task: Task, raw: str) -> float:
    low, high = task.label_range
    where = f"{path}:{line}: field {task.label_column!r}"
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{where}: {raw!r} is not a number; expected {_expect(task)}") from None
    if math.isnan(value) or math.isinf(value):
        raise DataError(f"{where}: {raw!r} is not finite; expected {_expect(task)}")
    if task.is_regression:
        if not low <= value <= high:
            raise DataError(f"{where}: {raw!r} is outside {low:g}..{high:g}; expected {_expect(task)}")
        return value
    if value != int(value) or not low <= value <= high:
        raise DataError(f"{where}: {raw!r} is not a valid class; expected {_expect(task)}")
    return float(int(value))


def _expect(task: Task) -> str:
    low, high = task.label_range
    if task.is_regression:
        return f"a similarity score between {low:g} and {high:g}"
    if task.num_labels == 2:
        return "0 or 1"
    return f"an integer class {int(low)}..{int(high)}"
