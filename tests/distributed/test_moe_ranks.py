"""MoE under torch.distributed, with 2 gloo ranks: an expert that got no token on a rank (and a rank whose
MoE layer got no token at all) still takes part in the gradient all-reduce, and the balancing bias takes the
same step on every rank, the step one process takes on all the tokens."""

from pathlib import Path

import pytest
import torch

from lego.moe import MoEConfig, MoEFeedForward
from lego.training.loop import _sum_gradients

from .conftest import spawn_ranks

DIM = 16


def make_moe() -> MoEFeedForward:
    """Expert 3 scores highest for inputs along +u, lowest along -u (top-1, loop path: no grad at all for
    the experts of a rank that routes nothing)."""
    torch.manual_seed(0)
    moe = MoEFeedForward(DIM, 32, MoEConfig(num_experts=4, top_k=1, balance="bias", grouped_mm=False)).train()
    with torch.no_grad():
        moe.router.weight[3] = 5 * direction()
    return moe


def direction() -> torch.Tensor:
    u = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    return u / u.norm()


def rank_inputs(rank: int, case: str) -> torch.Tensor:
    noise = 0.1 * torch.randn(10, DIM, generator=torch.Generator().manual_seed(10 + rank))
    if rank == 1 and case == "no_tokens":
        return noise[:0]  # every token of this rank exited before the layer
    return noise + (2 if rank == 0 else -2) * direction()  # rank 1 never picks expert 3


def step(moe: MoEFeedForward, x: torch.Tensor) -> None:
    (moe(x) ** 2).sum().backward()


def _on_rank(rank: int, world: int, out_dir: str, case: str) -> None:
    moe = make_moe()
    x = rank_inputs(rank, case)
    step(moe, x)
    if rank == 1:
        assert moe.stats.counts[3] == 0
    _sum_gradients(list(moe.parameters()))
    moe.update_bias()
    grads = {name: p.grad for name, p in moe.named_parameters()}
    torch.save({"grads": grads, "bias": moe.expert_bias.clone()}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("case", ["expert_without_tokens", "no_tokens"])
def test_two_ranks_sum_every_experts_gradient_and_take_one_bias_step(tmp_path: Path, case: str):
    spawn_ranks(_on_rank, 2, str(tmp_path), case)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = make_moe()
    step(single, torch.cat([rank_inputs(r, case) for r in range(2)]))
    single.update_bias()
    for name, param in single.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], param.grad, msg=name)
    for rank in ranks:
        assert torch.equal(rank["bias"], single.expert_bias)
    assert single.expert_bias.abs().sum() > 0
