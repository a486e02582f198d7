"""The MoE feed-forward: grouped_mm equals the per-expert loop, and it composes with TRUE early exit. Tiny, CPU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lego import FitConfig, LEGOConfig, LEGOTransformer, TrainingData
from lego.layers import SparseLayout
from lego.model import LEGOBlock
from lego.moe import MoEConfig, MoEFeedForward, RoutingTally, grouped_mm_supported
from lego.training.routing import route

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
    assert_same_outputs_and_grads(*results)


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


# Balancing, stage isolation, resume, FLOPs: real (tiny) training through LEGOBlock.fit -------------------------
VOCAB, SEQ = 40, 16


def moe_model(moe: MoEConfig, layers=(1, 1), seed: int = 0) -> LEGOTransformer:
    torch.manual_seed(seed)
    config = LEGOConfig(vocab_size=VOCAB, dim=DIM, num_heads=2, layers_per_block=list(layers), max_seq_len=SEQ,
                        moe=moe)  # fmt: skip
    return LEGOTransformer.from_config(config)


def token_data(n: int, seed: int) -> TrainingData:
    generator = torch.Generator().manual_seed(seed)
    return TrainingData.from_windows(torch.randint(0, VOCAB, (n, SEQ + 1), generator=generator))


def collapse(model: LEGOTransformer) -> None:
    """Every token's state shares one large direction and every router scores two experts high along it: the
    load piles on those two."""
    shared = torch.randn(DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.embedding.weight += 0.3 * shared / shared.norm()
        for ffn in model.named_moe_ffns().values():
            ffn.router.weight.zero_()
            ffn.router.weight[:2] = 0.5 * shared / shared.norm()


def train_imbalance(balance: str, steps: int = 120) -> tuple[float, float]:
    """(imbalance of the first step, mean imbalance of the last 10 steps) of Block 0's MoE layer."""
    # the bias update as DeepSeek-V3 runs it, on sigmoid scores (on softmax ones its sign steps overshoot more)
    moe = MoEConfig(num_experts=8, top_k=2, balance=balance, aux_loss_weight=0.1, z_loss_weight=0.0,
                    bias_update_rate=0.01, score_func="sigmoid" if balance == "bias" else "softmax")  # fmt: skip
    model = moe_model(moe)
    collapse(model)
    seen = []
    config = FitConfig(epochs=100, max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, evals_per_epoch=1,
                       patience=1000, log_every_steps=1)  # fmt: skip
    def record(event: dict) -> None:
        if event["kind"] == "step":
            seen.append(event["moe_imbalance"])

    model.blocks[0].fit(token_data(64, 0), token_data(8, 1), config, embedding=model.embedding, callback=record)
    return seen[0], sum(seen[-10:]) / 10


def test_balancing_spreads_a_collapsed_router():
    """A router started collapsed (2 of 8 experts take everything: imbalance 4) spreads its load within 120
    steps under the auxiliary loss or the bias update, and stays collapsed without balancing."""
    start, aux = train_imbalance("aux_loss")
    _, bias = train_imbalance("bias")
    _, none = train_imbalance("none")
    assert start > 3.5
    assert aux < 1.8 and bias < 1.8, (aux, bias)
    assert none > 2.5, none


@pytest.mark.parametrize("balance", ["aux_loss", "bias"])
def test_stage_isolation_with_moe_in_both_blocks(balance):
    """Training Block 1 (MoE, bias steps included) never changes Block 0's experts, router or balancing bias."""
    model = moe_model(MoEConfig(num_experts=4, top_k=2, balance=balance, bias_update_rate=0.01))
    config = FitConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=1, hard_ratio=0.5)
    hard, _ = model.blocks[0].fit(token_data(32, 0), token_data(8, 1), config, embedding=model.embedding)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    assert balance != "bias" or before["blocks.0.layers.0.ffn.expert_bias"].abs().sum() > 0  # it did balance
    block1_bias = model.blocks[1].layers[0].ffn.expert_bias.clone()
    routed_val = route(model.blocks[0], token_data(8, 1), model.embedding, 8)
    model.blocks[1].fit(hard, routed_val, FitConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=1))
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    if balance == "bias":
        assert not torch.equal(model.blocks[1].layers[0].ffn.expert_bias, block1_bias)  # Block 1's own moved


