"""Bad inputs and faults: one clear message and exit code 2, and nothing already written changed.

Each case runs `peft-train`'s real Hydra entry point in this process (as the command line would,
`sys.exit(2)` included) on the tiny model and synthetic data; the kill -9 cases are subprocesses
and marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_data_dir

from peft_lightning.data import read_split
from peft_lightning.data.encoded import encode_split
from peft_lightning.tasks import TASKS


def run_main(args: list[str], monkeypatch) -> int:
    """`peft-train ARGS` in this process; its exit code."""
    from hydra.core.global_hydra import GlobalHydra

    from peft_lightning import train

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["peft-train", *args])
    try:
        train.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with the hash of its bytes; not the log, which every command
    appends to, nor Hydra's copy of the last command's config."""
    files = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.name != "train.log" and ".hydra" not in p.parts:
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def base_args(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=local",
        f"model.source={model_dir}",
        f"data.dir={data_dir}",
        f"data.cache_dir={out / 'cache'}",
        f"hydra.run.dir={out / 'run'}",
        "data.max_length=64",
        "data.limit_train=16",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "predict=false",
        *extra,
    ]


def _no_config(model: Path) -> None:
    (model / "config.json").unlink()


def _no_weights(model: Path) -> None:
    for p in model.glob("*.safetensors"):
        p.unlink()


def _latin1(data: Path) -> None:
    path = data / "sst5" / "train.tsv"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:9] + b"caf\xe9" + lines[2][9:]  # line 3, a Latin-1 e-acute
    path.write_bytes(b"\n".join(lines))


# (what is broken, how to break a copy of the model folder or the data, extra overrides, the message)
BAD_INPUTS = [
    (
        "no such model folder",
        None,
        ["model.source=/nonexistent/bert"],
        "model.source /nonexistent/bert: no such folder",
    ),
    ("model folder without config.json", ("model", _no_config), [], "the folder lacks config.json"),
    ("model folder without weights", ("model", _no_weights), [], "the folder lacks weights (one of model.safetensors"),
    ("data file not UTF-8", ("data", _latin1), [], "sst5/train.tsv:3: byte 0xe9 at column 13 is not UTF-8"),
    ("zero epochs", None, ["trainer.max_epochs=0"], "trainer.max_epochs must be a whole number >= 1, got 0"),
]


