"""The one-line error for a config group override whose value is none of the group's options.

`hard_ratio=0.3` sets the `hard_ratio` group (conf/hard_ratio/), not its value: Hydra answers with a 25-line
traceback ("Config group override must be a string or a list"), and `model=huge` with a list of options over
several lines. `exit_on_unknown_override_keys` (lego/pipeline/config.py) asks `group_choice_error` before Hydra
runs, and names the options and, where the value fits a key of the group's option files, the override meant:
`hard_ratio=0.3: hard_ratio is a config group (options: constant, per_block); to set its value use
hard_ratio.value=0.3`.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, Override, RangeSweep

from lego.pipeline.config import RunConfig, _without_none  # `X | None` as X

SHOWN_KEYS = 3  # at most this many fitting keys are suggested


def group_choice_error(override: Override, text: str, group_dirs: list[Path]) -> str | None:
    """The error for `text` (the override as typed, `group=value`), or None when every value it gives is an
    option of the group (or a glob, which Hydra matches against them), or the group has no option file here (its
    options come from elsewhere in Hydra's search path)."""
    group = override.key_or_group
    files = {path.stem: path for directory in group_dirs for path in sorted((directory / group).glob("*.yaml"))}
    options = sorted(files)
    wrong = [value for value in _values(override) if not _is_option(value, options)]
    if not wrong or not options:
        return None
    listed = ", ".join(options)
    if all(isinstance(value, str) for value in wrong):  # an option's name mistyped
        near = difflib.get_close_matches(wrong[0], options, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        return f"{text}: config group {group} has no option {wrong[0]} ({hint}options: {listed})"
    return f"{text}: {group} is a config group (options: {listed}); {_advice(group, text, wrong, files.values())}"


def _advice(group: str, text: str, wrong: list[Any], files: typing.Iterable[Path]) -> str:
    """What to type instead of a value that is no option's name: the key of the group's option files it fits."""
    if None in wrong:
        return f"to select none of them use ~{group}"
    given = text.split("=", 1)[1]
    keys = [key for key in _option_keys(group, files) if all(_fits(value, _schema_type(key)) for value in wrong)]
    if len(keys) == 1:
        return f"to set its {keys[0].rsplit('.', 1)[-1]} use {keys[0]}={given}"
    if keys:
        return "to set one of its keys use " + " or ".join(f"{key}={given}" for key in keys[:SHOWN_KEYS])
    return "pick one of its options, or set one of its keys (python train.py --cfg job lists them)"


def _values(override: Override) -> list[Any]:
    """The values an override gives the group: each choice of a sweep, a range's or an interval's bounds."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, RangeSweep):
        return [value.start, value.stop]
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    return [] if isinstance(value, Glob) else [value]


def _is_option(value: Any, options: list[str]) -> bool:
    """An option's name, or a list of them (several options of one group)."""
    if isinstance(value, list):
        return bool(value) and all(_is_option(item, options) for item in value)
    return isinstance(value, str) and value in options


def _option_keys(group: str, files: typing.Iterable[Path]) -> list[str]:
    """The keys the group's option files set, as full config keys: under the file's `# @package` (the group's own
    node by default, the root for `_global_`)."""
    keys: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        package = next((line.split()[-1] for line in text.splitlines() if line.startswith("# @package")), None)
        prefix = "" if package == "_global_" else f"{package or group.replace('/', '.')}."
        content = yaml.safe_load(text)
        for key in content if isinstance(content, dict) else []:
            if key != "defaults" and f"{prefix}{key}" not in keys:
                keys.append(f"{prefix}{key}")
    return keys


def _schema_type(key: str) -> Any:
    """The type RunConfig's dataclasses give the dotted `key`; None when it is no typed key (free-form or unknown)."""
    hint: Any = RunConfig
    for part in key.split("."):
        hint = _without_none(hint)
        hints = typing.get_type_hints(hint) if is_dataclass(hint) else {}
        if part not in hints:
            return None
        hint = hints[part]
    return hint


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value as Hydra parsed it would do for a key of type `hint` (None: no typed key): 0.3 for a float,
    [0.5, 0.3] for a list[float]."""
    if hint is None:
        return False
    hint = _without_none(hint)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(item, typing.get_args(hint)[0]) for item in value)
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(hint, type) and isinstance(value, hint)
