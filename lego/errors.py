"""User-facing errors: each carries a one-line message that names what is wrong and how to fix it.

The runner catches `LEGOError` and prints only its message (the traceback only with HYDRA_FULL_ERROR=1
or `debug=true`), then exits non-zero.
"""


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
