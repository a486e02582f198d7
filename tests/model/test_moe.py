"""The MoE feed-forward: grouped_mm equals the per-expert loop, and it composes with TRUE early exit. Tiny, CPU."""

import pytest
import torch

from lego.layers import SparseLayout
from lego.model import LEGOBlock
from lego.moe import MoEConfig, MoEFeedForward, grouped_mm_supported

DIM = 16


@pytest.mark.parametrize(
    "config",
    [
        MoEConfig(num_experts=8, top_k=2, balance="bias"),
        MoEConfig(num_experts=6, top_k=3, shared_experts=1, score_func="sigmoid", route_norm=True, balance="bias"),
    ],
)
def test_grouped_mm_equals_loop_forward_and_gradients(config):
    """Random routing with top_k > 1 (score-weighted) and three experts that get no token (a large negative
    choice bias): the grouped_mm path and the per-expert loop agree in output and every gradient."""
    torch.manual_seed(0)
    moe = MoEFeedForward(DIM, 32, config).train()
    moe.expert_bias[-3:] = -100.0  # these experts are never chosen
    x = torch.randn(3, 10, DIM, requires_grad=True)
    assert grouped_mm_supported(x, moe.experts.w_gate_up, moe.experts.w_down)
    results = []
    for grouped in (True, False):
        moe.config.grouped_mm = grouped
        out = moe(x)
        assert moe.stats.load[-3:].sum() == 0
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, DIM)).sum() + moe.aux_loss, [x, *moe.parameters()])
        results.append((out, grads))
    (out_g, grads_g), (out_l, grads_l) = results
    torch.testing.assert_close(out_g, out_l)
    for grad_g, grad_l in zip(grads_g, grads_l, strict=True):
        torch.testing.assert_close(grad_g, grad_l)


@torch.no_grad()
def test_moe_block_sparse_path_with_all_tokens_equals_dense_and_keeps_inactive_tokens():
    torch.manual_seed(0)
    block = LEGOBlock(DIM, 2, 2, max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2)).eval()
    block.attach_head(torch.nn.Linear(DIM, 8, bias=False))
    h = torch.randn(2, 12, DIM)
    dense = h
    for layer in block.layers:
        dense = layer(dense, block.rope)
    layout = SparseLayout.from_mask(torch.ones(2, 12, dtype=torch.bool))
    x_all, x_active = h, h.reshape(-1, DIM)
    for layer in block.layers:
        x_active = layer.forward_sparse(x_all, x_active, layout, block.rope)
        x_all = x_active.view(2, 12, DIM)
    torch.testing.assert_close(x_all, dense, rtol=1e-5, atol=1e-6)
    active = torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) < 0.4
    out = block.run(h, active)
    assert torch.equal(out.hidden[~active], h[~active])
    assert all(ffn.stats.tokens == int(active.sum()) for ffn in block.moe_ffns)  # only active tokens routed
