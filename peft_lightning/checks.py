"""Checks of numeric options: a bad value is a ValueError that names the option and what it must be."""

from __future__ import annotations


def whole(name: str, value, minimum: int = 0, error: type[ValueError] = ValueError) -> int:
    """`value` as an int of at least `minimum`; else `error` (a ValueError, or a subclass such as
    `config.ConfigError`, which the commands report as a usage error)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def real(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """`value` as a float within [low, high) (or (low, high) with `low_open`); either end may be None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
        bounds += [f"< {high:g}"] if high is not None else []
        raise ValueError(f"{name} must be a number{' ' if bounds else ''}{' and '.join(bounds)}, got {value!r}")
    return float(value)


def device(name: str, option: str = "--device"):
    """`name` as a torch.device this machine has (cpu, cuda, cuda:N, mps), or a ValueError saying so."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{option} {name!r} is not a device: use cpu, cuda or cuda:N ({err})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {name}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{option} {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {name}: MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{option} {name}: unsupported device type {dev.type!r}; use cpu or cuda")
    return dev


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def out_file(path: str, option: str = "--out", inputs: tuple[str, ...] = ()) -> None:
    """`path` can be written as a file (checked before any work), and is none of `inputs`."""
    import os
    from pathlib import Path

    p = Path(path)
    for given in inputs:
        if given != "-" and (p.resolve() == Path(given).resolve()):
            raise ValueError(f"{option} {path} is the input file: writing it would replace the rows being read")
    if p.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    probe = p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{option} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{option} {path}: cannot be written here (permission denied)")
