"""The hand-written backward passes in lego.layers give the gradients autograd gives for the plain formulas."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lego.layers import RMSNorm, RotaryEmbedding, SparseLayout, SwiGLU, TransformerLayer


def _grads(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    module(x).backward(grad)
    return [x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16), (0, 16)])
def test_rmsnorm_backward_matches_autograd_of_the_formula(shape):
    torch.manual_seed(0)
    ours = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    reference = torch.nn.RMSNorm(16, eps=1e-5)
    reference.load_state_dict(ours.state_dict())
    x, grad = torch.randn(shape) * 3, torch.randn(shape)
    torch.testing.assert_close(ours(x), reference(x))
    for got, want in zip(_grads(ours, x, grad), _grads(reference, x, grad), strict=True):
        torch.testing.assert_close(got, want)


def test_rmsnorm_gradcheck_in_float64():
    norm = RMSNorm(8, eps=1e-5).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(8, dtype=torch.float64, requires_grad=True)

    def apply(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(norm, {"weight": weight}, (x,))

    assert torch.autograd.gradcheck(apply, (x, weight))


def test_rmsnorm_weight_gradient_without_input_gradient():
    ours, reference = RMSNorm(16), torch.nn.RMSNorm(16)
    x, grad = torch.randn(4, 16), torch.randn(4, 16)
    ours(x).backward(grad)
    reference(x).backward(grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)


def test_rmsnorm_low_precision_falls_back_to_the_plain_module():
    ours, reference = RMSNorm(16).bfloat16(), torch.nn.RMSNorm(16).bfloat16()
    x, grad = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    for got, want in zip(_grads(ours, x, grad), _grads(reference, x, grad), strict=True):
        torch.testing.assert_close(got, want)


def test_swiglu_backward_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 24)
    x, grad = torch.randn(5, 7, 16), torch.randn(5, 7, 16)

    class Plain(SwiGLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, up = self.w_gate_up(x).chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)

    plain = Plain(16, 24)
    plain.load_state_dict(ffn.state_dict())
    torch.testing.assert_close(ffn(x), plain(x))
    for got, want in zip(_grads(ffn, x, grad), _grads(plain, x, grad), strict=True):
        torch.testing.assert_close(got, want)


def _layer_grads(layer: TransformerLayer, rope: RotaryEmbedding, x: torch.Tensor, active: torch.Tensor | None):
    """Output and parameter gradients of one layer, dense (active None) or sparse."""
    layer.zero_grad()
    if active is None:
        out = layer(x, rope)
    else:
        layout = SparseLayout.from_mask(active)
        out = layer.forward_sparse(x, x.reshape(-1, x.shape[-1]).index_select(0, layout.flat_index), layout, rope)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("sparse", [False, True])
def test_folded_norm_weight_gives_the_same_output_and_gradients(sparse):
    """An input that needs no gradient takes the folded path; the same input marked as needing one takes
    the plain path: the outputs and every parameter gradient agree."""
    torch.manual_seed(0)
    layer, rope = TransformerLayer(32, 4, 48), RotaryEmbedding(8, 16)
    with torch.no_grad():
        layer.attn_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, 32)
    active = (torch.rand(3, 16) < 0.4) if sparse else None
    folded = _layer_grads(layer, rope, x, active)
    plain = _layer_grads(layer, rope, x.clone().requires_grad_(), active)
    torch.testing.assert_close(folded[0], plain[0])
    for name, grad in plain[1].items():
        torch.testing.assert_close(folded[1][name], grad, msg=name)


def test_folded_norm_weight_saves_the_input_gradient_matmul():
    torch.manual_seed(0)
    layer, rope = TransformerLayer(32, 4, 48), RotaryEmbedding(8, 16)
    x = torch.randn(2, 16, 32)
    flops = {}
    for name, inp in (("folded", x), ("plain", x.clone().requires_grad_())):
        out = layer(inp, rope).sum()
        with FlopCounterMode(display=False) as counter:
            out.backward()
        flops[name] = counter.get_total_flops()
    # the plain path also back-propagates into its input: dx of the FFN's and the attention's projections;
    # the folded one skips the attention projection's dx (tokens x 3*dim x dim, times 2 FLOPs per MAC)
    assert flops["plain"] - flops["folded"] == 2 * 32 * 3 * 32 * 32
