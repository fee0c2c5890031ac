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


def snapshot(*folders: Path, everything: bool = False) -> dict[str, str]:
    """Every file under the folders with the hash of its bytes; not (unless `everything`) the log,
    which every command appends to, nor Hydra's copy of the last command's config."""
    files = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and (everything or (p.name != "train.log" and ".hydra" not in p.parts)):
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
    (
        "a label out of range",
        ("data", lambda d: (d / "sst5" / "dev.tsv").write_text("id\tsentence\tlabel\na\tfine\t7\n")),
        [],
        "dev.tsv:2: field 'label': '7' is not a valid class; expected an integer class 0..4",
    ),
    (
        "a NaN score",
        ("data", lambda d: (d / "stsb" / "train.tsv").write_text("id\tsentence1\tsentence2\tscore\nx\ta\tb\tNaN\n")),
        [],
        "train.tsv:2: field 'score': 'NaN' is not finite",
    ),
    (
        "no test file",
        ("data", lambda d: (d / "qqp" / "test.tsv").unlink()),
        ["predict=true"],
        "qqp/test.tsv: file not found",
    ),
    (
        "an adapter option it lacks",
        None,
        ["adapter=prefix", "+adapter.depth=3"],
        "adapter.depth is not an option of Prefix",
    ),
    ("prefix length 0", None, ["adapter=prefix", "adapter.length=0"], "adapter.length must be a whole number >= 1"),
    ("no data folder", None, ["data.dir=/nonexistent"], "data directory /nonexistent does not exist"),
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
        before = snapshot(run, everything=True)
        assert any(".hydra" in name for name in before) and any(name.endswith("train.log") for name in before)
        capfd.readouterr()
        rc = run_main(args, monkeypatch)
        out = "".join(capfd.readouterr())
        assert rc == 2 and f"run directory {run} is in use by PID {holder.pid}" in out, out[-2000:]
        assert snapshot(run, everything=True) == before  # the running job's .hydra/ and train.log too
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
    """The checkpoint turns out not to fit (a weight missing) once the resume has started."""
    args, run = finished_run
    before = json.loads((run / "results.json").read_text())
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["state_dict"].pop(sorted(ckpt["state_dict"])[0])
    torch.save(ckpt, last)
    assert run_main(args, monkeypatch) == 2
    after = json.loads((run / "results.json").read_text())
    assert after["status"] == "failed" and "checkpoint weights do not fit this model" in after["error"]
    assert after["resume_failed"] == after["error"]
    assert after["history"] == before["history"] and after["best"] == before["best"] and len(after["history"]) == 2
    assert after["predictions"] == before["predictions"]


# (what differs, the command's extra overrides, what the message names)
OTHER_CONFIGS = [
    (
        "another strategy",
        ["adapter=prefix"],
        "adapter._target_: 'peft_lightning.adapters.LoRA' there, 'peft_lightning.adapters.Prefix' here",
    ),
    ("more epochs (budget)", ["trainer.max_epochs=3"], "trainer.max_epochs: 2 there, 3 here"),
    ("another data folder", ["data.dir=/nonexistent"], "data.dir: "),
]


@pytest.mark.parametrize("status", ["complete", "running"])
@pytest.mark.parametrize("what,extra,names", OTHER_CONFIGS, ids=[c[0] for c in OTHER_CONFIGS])
def test_a_folder_holding_another_config_stops_the_command_and_stays_as_it_was(
    finished_run, status, what, extra, names, monkeypatch, capfd
):
    """A complete run is not returned as this command's, an unfinished one is not resumed by it."""
    args, run = finished_run
    res = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**res, "status": status}))
    before = snapshot(run)
    capfd.readouterr()
    assert run_main([*args, *extra], monkeypatch) == 2
    out = "".join(capfd.readouterr())
    kind = "complete run" if status == "complete" else "running run this command would resume"
    assert f"{run} holds a {kind} of another training config (" in out and names in out, out[-2000:]
    assert "force=true trains this config there" in out and "Traceback" not in out
    assert snapshot(run) == before


