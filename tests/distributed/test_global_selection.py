"""The global parts of a stage, with 2 gloo ranks on fixed inputs: hard-token selection, threshold
calibration and validation sums must be exactly what one process computes on the whole data."""

from pathlib import Path

import pytest
import torch

from lego import TrainingData, distributed
from lego.model import LEGOConfig, LEGOTransformer
from lego.training.propagation import evaluate
from lego.training.selection import calibrate_threshold, select_hard
from lego.training_data import load_shard, load_within_budget, shard_path, shard_rows

from .conftest import spawn_ranks

SEQUENCES, SEQ_LEN, RATIO = 7, 12, 0.3  # 7 sequences: the two shards differ in size


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidences with many ties (two decimals), a ragged active mask, validation confidences."""
    generator = torch.Generator().manual_seed(0)
    confidence = (torch.rand(SEQUENCES, SEQ_LEN, generator=generator) * 100).round() / 100
    active = torch.rand(SEQUENCES, SEQ_LEN, generator=generator) > 0.3
    active[3] = False  # a sequence with no active token
    val_confidence = torch.rand(25, generator=generator)
    return confidence, active, val_confidence


def tiny_model_and_data() -> tuple[LEGOTransformer, TrainingData]:
    torch.manual_seed(0)
    model = LEGOTransformer.from_config(LEGOConfig(vocab_size=40, dim=16, num_heads=2, layers_per_block=[1, 1]))
    windows = torch.randint(0, 40, (SEQUENCES, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    return model, TrainingData.from_windows(windows)


def _on_rank(rank: int, world: int, out_dir: str) -> None:
    confidence, active, val_confidence = fixed_inputs()
    rows = shard_rows(SEQUENCES, rank, world)
    hard = select_hard(confidence[rows], active[rows], RATIO)
    val_share = val_confidence[rank::world]
    threshold = calibrate_threshold(torch.cat(distributed.all_gather_variable(val_share)), RATIO)
    model, data = tiny_model_and_data()
    result = evaluate(model.blocks[0], data.shard(rank, world), model.embedding, batch_size=2)
    torch.save(
        {"hard": hard, "threshold": threshold, "loss": result["loss"], "tokens": result["tokens"]},
        f"{out_dir}/rank{rank}.pt",
    )


def test_two_ranks_choose_exactly_the_single_process_hard_tokens(tmp_path):
    confidence, active, val_confidence = fixed_inputs()
    spawn_ranks(_on_rank, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    union = torch.zeros_like(active)
    for rank, saved in enumerate(ranks):
        union[shard_rows(SEQUENCES, rank, 2)] = saved["hard"]
    single = select_hard(confidence, active, RATIO)
    assert torch.equal(union, single)
    assert int(union.sum()) == int(int(active.sum()) * RATIO)  # the global ratio, not one per rank
    assert not (union & ~active).any()

    assert ranks[0]["threshold"] == ranks[1]["threshold"] == calibrate_threshold(val_confidence, RATIO)

    model, data = tiny_model_and_data()
    whole = evaluate(model.blocks[0], data, model.embedding, batch_size=2)
    assert ranks[0]["loss"] == ranks[1]["loss"]  # one all-reduced number: the same early-stopping decision
    for saved in ranks:
        assert saved["tokens"] == whole["tokens"]
        assert abs(saved["loss"] - whole["loss"]) < 1e-6  # float32 sums in other batches: rounding only


def _gather_ragged(rank: int, world: int, out_dir: str) -> None:
    parts = distributed.all_gather_variable(torch.arange(rank * 3, dtype=torch.int64))  # rank 0 sends nothing
    torch.save(parts, f"{out_dir}/rank{rank}.pt")


def test_all_gather_variable_handles_empty_and_ragged_tensors(tmp_path):
    spawn_ranks(_gather_ragged, 2, str(tmp_path))
    for rank in range(2):
        parts = torch.load(tmp_path / f"rank{rank}.pt")
        assert [p.tolist() for p in parts] == [[], [0, 1, 2]]


def saved_as_two_shards(tmp_path: Path) -> tuple[TrainingData, Path]:
    """Random hidden-state data, written as 2 ranks' shards of `hard_tokens.safetensors`."""
    generator = torch.Generator().manual_seed(0)
    data = TrainingData(
        hidden_states=torch.randn(SEQUENCES, SEQ_LEN, 4, generator=generator),
        targets=torch.randint(0, 9, (SEQUENCES, SEQ_LEN), generator=generator),
        active=torch.rand(SEQUENCES, SEQ_LEN, generator=generator) > 0.5,
    )
    path = tmp_path / "hard_tokens.safetensors"
    for rank in range(2):
        data.shard(rank, 2).save(shard_path(path, rank, 2))
    return data, path


def same(a: TrainingData, b: TrainingData) -> bool:
    return all(torch.equal(x, y) for x, y in zip((a.hidden_states, a.targets, a.active),
                                                 (b.hidden_states, b.targets, b.active), strict=True))  # fmt: skip


def test_shards_reload_on_any_number_of_ranks(tmp_path):
    data, path = saved_as_two_shards(tmp_path)

    assert same(load_shard(path, 2, 0, 1, None), data)  # 2 ranks -> 1: the global order back
    for rank in range(3):
        assert same(load_shard(path, 2, rank, 3, None), data.shard(rank, 3))  # 2 ranks -> 3
    assert same(load_shard(path, 2, 1, 2, 0.0), data.shard(1, 2))  # same world: its own file
    assert shard_path(path, 0, 1) == path  # one process keeps the single-file name
    assert not path.exists() and not shard_path(path, 0, 3).exists()  # no budget: held in memory, no file


@pytest.mark.parametrize("budget_mb", [0.0, 0.0004])  # always stream; a budget below two sequences: one per chunk
def test_resharding_over_budget_streams_into_this_ranks_own_file(tmp_path, budget_mb):
    data, path = saved_as_two_shards(tmp_path)
    for rank in range(3):
        assert same(load_shard(path, 2, rank, 3, memory_budget_mb=budget_mb), data.shard(rank, 3))
        assert shard_path(path, rank, 3).is_file()  # written a chunk at a time, then mapped


def test_load_within_budget_maps_only_what_is_too_big(tmp_path, monkeypatch):
    data = TrainingData(torch.randn(4, 8, 16), torch.zeros(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.bool))
    path = tmp_path / "d.safetensors"
    data.save(path)
    size_mb = path.stat().st_size / 2**20
    calls = []
    real_load = TrainingData.load.__func__
    monkeypatch.setattr(
        TrainingData, "load", classmethod(lambda cls, p, mmap=False: calls.append(mmap) or real_load(cls, p, mmap=mmap))
    )
    for budget in (None, 2 * size_mb, size_mb / 2, 0.0):
        assert torch.equal(load_within_budget(path, budget).hidden_states, data.hidden_states)
    assert calls == [False, False, True, True]
