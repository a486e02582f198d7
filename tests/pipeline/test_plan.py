"""The plan a run prints before training: its hand-off's disk and memory per `trainer.dump`, its stages' tokens and
FLOPs, and a refusal when the disk cannot hold it."""

from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from lego import LEGOTransformer
from lego.errors import ConfigError
from lego.model import LEGOConfig
from lego.pipeline import plan as plan_module
from lego.pipeline.plan import handoff_need, plan_run, planned_passes, stage_tokens
from lego.training_data import TrainingData, dump_bytes

Usage = namedtuple("Usage", "total used free")


def test_a_dump_costs_what_its_file_holds_and_stream_one_byte_per_token_per_boundary(tmp_path):
    tokens, dim = 4 * 32, 16
    data = TrainingData(torch.zeros(4, 32, dim), torch.zeros(4, 32, dtype=torch.long), torch.ones(4, 32, dtype=bool))
    data.save(tmp_path / "dump.safetensors")
    keep = handoff_need(tokens, dim, [0.5], "keep", "float32")
    assert keep.disk == dump_bytes(4, 32, dim)  # what the writer's own size formula says
    assert keep.disk == pytest.approx((tmp_path / "dump.safetensors").stat().st_size, rel=0.05)  # and the file
    three_blocks = [0.5, 0.5]
    assert handoff_need(tokens, dim, three_blocks, "keep", "bfloat16").disk == 2 * tokens * (2 * dim + 5)
    assert handoff_need(tokens, dim, three_blocks + [0.5], "delete", "bfloat16").disk == 2 * tokens * (2 * dim + 5)
    stream = handoff_need(tokens, dim, three_blocks, "stream")
    assert (stream.disk, stream.memory) == (tokens * (2 + 4), 0.0)
    none = handoff_need(tokens, dim, three_blocks, "none")
    assert none.memory == dump_bytes(4, 32, dim)  # the next stage's float32 inputs, in memory
    assert handoff_need(tokens, dim, [], "keep").disk == 0  # one block: no hand-off
    # a dump above the memory budget is memory-mapped: no memory of its own
    assert handoff_need(tokens, dim, [0.5], "keep", "float32", budget_mb=0).memory == 0


def test_stage_tokens_and_passes():
    assert stage_tokens(1000, [0.5, 0.3]) == [1000, 500, 150]
    assert planned_passes(100, 10, epochs=2, max_steps=None) == 2
    assert planned_passes(100, 10, epochs=2, max_steps=5) == 0.5


def _model() -> LEGOTransformer:
    return LEGOTransformer.from_config(LEGOConfig(vocab_size=50, dim=16, num_heads=2, layers_per_block=[1, 1]))


def test_the_plan_counts_each_stages_flops_and_refuses_a_disk_too_small(tmp_path, monkeypatch):
    trainer = SimpleNamespace(dump="keep", dump_dtype="bfloat16", memory_budget_mb=1024)
    model = _model()
    plan = plan_run(model, 1000, 32, [0.5], [1.0, 2.0], trainer, tmp_path / "not_yet" / "run")
    assert plan.stage_tokens == [1000, 500]
    assert plan.stage_flops[0] == 3 * model.blocks[0].forward_flops(1000, 1000, 32, 1000)
    assert plan.stage_flops[1] == 6 * model.blocks[1].forward_flops(500, 1000, 32, 500)  # two passes
    assert "trainer.dump=keep" in plan.lines()[1]
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"dump=keep needs .* of disk .* are free under .*trainer.dump=stream"):
        plan_run(model, 1000, 32, [0.5], [1.0, 1.0], trainer, tmp_path)
    trainer.dump = "stream"  # 1 + 4 bytes per token: 5000 bytes, still more than 1000 free
    with pytest.raises(ConfigError, match="trainer.dump=stream needs"):
        plan_run(model, 1000, 32, [0.5], [1.0, 1.0], trainer, tmp_path)
    plan_run(model, 100, 32, [0.5], [1.0, 1.0], trainer, tmp_path)  # 500 bytes fit


def test_a_streamed_stage_plans_the_frozen_blocks_forward_too(tmp_path):
    model = _model()
    keep = SimpleNamespace(dump="keep", dump_dtype="bfloat16", memory_budget_mb=1024)
    stream = SimpleNamespace(dump="stream", dump_dtype="bfloat16", memory_budget_mb=1024)
    kept = plan_run(model, 1000, 32, [0.5], [1.0, 2.0], keep, tmp_path)
    streamed = plan_run(model, 1000, 32, [0.5], [1.0, 2.0], stream, tmp_path)
    assert streamed.stage_flops[0] == kept.stage_flops[0]
    assert streamed.stage_flops[1] == kept.stage_flops[1] + 2 * model.blocks[0].forward_flops(1000, 1000, 32)
