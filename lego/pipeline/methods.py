"""Training methods the runner can dispatch to by `method=<name>`.

`lego` (staged, block by block) is built in. Other methods live outside the package and register
themselves on import (`experiments/universal_trainer.py` registers `universal`; `train.py` imports it),
so `lego` never imports `experiments`.

A method is called as `method(run, model, train, val, run_dir, tracker)` and returns one stats dict
per block (keys as in `stage_<k>/stats.json`: hard_ratio, hard_count, train_tokens, train_flops,
best_val_ppl, seconds, evals). Before returning it sets every block's threshold for inference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lego.errors import ConfigError
from lego.model import LEGOTransformer
from lego.pipeline.config import RunConfig
from lego.pipeline.tracking import Tracker
from lego.training_data import TrainingData

Method = Callable[[RunConfig, LEGOTransformer, TrainingData, TrainingData, Path, Tracker], list[dict]]
_METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
    _METHODS[name] = method


def get_method(name: str) -> Method:
    if name == "lego" and name not in _METHODS:
        from lego.pipeline.staged import train_staged

        register_method("lego", lambda *args: [result.stats for result in train_staged(*args)])
    if name not in _METHODS:
        raise ConfigError(f"method={name!r} is not available; registered: {', '.join(sorted(_METHODS)) or 'lego'}")
    return _METHODS[name]
