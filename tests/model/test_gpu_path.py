"""The GPU path's model code, exercised on the CPU: which kernels run where and that the plain (compilable) ops give
the CPU kernels' numbers, no graph break in the dense path, recompiles bounded by the padded sparse path, the sparse
path's choices per device, the MoE's grouped_mm choice and aligned groups, and the routed model under autocast."""

import copy

import pytest
import torch

from lego import layers
from lego.layers import RMSNorm, RotaryEmbedding, SparseLayout, TransformerLayer, apply_rope, swiglu
from lego.model import SPARSE_BUCKET, LEGOBlock, LEGOTransformer, sparse_path
from lego.moe import GroupedExperts, aligned_groups, group_alignment, grouped_mm_dtype, grouped_mm_supported
from tests.model.test_moe import assert_same_outputs_and_grads

DIM, HEADS, SEQ = 32, 4, 64


def _graph_ops(tensor: torch.Tensor) -> set[str]:
    """The names of every autograd node behind `tensor`."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            stack += [next_node for next_node, _ in node.next_functions]
    return seen


def _block(layers_: int = 2, seed: int = 0) -> LEGOBlock:
    torch.manual_seed(seed)
    block = LEGOBlock(DIM, HEADS, layers_, max_seq_len=SEQ)
    block.attach_head(torch.nn.Linear(DIM, 40, bias=False))
    return block


def _mask(share: float, seed: int, batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, SEQ, generator=torch.Generator().manual_seed(seed)) < share


# -- which ops run, and that they agree --------------------------------------------------------------------------
def test_cpu_tensors_take_the_cpu_kernels_and_the_switch_the_plain_ops(monkeypatch):
    x = torch.randn(3, 8, 2, 8, requires_grad=True)
    rope = RotaryEmbedding(8, 16)

    def ops() -> set[str]:  # what RMSNorm, the SwiGLU product and RoPE ran
        return _graph_ops(RMSNorm(8)(x)) | _graph_ops(swiglu(x)) | _graph_ops(apply_rope(x, rope.cos[:8], rope.sin[:8]))

    cpu_kernels = {"_CPURMSNormFunctionBackward", "_SwiGLUProductBackward", "ViewAsRealBackward0"}
    assert cpu_kernels <= ops()
    monkeypatch.setattr(layers, "CPU_KERNELS", False)
    assert not cpu_kernels & ops() and {"SiluBackward0", "StackBackward0"} <= ops()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_real_rope_rotates_the_same_pairs_as_the_complex_one(dtype, monkeypatch):
    """Same pairing (x[2i], x[2i+1]) and angles: equal within the dtype's rounding, gradients too."""
    rope = RotaryEmbedding(16, SEQ)
    positions = torch.randint(0, SEQ, (5, 7), generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 7, 3, 16, dtype=dtype)
    grad = torch.randn_like(x)
    results = []
    for cpu in (True, False):
        monkeypatch.setattr(layers, "CPU_KERNELS", cpu)
        leaf = x.clone().requires_grad_()
        out = apply_rope(leaf, rope.cos[positions], rope.sin[positions])
        out.backward(grad)
        results.append((out, leaf.grad))
    (complex_out, complex_grad), (real_out, real_grad) = results
    assert real_out.dtype == dtype
    torch.testing.assert_close(real_out, complex_out)
    torch.testing.assert_close(real_grad, complex_grad)
    moved = complex_out.unflatten(-1, (-1, 2)) - x.unflatten(-1, (-1, 2))  # it rotates: norms of pairs are kept
    assert moved.abs().max() > 0.1
    torch.testing.assert_close(complex_out.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))