def test_interrupted_moe_stage_resumes_with_its_balancing_bias(tmp_path):
    """Killed mid-stage, a resumed MoE stage ends bit-identical to an uninterrupted one: the checkpoint holds the
    balancing bias as it was (a collapsed router, so the bias is busy moving when the stage is killed)."""
    moe = MoEConfig(num_experts=8, top_k=2, balance="bias", score_func="sigmoid", bias_update_rate=0.01)
    config = dict(epochs=3, batch_size=8, warmup_steps=1, evals_per_epoch=2, patience=10)

    def fresh() -> LEGOTransformer:
        model = moe_model(moe)
        collapse(model)
        return model

    model = fresh()
    model.blocks[0].fit(token_data(40, 0), token_data(8, 1), FitConfig(**config), embedding=model.embedding)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    def kill_after_step_8(event):
        if event["kind"] == "step" and event["step"] == 8:
            raise KeyboardInterrupt

    ckpt = tmp_path / "stage.pt"
    model = fresh()
    with pytest.raises(KeyboardInterrupt):
        model.blocks[0].fit(token_data(40, 0), token_data(8, 1), FitConfig(**config, checkpoint_path=str(ckpt)),
                            embedding=model.embedding, callback=kill_after_step_8)  # fmt: skip
    saved = torch.load(ckpt, weights_only=True)["weights"][0]["layers.0.ffn.expert_bias"]
    assert saved.abs().sum() > 0  # the checkpoint holds the bias as it was
    model = fresh()
    model.blocks[0].fit(token_data(40, 0), token_data(8, 1), FitConfig(**config, checkpoint_path=str(ckpt)),
                        embedding=model.embedding)  # fmt: skip
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
    assert reference["blocks.0.layers.0.ffn.expert_bias"].abs().sum() > 0


@torch.no_grad()
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_flops_and_honest_cost_match_counted_flops(shared):
    """An MoE layer's FLOP model (active parameters only: router, top_k experts, shared expert) adds exactly what
    FlopCounterMode counts over the same dense model on the per-expert loop path (the CPU's attention kernel is
    not counted by it, so the difference is compared), and honest_cost matches the counted ratio."""
    moe = MoEConfig(num_experts=4, top_k=2, shared_experts=shared, grouped_mm=False)
    x = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(2))
    counted, modelled = [], []
    for config in (None, moe):
        model = moe_model(config, layers=(1, 2)).eval()
        with FlopCounterMode(display=False) as counter:
            model(x)
        counted.append(counter.get_total_flops())
        modelled.append(sum(block.forward_flops(x.numel(), x.numel(), SEQ) for block in model.blocks))
    assert modelled[1] - modelled[0] == counted[1] - counted[0] > 0
    conf = model.blocks[0].run(model.embedding(x)).confidence.flatten().sort().values
    model.blocks[0].threshold = float(conf[len(conf) // 2])  # half the tokens exit at Block 0
    with FlopCounterMode(display=False) as counter:
        _, stats = model(x, return_stats=True)
    assert stats.honest_cost == pytest.approx(counter.get_total_flops() / counted[1], abs=0.03)
    assert 0.3 < stats.honest_cost < 0.9


def test_routing_tally_sums_forwards_and_counts_only_the_asked_mode():
    moe = MoEFeedForward(DIM, 32, MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5))
    x = torch.randn(30, DIM)
    with RoutingTally({"ffn": moe}, training=False) as tally:
        moe.eval()
        moe(x)
        first = moe.stats
        moe(x[:10])
        second = moe.stats
        moe.train()
        moe(x)  # not counted
    (row,) = tally.summary()
    assert row["tokens"] == 40
    counts = first.counts + second.counts  # the pooled load is the two forwards' slot counts together
    torch.testing.assert_close(torch.tensor(row["load"]), (counts / counts.sum()).float())
    assert row["dropped"] == pytest.approx(1 - float(counts.sum()) / (40 * 2))  # 40 tokens, top-2: 80 slots
    assert row["imbalance"] == pytest.approx(float(counts.max() / counts.mean()))
    assert 0 < row["dropped"] < 1 and first.dropped > 0  # capacity 0.5: slots over it are dropped and reported
    assert row["imbalance"] >= 1.0 and 0 < row["entropy"] <= row["max_entropy"]
    assert len(moe._forward_hooks) == 0  # closed


def assert_same_outputs_and_grads(first: tuple, second: tuple) -> None:
    """Two (output, gradients) pairs of the same computation by two paths agree."""
    (out_a, grads_a), (out_b, grads_b) = first, second
    torch.testing.assert_close(out_a, out_b)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(grad_a, grad_b)
