"""Checks of numeric options: a bad value is a ValueError that names the option and what it must be."""

from __future__ import annotations


def whole(name: str, value, minimum: int = 0) -> int:
    """`value` as an int of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
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
