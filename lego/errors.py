"""User-facing errors: each carries a one-line message that names what is wrong and how to fix it.

The runner catches `LEGOError` and prints only its message (the traceback only with HYDRA_FULL_ERROR=1
or `debug=true`), then exits non-zero.
"""

import math


class LEGOError(Exception):
    """Base class for errors caused by user input (config, data, files), not by a bug."""


class ConfigError(LEGOError, ValueError):
    """A config value is wrong; the message names the key and the accepted values."""


class DataError(LEGOError, ValueError):
    """A corpus, dataset or file cannot be used; the message names the config key to change."""


def check_one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """A ConfigError naming `key` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is unknown; use one of: {', '.join(allowed)}")


class DiskFullError(LEGOError, OSError):
    """The disk is full: the message names the file that could not be written and the bytes it needs."""


class TrainingDiverged(LEGOError, ArithmeticError):
    """Training produced a non-finite loss, or one far above its start; the message says where and what to change."""


def check_number(
    key: str, value: float, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, hint: str = "",
) -> None:  # fmt: skip
    """A ConfigError naming `key` unless `value` is a finite number within [low, high] (open ends where asked)."""
    inside = math.isfinite(value) and (
        (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not inside:
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(part for part in (lower, upper) if part)
        raise ConfigError(f"{key}={value} must be a finite number {bounds}" + (f" ({hint})" if hint else ""))


def check_count(key: str, value: int | None, minimum: int = 1, *, null: str = "", hint: str = "") -> None:
    """A ConfigError naming `key` unless `value` is at least `minimum` (or None, where `null` says what None means)."""
    if value is None and null:
        return
    if value is None or value < minimum:
        bound = "positive" if minimum == 1 else f"{minimum} or more"
        also = f", or null ({null})" if null else ""
        raise ConfigError(f"{key}={value} must be {bound}{also}" + (f", e.g. {hint}" if hint else ""))
