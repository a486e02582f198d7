"""Writing run outputs so that a kill never leaves a half-written file that a resume would trust.

Every file goes to a temp name in the same folder and is renamed into place (`os.replace` is atomic on
POSIX). Model weights are safetensors only: nothing in a run directory is ever unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from lego.atomic import atomic_write
from lego.errors import DataError


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(_json_safe(data), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path, expect: dict[str, type | tuple[type, ...]] | None = None) -> Any:
    """The JSON in `path`; with `expect` (key -> type), an object holding at least those keys with those types:
    a file that is valid JSON of another shape is refused like a damaged one, not trusted."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is unreadable ({err}); delete it to redo the step that wrote it") from err
    if expect is not None:
        shaped = isinstance(data, dict)
        wrong = [key for key, kind in expect.items() if not shaped or not isinstance(data.get(key), kind)]
        if wrong or not shaped:
            wrong = wrong or ["an object"]
            raise DataError(
                f"{path} does not hold what LEGO wrote there ({', '.join(wrong[:3])} missing or of the wrong type); "
                "delete it to redo the step that wrote it"
            )
    return data


def save_weights(model: nn.Module, path: Path) -> None:
    """The whole model's state (tied weights stored once) as safetensors, atomically."""
    atomic_write(path, lambda tmp: save_model(model, str(tmp)))


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as err:  # safetensors raises several types for a damaged file
        reason = " ".join(str(err).split())  # one line: load_state_dict's size mismatches span several
        raise DataError(f"{path} cannot be loaded ({reason}); delete the stage folder to retrain it") from err
    if missing or unexpected:
        raise DataError(
            f"{path} does not match the model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); the run directory was made with another model config"
        )
