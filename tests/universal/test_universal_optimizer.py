"""Layer-wise learning rates: each layer's parameters at base_lr * scale, embedding/head at base_lr; weight
decay on matrices only, as in LEGO's own training."""

import pytest

from experiments.universal_trainer import UniversalConfig
from tests.universal.universal_helpers import make_trainer


def test_one_group_per_layer_with_scaled_lr():
    config = UniversalConfig.preset("lpt", layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1})
    trainer, model = make_trainer(config)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    lrs = {group["layer"]: group["lr"] for group in optimizer.param_groups}
    assert lrs == pytest.approx({1: 1e-3, 2: 5e-4, 3: 1e-4, 0: 1e-3})
    for i, block in enumerate(model.blocks, start=1):
        groups = [g for g in optimizer.param_groups if g["layer"] == i]
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in block.parameters()}
        for group in groups:  # norms and biases are not decayed
            assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_every_parameter_once_tied_head_included():
    trainer, model = make_trainer(UniversalConfig.preset("standard"))
    optimizer = trainer.create_optimizer(model, base_lr=3e-4)
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.head.weight) in ids
    assert all(group["lr"] == 3e-4 for group in optimizer.param_groups)  # no scales: every layer at base_lr