@pytest.mark.parametrize("what,breaks,extra,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_clear_message(what, breaks, extra, message, tiny_model_dir, tmp_path, monkeypatch, capfd):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = make_data_dir(tmp_path / "data")
    if breaks:
        breaks[1](model if breaks[0] == "model" else data)
    before = snapshot(model, data)
    rc = run_main(base_args(model, data, tmp_path, *extra), monkeypatch)
    out = "".join(capfd.readouterr())
    assert rc == 2, out[-2000:]
    assert message in out and "Traceback" not in out
    assert snapshot(model, data) == before
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_ends_with_a_summary_on_the_terminal_and_in_train_log(tiny_model_dir, tmp_path, monkeypatch, capfd):
    data = make_data_dir(tmp_path / "data")
    assert run_main(base_args(tiny_model_dir, data, tmp_path, "predict=true"), monkeypatch) == 0
    out = "".join(capfd.readouterr())
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    best = res["best"]
    block = [
        f"run complete: {run}",
        f"  best epoch {best['epoch']} of 1, dev avg {best['dev_avg']:.4f}",
        f"  dev sst5  acc {best['dev']['sst5']['acc']:.4f}",
        f"  dev stsb  pearson {best['dev']['stsb']['pearson']:.4f}",
        "  test predictions (from best.ckpt): predictions/qqp-test.tsv, predictions/sst5-test.tsv, "
        "predictions/stsb-test.tsv",
        f"  results: {run / 'results.json'}",
    ]
    log = (run / "train.log").read_text()
    for line in block:
        assert line in out and line in log, line
    # a failed run says the error and where its results.json is
    (data / "qqp" / "dev.tsv").write_text("id\tsentence1\tsentence2\tlabel\n1\ta\tb\t2\n")
    assert run_main(base_args(tiny_model_dir, data, tmp_path, "force=true"), monkeypatch) == 2
    out = "".join(capfd.readouterr())
    assert (
        "qqp/dev.tsv:2: field 'label': '2' is not a valid class" in out and f"  results: {run / 'results.json'}" in out
    )
    assert json.loads((run / "results.json").read_text())["status"] == "failed"


@pytest.fixture
def finished_run(tiny_model_dir, tmp_path, monkeypatch):
    """A complete two-epoch run whose last epoch is then marked as unfinished (as after a kill)."""
    data = make_data_dir(tmp_path / "data")
    args = base_args(tiny_model_dir, data, tmp_path, "trainer.max_epochs=2", "checkpoints=last")
    assert run_main(args, monkeypatch) == 0
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and (run / "checkpoints" / "last.ckpt").is_file()
    res["status"] = "running"
    (run / "results.json").write_text(json.dumps(res))
    return args, run


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_last_checkpoint_names_the_file_and_the_way_out(finished_run, damage, monkeypatch, capfd):
    args, run = finished_run
    last = run / "checkpoints" / "last.ckpt"
    blob = last.read_bytes()
    last.write_bytes(blob[: len(blob) // 3] if damage == "truncated" else b"\x00not a zip" * 100)
    before = snapshot(run)
    capfd.readouterr()
    rc = run_main(args, monkeypatch)
    out = "".join(capfd.readouterr())
    assert rc == 2, out[-2000:]
    assert f"{last}: cannot be read as a checkpoint, it is truncated or corrupt" in out
    assert "ckpt_path=null" in out and "Traceback" not in out
    assert snapshot(run) == before  # best.ckpt, results.json and the broken file itself as they were
    # the way out: start over in the same folder
    assert run_main([*args, "ckpt_path=null"], monkeypatch) == 0
    assert json.loads((run / "results.json").read_text())["status"] == "complete"
    assert torch.load(last, weights_only=False)["epoch"] == 1  # a whole new checkpoint of epoch 2


def test_a_second_command_into_a_run_in_use_stops_with_its_pid(finished_run, monkeypatch, capfd):
    args, run = finished_run
    lock = run / ".lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        capfd.readouterr()
        rc = run_main(args, monkeypatch)
        out = "".join(capfd.readouterr())
        assert rc == 2 and f"run directory {run} is in use by PID {holder.pid}" in out, out[-2000:]
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking: its lock file is stale, and the next run takes it
    assert lock.read_text().strip() == str(holder.pid)
    assert run_main(args, monkeypatch) == 0
    assert json.loads((run / "results.json").read_text())["status"] == "complete"


def test_an_output_folder_that_cannot_be_written_stops_before_training(
    tiny_model_dir, data_dir, tmp_path, monkeypatch, capfd
):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder's parent should be")
    args = base_args(tiny_model_dir, data_dir, tmp_path, f"output_dir={blocker / 'run'}")
    rc = run_main(args, monkeypatch)
    out = "".join(capfd.readouterr())
    assert rc == 2 and f"output folder {blocker / 'run'} cannot be written (Not a directory)" in out, out[-2000:]
    assert not (tmp_path / "cache").exists()  # stopped before reading or tokenising any data
    assert blocker.read_text().startswith("a file where")


def test_a_utf8_file_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    data = make_data_dir(tmp_path / "data")
    plain = read_split(data, TASKS["sst5"], "dev")
    path = data / "sst5" / "dev.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    marked = read_split(data, TASKS["sst5"], "dev")
    assert marked.ids == plain.ids and marked.texts == plain.texts and marked.labels == plain.labels


def test_crlf_line_ends_read_like_lf(tmp_path):
    data = make_data_dir(tmp_path / "data")
    plain = read_split(data, TASKS["qqp"], "train")
    path = data / "qqp" / "train.tsv"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    crlf = read_split(data, TASKS["qqp"], "train")
    assert crlf.ids == plain.ids and crlf.texts == plain.texts and crlf.labels == plain.labels


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_a_corrupt_token_cache_entry_is_rebuilt_never_used(damage, tiny_tokenizer, tmp_path, caplog):
    data = make_data_dir(tmp_path / "data")
    split = read_split(data, TASKS["stsb"], "train")
    fresh = encode_split(split, tiny_tokenizer, 64, "separate", tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.pt")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:-200])
    else:  # loads fine, with other token ids: only the checksum tells
        saved = torch.load(entry, weights_only=True)
        saved["segments"][0]["ids"][5] += 1
        torch.save(saved, entry)
    with caplog.at_level("WARNING"):
        again = encode_split(split, tiny_tokenizer, 64, "separate", tmp_path / "cache")
    assert f"token cache {entry}" in caplog.text and "rebuilding it" in caplog.text
    for a, b in zip(again.segments, fresh.segments):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.offsets, b.offsets)
    # and the rebuilt entry is whole again: read without a warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        encode_split(split, tiny_tokenizer, 64, "separate", tmp_path / "cache")
    assert "token cache" not in caplog.text


# ---- kill -9 in the middle of a write (subprocesses) ------------------------------------------

# Runs peft-train with one function wrapped so that the process kills itself (SIGKILL) half-way:
# `checkpoint`: while the first checkpoint of epoch 2 is being written, after half its bytes;
# `predict`: in the third prediction batch.
DRIVER = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    where = os.environ["PEFT_TEST_KILL"]
    if where == "checkpoint":
        real_save = torch.save
        def dying_save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "state_dict" in obj and obj.get("epoch") == 1:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
    else:
        from peft_lightning.module import MultiTaskModule
        real_step = MultiTaskModule.predict_step
        calls = []
        def dying_step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, *args, **kwargs)
        MultiTaskModule.predict_step = dying_step
    from peft_lightning.train import main
    sys.argv = ["peft-train", *sys.argv[1:]]
    main()
    """
)


def _cli(args: list[str], cwd: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "peft_lightning.train", *args]
    if kill:
        env["PEFT_TEST_KILL"] = kill
        cmd = [sys.executable, "-c", DRIVER, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _whole_files(run: Path) -> dict[str, bytes]:
    """The run's predictions, and a check that no partial file is left anywhere in it."""
    assert not list(run.rglob("*.tmp")), list(run.rglob("*.tmp"))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        torch.load(ckpt, weights_only=False)  # loads: whole
    json.loads((run / "results.json").read_text())
    return {p.name: p.read_bytes() for p in sorted((run / "predictions").glob("*.tsv"))}


def _kill_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [*base_args(model_dir, data, out, "trainer.max_epochs=2"), "predict=true", "data.eval_batch_size=4"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """Synthetic data and the predictions of an uninterrupted two-epoch run on it."""
    root = tmp_path_factory.mktemp("kill")
    data = make_data_dir(root / "data")
    reference = _cli(_kill_args(tiny_model_dir, data, root / "ref"), root)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = root / "ref" / "run"
    expected = _whole_files(run)
    splits = ("dev", "select", "train_eval", "test")  # the selection split and train_eval sample are written like dev
    assert set(expected) == {f"{t}-{s}.tsv" for t in ("sst5", "qqp", "stsb") for s in splits}
    return data, json.loads((run / "results.json").read_text()), expected


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["checkpoint", "predict"])
def test_kill_9_mid_write_then_rerun_completes_with_whole_files(kill, uninterrupted, tiny_model_dir, tmp_path):
    data, ref, expected = uninterrupted
    args = _kill_args(tiny_model_dir, data, tmp_path / "k")
    killed = _cli(args, tmp_path, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "k" / "run"
    assert json.loads((run / "results.json").read_text())["status"] == "running"
    if kill == "checkpoint":
        assert list((run / "checkpoints").glob(".*.tmp")), "the kill should leave a partial temporary file"
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0  # epoch 1's, whole
    else:
        assert not (run / "predictions").exists()

    rerun = _cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and [h["select"] for h in res["history"]] == [
        h["select"] for h in ref["history"]
    ]
    assert res["best"]["dev"] == ref["best"]["dev"]
    assert _whole_files(run) == expected


class _Touch:
    """Unpickling this creates a file: what a malicious checkpoint's payload would do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("where", ["load_run", "peft-predict", "peft-export", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(
    finished_run, where, monkeypatch, capfd, tmp_path
):
    args, run = finished_run
    marker = tmp_path / "pwned"
    which = "last" if where == "resume" else "best"
    ckpt = torch.load(run / "checkpoints" / f"{which}.ckpt", weights_only=True)
    ckpt["peft_lightning"]["payload"] = _Touch(marker)
    torch.save(ckpt, run / "checkpoints" / f"{which}.ckpt")
    results_before = (run / "results.json").read_bytes()
    if where == "load_run":
        from peft_lightning import load_run
        from peft_lightning.rundir import RunDirError

        with pytest.raises(RunDirError, match=r"best\.ckpt: refused: it holds objects other than tensors"):
            load_run(run)
    elif where == "peft-predict":
        from peft_lightning.predict import main as predict

        out = tmp_path / "p.tsv"
        assert (
            predict(
                [
                    str(run),
                    "--task",
                    "sst5",
                    "--input",
                    str(run.parent / "data" / "sst5" / "dev.tsv"),
                    "--out",
                    str(out),
                ]
            )
            == 2
        )
        assert "best.ckpt: refused: it holds objects other than tensors" in capfd.readouterr().err and not out.exists()
    elif where == "peft-export":
        from peft_lightning.export import main as export

        assert export([str(run), "--out", str(tmp_path / "export"), "--merged"]) == 2
        assert "best.ckpt: refused: it holds objects other than tensors" in capfd.readouterr().err
    else:
        assert run_main(args, monkeypatch) == 2
        said = capfd.readouterr()
        assert "last.ckpt: refused: it holds objects other than tensors" in said.out + said.err
        assert (run / "results.json").read_bytes() == results_before  # the interrupted run's record kept
    assert not marker.exists()  # the payload never ran


def test_a_diverged_run_stops_as_failed_at_its_step(tiny_model_dir, tmp_path, monkeypatch, capfd):
    data = make_data_dir(tmp_path / "data")
    args = base_args(tiny_model_dir, data, tmp_path, "adapter=full", "optim.lr=1e30", "optim.head_lr=1e30")
    capfd.readouterr()
    assert run_main(args, monkeypatch) == 1
    err = "".join(capfd.readouterr())
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "failed" and res["error"].startswith("DivergedError: diverged at step ")
    assert "run failed: DivergedError: diverged at step" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "predictions").exists()  # no predictions of a diverged model


def test_last_checkpoint_is_the_last_epoch_when_the_best_is_an_earlier_one(tiny_model_dir, tmp_path, monkeypatch):
    """With nothing learning (every lr 1e-30: below fp32 resolution), epoch 1 stays the best: last.ckpt must still be epoch 3's."""
    data = make_data_dir(tmp_path / "data")
    lrs = ("optim.lr=1e-30", "optim.adapter_lr=1e-30", "optim.head_lr=1e-30")
    args = base_args(tiny_model_dir, data, tmp_path, "trainer.max_epochs=3", "checkpoints=last", *lrs)
    assert run_main(args, monkeypatch) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["best"]["epoch"] == 1 and len(res["history"]) == 3
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == res["steps"]  # epoch 3 (0-based 2), every step
    assert best["epoch"] == 0 and "optimizer_states" in last and "optimizer_states" not in best


def test_a_resume_that_fails_keeps_the_record_it_resumed_from(finished_run, monkeypatch, capfd):
    args, run = finished_run
    before = json.loads((run / "results.json").read_text())
    assert run_main([*args, "adapter=prefix"], monkeypatch) == 2  # another strategy pointed at the folder
    after = json.loads((run / "results.json").read_text())
    assert after["status"] == "failed" and "checkpoint does not match" in after["error"]
    assert after["resume_failed"] == after["error"]
    assert after["history"] == before["history"] and after["best"] == before["best"] and len(after["history"]) == 2
    assert after["predictions"] == before["predictions"]


def test_a_moved_run_resumes_with_its_best_epoch_and_its_best_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """Nothing learns (every lr 1e-30: below fp32 resolution): epoch 1 stays the best through the resume in a moved folder."""
    data = make_data_dir(tmp_path / "data")
    lrs = ("optim.lr=1e-30", "optim.adapter_lr=1e-30", "optim.head_lr=1e-30", "checkpoints=last")
    assert run_main(base_args(tiny_model_dir, data, tmp_path, "trainer.max_epochs=2", *lrs), monkeypatch) == 0
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    res["status"] = "running"  # as after a kill at the end of epoch 2
    (run / "results.json").write_text(json.dumps(res))
    moved = tmp_path / "moved"
    shutil.copytree(run, moved / "run")
    shutil.rmtree(run)
    assert run_main(base_args(tiny_model_dir, data, moved, "trainer.max_epochs=3", *lrs), monkeypatch) == 0
    res = json.loads((moved / "run" / "results.json").read_text())
    assert res["status"] == "complete" and len(res["history"]) == 3 and res["best"]["epoch"] == 1
    assert torch.load(moved / "run" / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0  # epoch 1's