def test_a_moved_run_resumes_with_its_best_epoch_and_its_best_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """Nothing learns (every lr 1e-30: below fp32 resolution): epoch 1 stays the best through the resume in a moved folder."""
    data = make_data_dir(tmp_path / "data")
    lrs = ("optim.lr=1e-30", "optim.adapter_lr=1e-30", "optim.head_lr=1e-30", "checkpoints=last")
    assert run_main(base_args(tiny_model_dir, data, tmp_path, "trainer.max_epochs=2", *lrs), monkeypatch) == 0
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    res["status"] = "running"  # as a 3-epoch run killed at the end of epoch 2
    res["config"]["trainer"]["max_epochs"] = 3
    (run / "results.json").write_text(json.dumps(res))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # epoch 2's: the true last
    moved = tmp_path / "moved"
    shutil.copytree(run, moved / "run")
    shutil.rmtree(run)
    assert run_main(base_args(tiny_model_dir, data, moved, "trainer.max_epochs=3", *lrs), monkeypatch) == 0
    res = json.loads((moved / "run" / "results.json").read_text())
    assert res["status"] == "complete" and len(res["history"]) == 3 and res["best"]["epoch"] == 1
    assert torch.load(moved / "run" / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0  # epoch 1's


def test_a_finished_run_does_what_the_command_adds_without_training_again(tiny_model_dir, tmp_path, monkeypatch):
    """predict=true after predict=false: test predictions from best.ckpt; logger=wandb added: a wandb
    run of the recorded epochs. Neither trains (best.ckpt and the history as they were)."""
    data = make_data_dir(tmp_path / "data")
    args = base_args(tiny_model_dir, data, tmp_path, "trainer.max_epochs=2")
    assert run_main(args, monkeypatch) == 0
    run = tmp_path / "run"
    before = json.loads((run / "results.json").read_text())
    best = (run / "checkpoints" / "best.ckpt").read_bytes()
    assert not list((run / "predictions").glob("*-test.tsv"))
    assert run_main([*args, "predict=true"], monkeypatch) == 0
    after = json.loads((run / "results.json").read_text())
    tests = sorted(p.name for p in (run / "predictions").glob("*-test.tsv"))
    assert tests == ["qqp-test.tsv", "sst5-test.tsv", "stsb-test.tsv"]
    assert {k for k in after["predictions"] if k.endswith("-test")} == {"sst5-test", "qqp-test", "stsb-test"}
    assert after["history"] == before["history"] and (run / "checkpoints" / "best.ckpt").read_bytes() == best
    rows = (run / "predictions" / "sst5-test.tsv").read_text().splitlines()
    assert rows[0] == "id\tprediction" and len(rows) == len((data / "sst5" / "test.tsv").read_text().splitlines())
    assert run_main([*args, "predict=true", "logger=wandb"], monkeypatch) == 0
    replayed = json.loads((run / "results.json").read_text())
    assert replayed["wandb_id"] and replayed["history"] == before["history"]
    offline = list((run / "wandb").glob(f"offline-run-*-{replayed['wandb_id']}"))
    assert len(offline) == 1, list((run / "wandb").glob("*"))
    # and the same command again does nothing new
    assert run_main([*args, "predict=true", "logger=wandb"], monkeypatch) == 0
    assert json.loads((run / "results.json").read_text()) == replayed


# ---- SIGTERM and SIGINT --------------------------------------------------------------------------


def _signal_in(monkeypatch, hook: str, signum: int, at: int, adapter: str | None = None) -> None:
    """The process sends itself `signum` in the `at`-th call of MultiTaskModule.<hook> (of `adapter`)."""
    from peft_lightning.module import MultiTaskModule

    real, calls = getattr(MultiTaskModule, hook), []

    def step(self, *args, **kwargs):
        if adapter is None or self.model.adapter.name == adapter:
            calls.append(1)
            if len(calls) == at:
                os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MultiTaskModule, hook, step)


