"""Whole files only: every file this project writes appears complete or not at all.

`atomic_write` writes into a temporary file beside the target (`.<name>.<random>.tmp`, which a
resumed run removes: `rundir.remove_partial_files`) and renames it over the target, so a kill at
any point leaves either the old file or the new one. Results JSON, prediction TSVs, checkpoints and
the token cache all go through it. A leaf: the standard library only.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask): mkstemp's files are 0o600."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a plainly created folder gets (0o777 less the umask): mkdtemp's are 0o700."""
    return 0o777 & ~_umask()


FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class WriteError(OSError):
    """A file could not be written: names the file and why ("disk full" when it is)."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code


def disk_full(folder: str | Path, err: BaseException | None = None) -> bool:
    """The write failed for want of space: ENOSPC / EDQUOT, or no block left where it was going
    (torch.save reports a full disk as a RuntimeError from its C++ writer, without the errno)."""
    if isinstance(err, OSError) and err.errno in FULL:
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20  # under 1 MiB left


def describe_os_error(err: BaseException) -> str:
    """`err` in one line, saying "disk full" when it is."""
    if isinstance(err, WriteError):
        return str(err)
    if isinstance(err, OSError) and err.errno in FULL:
        return f"{err.filename or 'a file'}: disk full ({err.strerror})"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False, fsync: bool = False) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`.

    Args:
        path: the file to (re)write; its folder is made if missing.
        write: writes the content into the open file it is given.
        binary: open the file in binary mode (else text, UTF-8, no newline translation).
        fsync: flush the content to disk before the rename (checkpoints: a crash of the machine, not
            only of the process, then leaves the old file or the whole new one).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if isinstance(err, WriteError):
            raise
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)  # frees the space a partial write took
        if disk_full(path.parent if path.parent.is_dir() else "/", err):
            raise WriteError(errno.ENOSPC, f"{path}: could not be written: disk full") from err
        if isinstance(err, OSError):
            raise WriteError(err.errno, f"{path}: could not be written ({err.strerror or err})") from err
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` as the whole content of `path` (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))
