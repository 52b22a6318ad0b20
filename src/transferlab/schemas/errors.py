"""The one error type of a bad setting, and the range checks every schema shares.

This module imports nothing of transferlab's: every other module may import it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting: the message names the key and the fix, and is printed as one line."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}. Fix: {fix}")


def positive(key: str, value: float, fix: str) -> None:
    if not value > 0:
        raise ConfigError(key, f"must be > 0, got {value}", fix)


def fraction(key: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(key, f"must be in (0, 1), got {value}", f"set {key}=0.25 or another fraction")


def seed_range(key: str, value: int) -> None:
    if not 0 <= value < 2**32:  # numpy's and torch's seeding range
        raise ConfigError(key, f"must be in [0, 2**32), got {value}", f"use {key}=0 or another small integer")