@pytest.mark.parametrize(
    "signum,code,hook", [(signal.SIGINT, 130, "training_step"), (signal.SIGTERM, 143, "predict_step")]
)
def test_a_signal_records_interrupted_and_exits_with_its_code(
    signum, code, hook, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    data = make_data_dir(tmp_path / "data")
    args = [*base_args(tiny_model_dir, data, tmp_path, "trainer.max_epochs=2"), "predict=true"]
    _signal_in(monkeypatch, hook, signum, at=3)  # training: in epoch 2 (2 steps an epoch); predict: the 3rd batch
    assert run_main(args, monkeypatch) == code
    out = "".join(capfd.readouterr())
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    name = signal.Signals(signum).name
    assert res["status"] == "interrupted" and res["error"] == f"interrupted by {name}"
    assert f"run interrupted: interrupted by {name} (the same command resumes it)" in out
    assert len(res["history"]) == (1 if hook == "training_step" else 2)
    assert not list((tmp_path / "run" / "predictions").glob("*-test.tsv"))  # no half set of predictions
    monkeypatch.undo()  # the same command, not interrupted, resumes and completes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_main(args, monkeypatch) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "complete" and [h["epoch"] for h in res["history"]] == [1, 2]


TERM_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from peft_lightning.module import MultiTaskModule
    hook = "predict_step" if os.environ["PEFT_TEST_TERM"] == "predict" else "training_step"
    adapter = os.environ.get("PEFT_TEST_TERM_ADAPTER")
    real, calls = getattr(MultiTaskModule, hook), []
    def step(self, *args, **kwargs):
        if adapter is None or self.model.adapter.name == adapter:
            calls.append(1)
            if len(calls) == 3:  # training: in epoch 2 (2 steps an epoch); predict: the 3rd batch
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)
    setattr(MultiTaskModule, hook, step)
    from peft_lightning.train import main
    sys.argv = ["peft-train", *sys.argv[1:]]
    main()
    """
)


def _term(args: list[str], cwd: Path, where: str, adapter: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.update(PEFT_TEST_TERM=where, **({"PEFT_TEST_TERM_ADAPTER": adapter} if adapter else {}))
    return subprocess.run(
        [sys.executable, "-c", TERM_DRIVER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("where", ["predict"])  # training: the sweep's job 2 below (also a real process)
def test_sigterm_is_recorded_and_the_same_command_resumes_to_the_same_predictions(
    where, uninterrupted, tiny_model_dir, tmp_path
):
    data, ref, expected = uninterrupted
    args = _kill_args(tiny_model_dir, data, tmp_path / "t")
    stopped = _term(args, tmp_path, where)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "peft-train: interrupted by SIGTERM; the same command resumes it" in stopped.stderr
    run = tmp_path / "t" / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "interrupted" and res["error"] == "interrupted by SIGTERM"
    rerun = _cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "complete" and res["best"]["dev"] == ref["best"]["dev"]
    assert _whole_files(run) == expected


@pytest.mark.slow
def test_sigterm_inside_a_three_job_sweep_stops_it_and_the_same_command_finishes_it(
    uninterrupted, tiny_model_dir, tmp_path
):
    data, ref, expected = uninterrupted
    sweep = tmp_path / "sweep"
    args = [a for a in _kill_args(tiny_model_dir, data, tmp_path) if not a.startswith("hydra.run.dir")]
    args = ["-m", *args, f"hydra.sweep.dir={sweep}", "adapter=frozen,lora,prefix"]
    stopped = _term(args, tmp_path, "training", adapter="lora")  # job 2 of 3
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    status = {p.parent.name.split(",")[0]: json.loads(p.read_text())["status"] for p in sweep.glob("*/results.json")}
    assert status == {"adapter=frozen": "complete", "adapter=lora": "interrupted"}  # job 3 never started
    rerun = _cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "sweep: 3 of 3 complete" in rerun.stdout + rerun.stderr
    status = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/results.json")}
    assert set(status.values()) == {"complete"} and len(status) == 3
    (lora,) = sweep.glob("adapter=lora,*")
    assert _whole_files(lora) == expected  # as the uninterrupted run's


# ---- the commands' options, checked before any work ----------------------------------------------

NO_CUDA = not torch.cuda.is_available()


def case_ids(cases: list) -> list[str]:
    return [c.values[0] if hasattr(c, "marks") else c[0] for c in cases]


# (case, the command's arguments after RUN (<in>: an input TSV, <file>: a plain file), exit code, message)
PREDICT_CASES = [
    ("--out is a folder", ["--out", "<dir>"], 2, "is a folder; give a file name"),
    ("--out under a file", ["--out", "<file>/p.tsv"], 2, "is a file, not a folder"),
    ("--out is the input", ["--out", "<in>"], 2, "is the input file: writing it would replace the rows"),
    ("--batch-size -3", ["--out", "<new>", "--batch-size", "-3"], 2, "must be a whole number >= 1, got '-3'"),
    ("--device banana", ["--out", "<new>", "--device", "banana"], 2, "--device 'banana' is not a device"),
    pytest.param(
        "--device cuda without CUDA",
        ["--out", "<new>", "--device", "cuda"],
        2,
        "this machine has no CUDA device",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
    ),
]


@pytest.mark.parametrize("case,extra,code,message", PREDICT_CASES, ids=case_ids(PREDICT_CASES))
def test_peft_predict_checks_its_options_before_predicting(finished_run, case, extra, code, message, tmp_path, capfd):
    from peft_lightning.predict import main as predict

    _, run = finished_run
    source = tmp_path / "in.tsv"
    shutil.copy(run.parent / "data" / "sst5" / "dev.tsv", source)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("a file\n")
    where = {"<in>": str(source), "<dir>": str(tmp_path / "dir"), "<new>": str(tmp_path / "new.tsv")}
    args = [where.get(a, a.replace("<file>", str(tmp_path / "file"))) for a in extra]
    before = snapshot(tmp_path)
    capfd.readouterr()
    try:
        rc = predict([str(run), "--task", "sst5", "--input", str(source), *args])
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    err = capfd.readouterr().err
    assert rc == code and message in err and "Traceback" not in err, err[-2000:]
    assert snapshot(tmp_path) == before  # the input, the folder, the file: as they were; nothing new


def test_peft_predict_on_an_unfinished_run_says_so_and_predicts(finished_run, tmp_path, capfd):
    from peft_lightning.predict import main as predict

    _, run = finished_run  # its results.json says running
    out = tmp_path / "p.tsv"
    assert (
        predict(
            [str(run), "--task", "sst5", "--input", str(run.parent / "data" / "sst5" / "dev.tsv"), "--out", str(out)]
        )
        == 0
    )
    assert f"warning: {run} is running; its checkpoint is the best epoch of an unfinished run" in capfd.readouterr().err
    assert out.read_text().startswith("id\tprediction\n")


def _init_from(folder: Path, what: str) -> None:
    """A PEFT LoRA adapter folder with one thing wrong."""
    folder.mkdir()
    good = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["query"]}
    config = {
        "not an object": b"[1, 2]",
        "no lora_alpha": json.dumps({k: v for k, v in good.items() if k != "lora_alpha"}).encode(),
        "lora_alpha not a number": json.dumps({**good, "lora_alpha": "eight"}).encode(),
        "not UTF-8": b'{"peft_type": "LORA", "note": "caf\xe9"}',
        "broken safetensors": json.dumps(good).encode(),
    }[what]
    (folder / "adapter_config.json").write_bytes(config)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")


INIT_FROM = [
    ("not an object", "adapter_config.json: expected a JSON object (PEFT's adapter config), got a list"),
    ("no lora_alpha", "adapter_config.json: field 'lora_alpha' should be a number, got null"),
    ("lora_alpha not a number", "adapter_config.json: field 'lora_alpha' should be a number, got \"eight\""),
    ("not UTF-8", "adapter_config.json: not UTF-8 (byte 0xe9 at offset 34)"),
    ("broken safetensors", "adapter_model.safetensors: cannot be read as safetensors, truncated or corrupt"),
]


@pytest.mark.parametrize("what,message", INIT_FROM, ids=[c[0] for c in INIT_FROM])
def test_a_bad_init_from_folder_is_one_message_naming_its_file(
    what, message, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    data = make_data_dir(tmp_path / "data")
    _init_from(tmp_path / "peft", what)
    if what == "broken safetensors":  # this one is otherwise right: rank and scale match the command's
        extra = ["adapter.rank=8", "adapter.scaling=alpha_over_r", "adapter.alpha=8"]
    else:
        extra = []
    capfd.readouterr()
    rc = run_main(
        base_args(tiny_model_dir, data, tmp_path, f"adapter.init_from={tmp_path / 'peft'}", *extra), monkeypatch
    )
    out = "".join(capfd.readouterr())
    assert rc == 2 and str(tmp_path / "peft") in out and message in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


TRAIN_OPTIONS = [
    (
        "a misspelt Trainer option",
        ["+trainer.max_epoch=1"],
        "trainer.max_epoch is not an option of Lightning's Trainer; did you mean trainer.max_epochs?",
    ),
    pytest.param(
        "trainer=gpu_fast on a CPU",
        ["trainer=gpu_fast"],
        "trainer.accelerator=gpu (trainer=gpu_fast asks for it) but this machine has no CUDA device",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
    ),
]


@pytest.mark.parametrize("case,extra,message", TRAIN_OPTIONS, ids=case_ids(TRAIN_OPTIONS))
def test_trainer_options_are_checked_before_any_data_is_read(
    case, extra, message, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    data = make_data_dir(tmp_path / "data")
    capfd.readouterr()
    rc = run_main(base_args(tiny_model_dir, data, tmp_path, *extra), monkeypatch)
    out = "".join(capfd.readouterr())
    assert rc == 2 and message in out and "Traceback" not in out, out[-2000:]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "checkpoints").exists()  # no data read
    assert (
        json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"
    )  # a sweep's report shows it


OTHER_COMMANDS = [
    (
        "peft-reproduce budget=smoek",
        "peft_lightning.reproduce",
        ["budget=smoek"],
        1,
        "budget='smoek' is unknown; budgets: cpu, paper, quick, smoke",
    ),
    (
        "peft-tune tune.strategy=[lora]",
        "peft_lightning.tune",
        ["tune.strategy=[lora]", "plan=true"],
        2,
        "Could not override 'tune.strategy'",
    ),
    (
        "peft-data offline",
        "peft_lightning.data.hub",
        ["--out", "<tmp>/data"],
        1,
        "could not download sst5, qqp, stsb from the Hugging Face hub (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)",
    ),
    pytest.param(
        "peft-bench --device cuda without CUDA",
        "peft_lightning.bench",
        ["--device", "cuda"],
        2,
        "--device cuda: this machine has no CUDA device",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
    ),
]


@pytest.mark.parametrize(
    "case,module,args,code,message",
    OTHER_COMMANDS,
    ids=case_ids(OTHER_COMMANDS),
)
def test_other_commands_say_what_is_wrong_in_one_message(
    case, module, args, code, message, tmp_path, monkeypatch, capfd
):
    import importlib

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = importlib.import_module(module).main
    capfd.readouterr()
    try:
        rc = main([a.replace("<tmp>", str(tmp_path)) for a in args]) or 0
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else (print(exit_.code, file=sys.stderr) or 1)
    err = "".join(capfd.readouterr())
    assert rc == code and message in err and "Traceback" not in err, err[-2000:]
    if case == "peft-tune tune.strategy=[lora]":
        assert "did you mean tune.strategies?" in err
    assert not (tmp_path / "data").exists()


def test_a_failing_job_does_not_stop_the_sweep_which_exits_1_and_says_k_of_n(
    tiny_model_dir, tmp_path, monkeypatch, capfd
):
    from peft_lightning.report import build_report

    data = make_data_dir(tmp_path / "data")
    args = [a for a in base_args(tiny_model_dir, data, tmp_path) if not a.startswith("hydra.run.dir")]
    sweep = ["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep' / 'lora_rank'}", "adapter=lora", "adapter.rank=0,2"]
    capfd.readouterr()
    rc = run_main(sweep, monkeypatch)
    out = "".join(capfd.readouterr())
    assert rc == 1 and "sweep: 1 of 2 complete (1 failed)" in out, out[-2000:]
    runs = {p.parent.name.split(",")[0]: json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("results.json")}
    assert runs["adapter.rank=2"]["status"] == "complete"  # the job after the failed one ran
    assert (
        runs["adapter.rank=0"]["status"] == "failed"
        and "rank must be a whole number >= 1" in runs["adapter.rank=0"]["error"]
    )
    assert (
        "failed: ValueError: adapter.rank must be a whole number >= 1" in build_report(tmp_path / "sweep").read_text()
    )
    # every job failing: still exit 1, and "0 of 2"
    (data / "qqp" / "dev.tsv").write_text("id\tsentence1\tsentence2\tlabel\n1\ta\tb\t2\n")  # a bad label
    capfd.readouterr()
    rc = run_main(["-m", *args, f"hydra.sweep.dir={tmp_path / 'bad'}", "adapter=lora,frozen"], monkeypatch)
    out = "".join(capfd.readouterr())
    assert rc == 1 and "sweep: 0 of 2 complete (2 failed)" in out, out[-2000:]
    statuses = [json.loads(p.read_text())["status"] for p in (tmp_path / "bad").glob("*/results.json")]
    assert statuses == ["failed", "failed"]


@pytest.mark.parametrize("where", ["checkpoint", "predictions", "everywhere"])
def test_a_full_disk_is_named_recorded_and_one_message(where, tiny_model_dir, tmp_path, monkeypatch, capfd):
    import errno

    from peft_lightning import files

    data = make_data_dir(tmp_path / "data")
    real = files.atomic_write

    def full(path, *args, **kwargs):
        suffix = {"checkpoint": ".ckpt", "predictions": ".tsv", "everywhere": ""}[where]
        if str(path).endswith(suffix) and "cache" not in Path(path).parts:
            raise files.WriteError(errno.ENOSPC, f"{path}: could not be written: disk full")
        return real(path, *args, **kwargs)

    def full_text(path, text):
        return full(path, lambda f: f.write(text))

    for module in ("peft_lightning.rundir", "peft_lightning.results"):
        monkeypatch.setattr(f"{module}.atomic_write", full)
    if where == "everywhere":  # results.json cannot be written either: the run's own error is still said
        for module in ("peft_lightning.results", "peft_lightning.train"):
            monkeypatch.setattr(f"{module}.atomic_write_text", full_text)
    capfd.readouterr()
    rc = run_main(base_args(tiny_model_dir, data, tmp_path), monkeypatch)
    out = "".join(capfd.readouterr())
    name = {"checkpoint": "checkpoints/", "predictions": "predictions/", "everywhere": ".hydra/config.yaml"}[where]
    assert rc == 1 and "run failed: " in out and ": could not be written: disk full" in out and name in out, out[-2000:]
    assert "Traceback" not in out
    if where == "everywhere":
        assert "could not record the run's failed in" in out and not (tmp_path / "run" / "results.json").exists()
        return
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (
        res["status"] == "failed" and res["error"].endswith("could not be written: disk full") and name in res["error"]
    )


def test_atomic_write_names_the_file_and_says_disk_full(tmp_path, monkeypatch):
    import errno

    from peft_lightning.files import WriteError, atomic_write_text

    (tmp_path / "old.txt").write_text("kept")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(WriteError, match=r"old\.txt: could not be written: disk full"):
        atomic_write_text(tmp_path / "old.txt", "new")
    assert (tmp_path / "old.txt").read_text() == "kept" and not list(tmp_path.glob(".*.tmp"))


EXPORT_CASES = [
    ("--out is a file", "<file>", [], "--out <file> is a file; give a folder"),
    ("--out under a file", "<file>/export", [], "cannot be written"),
    ("--out not empty", "<full>", [], "is not empty (1 entries); an export there would mix with them"),
]


@pytest.mark.parametrize("case,out,extra,message", EXPORT_CASES, ids=case_ids(EXPORT_CASES))
def test_peft_export_checks_its_out_folder_before_exporting(finished_run, case, out, extra, message, tmp_path, capfd):
    from peft_lightning.export import main as export

    _, run = finished_run
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("kept\n")
    where = out.replace("<file>", str(tmp_path / "file")).replace("<full>", str(tmp_path / "full"))
    before = snapshot(tmp_path, everything=True)
    capfd.readouterr()
    assert export([str(run), "--out", where, *extra]) == 2
    err = capfd.readouterr().err
    expected = message.replace("<file>", str(tmp_path / "file"))
    assert expected in err and "Traceback" not in err, err[-2000:]
    assert snapshot(tmp_path, everything=True) == before  # nothing written, nothing left behind


def test_peft_reproduces_last_line_counts_what_did_not_complete(tmp_path):
    """peft-reproduce's "k of N jobs complete": failed, interrupted and never-run jobs are named as such."""
    import io

    from peft_lightning.plan import Job, Progress

    jobs = [Job("main", [], tmp_path / name, "lora", 1) for name in ("a", "b", "c", "d")]
    out = io.StringIO()
    progress = Progress(jobs, out=out)
    for job, status in zip(jobs, ("complete", "failed", "interrupted")):
        job.run_dir.mkdir()
        (job.run_dir / "results.json").write_text(json.dumps({"status": status}))
    progress.poll()
    assert progress.tally() == "1 of 4 jobs complete (1 failed, 1 interrupted, 1 not run)"
    assert len(out.getvalue().splitlines()) == 3  # a progress line for each job that ended
    for job in jobs[:3]:
        (job.run_dir / "results.json").write_text(json.dumps({"status": "failed"}))
    assert Progress(jobs, out=io.StringIO()).tally() == "0 of 4 jobs complete (4 not run)"
