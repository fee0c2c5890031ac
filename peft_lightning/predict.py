"""`peft-predict RUN_DIR --task sst5|qqp|stsb --input FILE.tsv|- --out FILE.tsv|-`: score new rows.

The input has the task's columns as in the data files (`id, sentence` for sst5; `id, sentence1,
sentence2` for qqp and stsb), the id and label columns optional (without ids, rows are numbered 1, 2,
...); bad rows get the same `file:line: field` errors as training (exit 2), before the model is
loaded. The output is `id, prediction` as a run's own predictions files, and with `--probabilities`
(sst5, qqp) each class's probability.
With labels, the metrics are printed (to stderr when the predictions go to stdout).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
from pathlib import Path

from peft_lightning import checks
from peft_lightning.api import load_run
from peft_lightning.data.readers import DataError, read_file
from peft_lightning.files import atomic_write_text, describe_os_error
from peft_lightning.interrupt import Interrupted, on_signals
from peft_lightning.quiet import quiet
from peft_lightning.results import format_prediction, read_results
from peft_lightning.tasks import TASKS


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="peft-predict", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a folder written by peft-train (results.json, checkpoints/)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--input", required=True, help="TSV file, or - for standard input")
    p.add_argument("--out", required=True, help="TSV file to write, or - for standard output")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="sst5, qqp: also each class's probability (columns prob_0, prob_1, ...; softmax of the logits)",
    )
    p.add_argument("--batch-size", type=checks.positive, default=None, help="default: the run's data.eval_batch_size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command; SIGTERM / SIGINT stop it with 143 / 130 and nothing written (the output file is
    written whole at the end, or not at all)."""
    with on_signals():
        try:
            return _main(argv)
        except Interrupted as err:
            print(f"peft-predict: {err}; nothing was written", file=sys.stderr)
            return err.exit_code


def _main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    quiet()
    try:
        checks.device(args.device)  # the options and the rows, before the model is loaded
        if args.out != "-":
            checks.out_file(args.out, inputs=(args.input,))
        if args.probabilities and TASKS[args.task].is_regression:
            raise ValueError(f"--probabilities: {args.task} is a regression (a score 0..5), it has no classes")
        warn_unfinished(args.run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(args.input)
            if args.input == "-":  # read once, then validate like any file (line numbers of stdin)
                source = Path(tmp) / "stdin.tsv"
                source.write_bytes(sys.stdin.buffer.read())
            split = read_file(source, TASKS[args.task], "input", labels=None, ids=False)
        run = load_run(args.run_dir, args.checkpoint, args.device)
        if args.task not in run.tasks:
            raise ValueError(f"--task {args.task}: this run was trained on {run.tasks}")
        probs = run.predict_split(split, args.batch_size, return_probs=True) if args.probabilities else None
        # one pass: with probabilities, the class is the most probable one (as the task's prediction)
        preds = (
            [max(range(len(p)), key=p.__getitem__) for p in probs]
            if probs
            else run.predict_split(split, args.batch_size)
        )
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"peft-predict: {err}", file=sys.stderr)
        return 2
    header = ["id", "prediction"]
    if probs is not None:
        header += [f"prob_{k}" for k in range(len(probs[0]))] if probs else []
    rows = [header]
    for i, (id_, p) in enumerate(zip(split.ids, preds)):
        rows.append([id_, format_prediction(p), *([f"{q:.6f}" for q in probs[i]] if probs is not None else [])])
    text = io.StringIO()
    csv.writer(text, delimiter="\t", lineterminator="\n").writerows(rows)
    if args.out == "-":
        sys.stdout.write(text.getvalue())
    else:
        try:
            atomic_write_text(Path(args.out), text.getvalue())
        except OSError as err:
            print(f"peft-predict: {describe_os_error(err)}", file=sys.stderr)
            return 1
    report = sys.stderr if args.out == "-" else sys.stdout
    print(f"{args.task}: {len(preds)} rows from {args.input} -> {args.out}", file=report)
    if split.labels is not None:
        metrics = run.metrics(args.task, preds, split.labels)
        print(json.dumps({"task": args.task, "rows": len(preds), **metrics}), file=report)
    return 0


def warn_unfinished(run_dir: Path) -> None:
    """A run that is not complete still predicts (its best epoch so far), with a word on stderr."""
    res = read_results(run_dir)
    if res is not None and res.get("status") != "complete":
        why = f" ({res['error']})" if res.get("error") else ""
        print(
            f"peft-predict: warning: {run_dir} is {res.get('status', 'not complete')}{why}; "
            "its checkpoint is the best epoch of an unfinished run",
            file=sys.stderr,
        )


if __name__ == "__main__":
    raise SystemExit(main())
