"""The streamed hand-off's bounded-memory selection (`select_hard_chunked`): the bottom `hard_ratio` of the active
tokens, the set `torch.topk(largest=False)` chooses on distinct confidences and a stable sort's on tied ones, in
chunks of any size, on one process and over 2 gloo ranks."""

import pytest
import torch

from lego.training.selection import select_hard, select_hard_chunked, sortable_keys
from lego.training_data import shard_rows
from tests.distributed.conftest import spawn_ranks

RATIO = 0.37


def chunked(confidence: torch.Tensor, active: torch.Tensor, ratio: float = RATIO, chunk: int = 50) -> torch.Tensor:
    return torch.cat(list(select_hard_chunked(confidence, active, ratio, chunk_tokens=chunk)))


def stable_bottom(confidence: torch.Tensor, active: torch.Tensor, ratio: float = RATIO) -> torch.Tensor:
    """The reference for ties: the active tokens stably sorted by confidence, the first int(n * ratio) of them."""
    flat = active.reshape(-1).nonzero().squeeze(1)
    order = torch.sort(confidence.reshape(-1)[flat], stable=True).indices[: int(len(flat) * ratio)]
    hard = torch.zeros(active.numel(), dtype=torch.bool)
    hard[flat[order]] = True
    return hard.view_as(active)


def inputs(seed: int, tied: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(29, 17, generator=generator)
    if tied:  # 5 distinct values: the cut falls inside a run of equal confidences
        confidence = (confidence * 4).round() / 4
    active = torch.rand(29, 17, generator=generator) > 0.3
    active[4] = False  # a sequence with no active token
    return confidence, active


def test_sortable_keys_order_floats_as_floats():
    values = torch.tensor([float("-inf"), -3.5, -1.0, -1e-38, -0.0, 0.0, 1e-45, 1e-38, 0.25, 0.5, 1.0, float("inf")])
    keys = sortable_keys(values)
    assert keys.dtype == torch.int64 and bool((keys >= 0).all()) and bool((keys < 2**32).all())
    assert torch.equal(keys[1:] > keys[:-1], values[1:] > values[:-1])  # -0.0 == 0.0, everything else increasing
    shuffled = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sortable_keys(shuffled).argsort(), shuffled.argsort())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 50, 10_000])  # a row at a time, a few rows, everything at once
def test_distinct_confidences_give_topks_set(seed, chunk):
    confidence, active = inputs(seed, tied=False)
    hard = chunked(confidence, active, chunk=chunk)
    assert torch.equal(hard, select_hard(confidence, active, RATIO))  # the in-memory path: torch.topk
    assert int(hard.sum()) == int(int(active.sum()) * RATIO) and not (hard & ~active).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 50, 10_000])
def test_ties_go_to_the_lowest_token_index(seed, chunk):
    confidence, active = inputs(seed, tied=True)
    assert torch.equal(chunked(confidence, active, chunk=chunk), stable_bottom(confidence, active))


def test_all_equal_confidences_and_the_ratios_ends():
    active = torch.ones(6, 10, dtype=torch.bool)
    equal = torch.full((6, 10), 0.5)
    assert torch.equal(chunked(equal, active), stable_bottom(equal, active))  # the first 22 tokens in order
    assert not chunked(equal, active, ratio=0.01).any()  # int(60 * 0.01) = 0 tokens
    almost_all = chunked(equal, active, ratio=0.99)
    assert int(almost_all.sum()) == 59 and not bool(almost_all[-1, -1])


def test_the_index_pass_spans_more_than_one_digit():
    """More than 2**16 tokens: the tie-break by index needs two 16-bit digits."""
    confidence = torch.zeros(300, 256)
    confidence[::2] = 1.0  # every other sequence sure, the rest tied at 0: the cut falls inside the tied ones
    active = torch.ones(300, 256, dtype=torch.bool)
    hard = chunked(confidence, active, ratio=0.3, chunk=4096)
    assert torch.equal(hard, stable_bottom(confidence, active, ratio=0.3))


def _on_rank(rank: int, world: int, out_dir: str) -> None:
    for tied in (False, True):
        confidence, active = inputs(0, tied)
        rows = shard_rows(len(active), rank, world)
        hard = chunked(confidence[rows], active[rows], chunk=40)
        torch.save(hard, f"{out_dir}/rank{rank}_{tied}.pt")


def test_two_ranks_choose_the_single_process_set(tmp_path):
    spawn_ranks(_on_rank, 2, str(tmp_path))
    for tied in (False, True):
        confidence, active = inputs(0, tied)
        union = torch.zeros_like(active)
        for rank in range(2):
            union[shard_rows(len(active), rank, 2)] = torch.load(tmp_path / f"rank{rank}_{tied}.pt")
        assert torch.equal(union, stable_bottom(confidence, active))  # global ratio, ties by global index