def test_plain_ops_give_the_cpu_kernels_outputs_and_gradients(monkeypatch):
    """A block's dense and sparse paths with the plain ops forced on the CPU: the CPU kernels' states, logits
    and parameter gradients within float32 rounding."""
    block = _block()
    h, active = torch.randn(4, SEQ, DIM), _mask(0.4, 1)
    results = []
    for cpu in (True, False):
        monkeypatch.setattr(layers, "CPU_KERNELS", cpu)
        for mask in (None, active):
            block.zero_grad()
            out = block.run(h.clone().requires_grad_(), mask, logits_for="active")
            out.logits.logsumexp(-1).sum().backward()
            results.append((out.hidden, out.logits, [p.grad.clone() for p in block.layers.parameters()]))
    for (cpu_hidden, cpu_logits, cpu_grads), (hidden, logits, grads) in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(hidden, cpu_hidden)
        torch.testing.assert_close(logits, cpu_logits)
        for got, want in zip(grads, cpu_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# -- the sparse path's choices -----------------------------------------------------------------------------------
def test_sparse_path_by_device():
    assert sparse_path("cpu", has_moe=False) == (1, "sdpa")  # the CPU keeps its exact numbers: no padding
    assert sparse_path("cuda", has_moe=False) == (SPARSE_BUCKET, "flex")
    assert sparse_path("cuda", has_moe=True) == (1, "flex")  # an expert would route the padding rows
    assert sparse_path("cpu", False, bucket=16, attention="flex") == (16, "flex")
    for bad in ({"bucket": 0}, {"bucket": 64, "has_moe": True}, {"attention": "flash"}):
        with pytest.raises(ValueError):
            sparse_path(**{"device_type": "cuda", "has_moe": False, **bad})
    layout = _block().sparse_layout(_mask(0.4, 1))
    assert layout.gather_index is layout.flat_index and layout.block_mask is None and layout.attn_mask is not None


def test_padded_layout_gives_every_row_its_own_slot_and_the_active_tokens_their_places():
    active = _mask(0.3, 2, batch=3)
    plain, padded = SparseLayout.from_mask(active), SparseLayout.from_mask(active, bucket=16)
    n = plain.n_active
    assert len(padded.gather_index) % 16 == 0 and len(padded.gather_index) - n < 16 and padded.max_active % 16 == 0
    assert torch.equal(padded.flat_index, plain.flat_index) and torch.equal(padded.gather_index[:n], plain.flat_index)
    assert torch.equal(padded.positions[:n], plain.positions)
    assert len(padded.padded_index.unique()) == len(padded.padded_index)  # no two rows share a query slot
    rows, slots = padded.padded_index[:n] // padded.max_active, padded.padded_index[:n] % padded.max_active
    plain_rows, plain_slots = plain.padded_index // plain.max_active, plain.padded_index % plain.max_active
    assert torch.equal(rows, plain_rows) and torch.equal(slots, plain_slots)
    assert torch.all(padded.positions[n:] == 0)  # padding queries see key 0: no empty softmax row
    x = torch.randn(len(padded.gather_index), 4)
    unpadded = x[:n]
    assert torch.equal(padded.unpad(x), unpadded) and plain.unpad(unpadded) is unpadded


def test_flex_block_mask_is_create_block_masks():
    """The block mask built from the query positions is the one create_block_mask evaluates pair by pair: the
    same key blocks, the same ones needing no mask, for query counts and lengths off the block size."""
    from torch.nn.attention.flex_attention import create_block_mask

    for batch, n_queries, seq_len in [(3, 48, 80), (2, 300, 700), (2, 130, 256)]:
        query_pos = torch.randint(0, seq_len, (batch, n_queries), generator=torch.Generator().manual_seed(n_queries))
        query_pos[:, -5:] = 0  # unused slots

        def visible(b, h, q, kv, query_pos=query_pos):
            return kv <= query_pos[b, q]

        want = create_block_mask(visible, batch, None, n_queries, seq_len, device="cpu")
        got = layers._causal_block_mask(query_pos, seq_len)
        assert torch.equal(got.to_dense(), want.to_dense())
        assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)


# -- torch.compile -----------------------------------------------------------------------------------------------
def test_dense_path_compiles_without_a_graph_break():
    """One TransformerLayer (inputs with and without gradient: the folded-norm variant) and a whole LEGOBlock.run
    with every token active: one graph each, no break (the threshold is read as a tensor, no `.item()`)."""
    block = _block()
    h = torch.randn(2, 16, DIM)
    for x in (h, h.clone().requires_grad_()):
        explained = torch._dynamo.explain(block.layers[0])(x, block.rope)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    explained = torch._dynamo.explain(block.run)(h.clone().requires_grad_(), None, "active")
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert explained.op_count > 20  # the layers really were traced


def test_padded_sparse_path_bounds_recompiles_and_keeps_outputs():
    """20 random masks (20-80 % active) through compiled layers: padded to multiples of 64, they make at most
    4 shapes, so at most 8 compiles (the first layer's folded-norm variant doubles them); unpadded they would be
    20. Outputs equal the eager, unpadded block's."""
    block = _block(layers_=3)
    eager = copy.deepcopy(block)
    block.sparse_bucket = 64
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    block.compile_layers(backend=counting_backend, dynamic=False)
    h = torch.randn(4, SEQ, DIM)
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(4, SEQ, generator=generator) < 0.2 + 0.6 * i / 19 for i in range(20)]
    padded_shapes, plain_shapes = set(), set()
    for active in masks:
        layout, plain = block.sparse_layout(active), eager.sparse_layout(active)
        padded_shapes.add((len(layout.gather_index), layout.max_active))
        plain_shapes.add((len(plain.gather_index), plain.max_active))
        out = block.run(h, active, logits_for="active")
    assert len(plain_shapes) > 10 and len(padded_shapes) <= 4
    assert 0 < len(compiles) <= 2 * len(padded_shapes)
    want = eager.run(h, masks[-1], logits_for="active")
    torch.testing.assert_close(out.hidden, want.hidden)
    torch.testing.assert_close(out.logits, want.logits)


