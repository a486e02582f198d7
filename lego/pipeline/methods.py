"""Training methods the runner can dispatch to by `method=<name>`.

Three are built in, all on the shared block-training loop (`lego.training.loop`): `lego` (staged, block by block:
`lego.pipeline.staged`), `universal` (every layer jointly: `lego.pipeline.universal`) and `mod` (Mixture-of-Depths:
`lego.pipeline.mod`). Others can register themselves with `register_method`.

A method is called as `method(run, model, train, val, run_dir, tracker)` and returns one stats dict
per block (keys as in `stage_<k>/stats.json`: hard_ratio, hard_count, train_tokens, train_flops,
best_val_ppl, seconds, evals). Before returning it sets every block's threshold for inference. A method may also
register `results(run, model, test_windows, device)`, whose dict the runner adds to results.json after the final
evaluation (MoD: which routing scored the test PPL, the share each layer routed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lego.errors import ConfigError
from lego.model import LEGOTransformer
from lego.pipeline.config import METHODS, RunConfig
from lego.pipeline.tracking import Tracker
from lego.training_data import TrainingData

Method = Callable[[RunConfig, LEGOTransformer, TrainingData, TrainingData, Path, Tracker], list[dict]]
MethodResults = Callable[[RunConfig, LEGOTransformer, Tensor, torch.device], dict]
_METHODS: dict[str, Method] = {}
_RESULTS: dict[str, MethodResults] = {}


def register_method(name: str, method: Method, results: MethodResults | None = None) -> None:
    _METHODS[name] = method
    if results is not None:
        _RESULTS[name] = results


def get_method(name: str) -> Method:
    if name not in _METHODS and name in METHODS:  # the built-in ones
        register_method(name, *_built_in(name))
    if name not in _METHODS:
        known = ", ".join(sorted({*_METHODS, *METHODS}))
        raise ConfigError(f"method={name!r} is not available; registered: {known}")
    return _METHODS[name]


def method_results(name: str) -> MethodResults | None:
    """The results a method adds to results.json (None: nothing of its own); after `get_method(name)`."""
    return _RESULTS.get(name)


def _built_in(name: str) -> tuple[Method, MethodResults | None]:
    """A built-in method, imported when first asked for (the runner imports only the one it runs)."""
    if name == "universal":
        from lego.pipeline.universal import train_from_run

        return train_from_run, None
    if name == "mod":
        from lego.pipeline.mod import test_routing, train_from_run

        return train_from_run, test_routing
    from lego.pipeline.staged import train_staged

    return (lambda *args: [result.stats for result in train_staged(*args)]), None
