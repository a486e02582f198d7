"""The trainer's GPU keys on the CPU: `trainer.compile` compiles every block's layers before training,
`trainer.precision` is checked and reaches the final evaluation's forwards (threshold scan, speed-up timing)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from lego.errors import ConfigError
from lego.model import LEGOBlock, LEGOConfig, LEGOTransformer
from lego.pipeline.config import register_configs, to_run_config
from lego.pipeline.evaluation import measure_speedup, threshold_scan
from lego.pipeline.runner import build_model

CONF = Path(__file__).parents[2] / "conf"
register_configs()


def tiny_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_run_config(compose("config", overrides=["+experiment=tiny", *overrides]))


@pytest.mark.parametrize("compiled", [True, False])
def test_trainer_compile_compiles_every_blocks_layers_with_static_shapes(compiled, monkeypatch):
    calls = []
    monkeypatch.setattr(LEGOBlock, "compile_layers", lambda block, *args, **kwargs: calls.append((block, kwargs)))
    model = build_model(tiny_config(f"trainer.compile={str(compiled).lower()}"), 256, torch.device("cpu"))
    assert calls == ([(block, {"dynamic": False}) for block in model.blocks] if compiled else [])


def test_an_unknown_precision_is_refused_with_its_key():
    with pytest.raises(ConfigError, match="trainer.precision='fp16' is unknown; use one of: auto, float32, bf16"):
        tiny_config("trainer.precision=fp16")
    assert tiny_config().trainer.precision == "auto" and tiny_config().trainer.compile is False


@pytest.mark.parametrize("precision,dtype", [("float32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_final_evaluation_runs_in_the_precision(precision, dtype):
    torch.manual_seed(0)
    model = LEGOTransformer.from_config(LEGOConfig(40, dim=16, num_heads=2, layers_per_block=[1, 1], max_seq_len=8))
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda _, __, out: seen.append(out.dtype))
    windows = torch.randint(0, 40, (8, 9), generator=torch.Generator().manual_seed(0))
    rows, _, _ = threshold_scan(model, windows, windows, [0.5], 4, "cpu", score_val=True, precision=precision)
    measure_speedup(model, windows, 4, "cpu", repeats=1, max_batches=1, precision=precision)
    assert len(rows) == 2 and seen and set(seen) == {dtype}