def test_compiled_layer_shares_its_code_across_layers():
    """Compiling every layer of a block compiles the dense layer once, not once per layer."""
    block = _block(layers_=4)
    compiles = []
    block.compile_layers(backend=lambda graph, inputs: compiles.append(1) or graph.forward, dynamic=False)
    h = torch.randn(2, 16, DIM, requires_grad=True)
    block.run(h, None, logits_for="none")
    assert len(compiles) == 1


# -- MoE: grouped_mm where it runs, groups aligned on CUDA -------------------------------------------------------
def test_grouped_mm_choice_by_device_and_dtype():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert [grouped_mm_dtype("cpu", dtype) for dtype in (f32, bf16, f16, torch.float64)] == [f32, bf16, f16, None]
    assert grouped_mm_dtype("cuda", f32) is None  # CUDA's kernel is bfloat16 only
    assert grouped_mm_dtype("cuda", f32, autocast_dtype=bf16) == bf16  # autocast casts the experts, as a linear
    assert grouped_mm_dtype("cuda", bf16) == bf16
    assert grouped_mm_dtype("cuda", f32, autocast_dtype=f16) is None and grouped_mm_dtype("cuda", f16) is None
    assert grouped_mm_dtype("mps", f32) is None
    assert group_alignment("cuda", bf16) == 8 and group_alignment("cpu", f32) == 1
    experts = GroupedExperts(12, 8, 4)  # 12 float32 columns: 48 bytes, aligned; 6 would be 24 bytes
    assert grouped_mm_supported(torch.randn(5, 12), experts.w_gate_up, experts.w_down)
    assert not grouped_mm_supported(torch.randn(5, 6), GroupedExperts(6, 8, 4).w_gate_up)


def test_aligned_groups_start_at_multiples_and_give_the_unaligned_results():
    counts = torch.tensor([3, 0, 9, 1, 0, 6])
    n = int(counts.sum())
    rows, offsets, size = aligned_groups(counts, n, 8)
    assert size == n + 6 * 7 and int(offsets[-1]) == size
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    assert torch.all(starts % 8 == 0)
    expert_of_row = torch.repeat_interleave(torch.arange(6), counts)
    assert torch.all(rows >= starts[expert_of_row]) and torch.all(rows < offsets[expert_of_row])
    assert len(rows.unique()) == n
    torch.manual_seed(0)
    experts = GroupedExperts(16, 24, 6)
    x = torch.randn(n, 16, requires_grad=True)
    grad = torch.randn(n, 16)
    results = []
    for align in (1, 8):
        out = experts.forward_grouped(x, counts, align=align)
        results.append((out, torch.autograd.grad(out, [x, *experts.parameters()], grad)))
    assert_same_outputs_and_grads(*results)


# -- autocast ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_routed_model_runs_under_bfloat16_autocast():
    """Under autocast the head and exit classifier give bfloat16 rows; the routed forward keeps each in its
    place (the logits buffer in the head's dtype, exit logits in the states'), and tokens still exit."""
    torch.manual_seed(0)
    model = LEGOTransformer(40, DIM, [LEGOBlock(DIM, HEADS, 1, max_seq_len=SEQ) for _ in range(2)]).eval()
    x = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model.blocks[0].run(model.embedding(x))
        model.blocks[0].threshold = float(first.confidence.flatten().median())
        logits, stats = model(x, return_stats=True)
    assert logits.dtype == torch.bfloat16 and first.exit_logit.dtype == torch.float32
    assert 0 < stats.exit_counts[0] < x.numel()
    exited = stats.exit_block.reshape(-1) == 0
    torch.testing.assert_close(logits.reshape(-1, 40)[exited], first.logits[exited])


def test_layer_compile_covers_both_paths():
    layer = TransformerLayer(DIM, HEADS, 64)
    layer.compile(backend="eager")
    assert layer._compiled_call_impl is not None and layer._compiled_sparse is not None
