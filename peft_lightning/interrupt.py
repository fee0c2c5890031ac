"""SIGTERM and SIGINT: a run records `interrupted` and the command ends with 143 or 130.

Lightning turns SIGTERM into a `SystemExit` with no code (exit 0, a preempted run looks finished)
and Ctrl-C during `fit` into `sys.exit(1)`; during prediction it ignores SIGTERM. `on_signals()`
installs handlers (main thread only) that raise `Interrupted` where the signal arrives: training,
validation, prediction, data loading or between the jobs of a sweep. It is a `BaseException` that
is not a `KeyboardInterrupt`, so neither Lightning nor Hydra turns it into something else; the run
records it (`results.json` status `interrupted`) and the entry point exits with `128 + signal`.
Lightning's own SIGTERM handler still runs first (it stops DDP children). A second signal while
the first is being recorded is ignored, so the record is written whole; `kill -9` always works.

`forward(cmd)` runs a child command (a sweep of `peft-reproduce`) and passes the signal on to it,
so the child records its run before both exit.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("peft_lightning")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The process got SIGTERM or SIGINT."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"stopping": None}


def _handler(signum, frame) -> None:
    if _state["stopping"] is not None:
        log.warning("%s again: already stopping (kill -9 stops at once)", signal.Signals(signum).name)
        return
    _state["stopping"] = signum
    raise Interrupted(signum)


@contextmanager
def on_signals() -> Iterator[None]:
    """SIGTERM / SIGINT raise `Interrupted` inside the block (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in SIGNALS}
    _state["stopping"] = None
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def exit_interrupted(err: Interrupted, what: str = "") -> None:
    """The last line of an interrupted command, and its exit code (143 SIGTERM, 130 SIGINT)."""
    print(f"{what or 'interrupted'}: {err}; the same command resumes it", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)


def run_command(prog: str, main, argv: list[str] | None, usage_errors: tuple = ()) -> None:
    """`main(argv)` as the command `prog`: SIGTERM / SIGINT end it with 143 / 130 (`exit_interrupted`),
    an error of `usage_errors` with its message and exit 2."""
    with on_signals():
        try:
            main(argv)
        except Interrupted as err:
            exit_interrupted(err, prog)
        except usage_errors as err:
            print(f"{prog}: {err}", file=sys.stderr)
            sys.exit(2)


def forward(cmd: list[str]) -> int:
    """`subprocess.run(cmd).returncode`, except that an interruption of this process is passed on to
    the child, which records its run and exits, before this process goes on interrupted."""
    child = subprocess.Popen(cmd)
    try:
        return child.wait()
    except Interrupted as err:
        if child.poll() is None:
            child.send_signal(err.signum)
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise
