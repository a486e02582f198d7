"""The non-negotiable semantics of LEGO's model: causal context, TRUE early exit, keep = don't change,
training = inference on hard tokens, stage isolation. Tiny sizes, CPU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lego import FitConfig, LEGOBlock, LEGOConfig, LEGOTransformer, TrainingData
from lego.training.propagation import evaluate, propagate
from lego.training.routing import route
from lego.training.selection import select_hard

VOCAB, DIM, HEADS, SEQ = 50, 32, 4, 12


def make_model(layers=(1, 1), seed=0) -> LEGOTransformer:
    torch.manual_seed(seed)
    config = LEGOConfig(vocab_size=VOCAB, dim=DIM, num_heads=HEADS, layers_per_block=list(layers), max_seq_len=64)
    return LEGOTransformer.from_config(config).eval()


def random_tokens(batch=4, seq=SEQ, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def set_exit_share(model: LEGOTransformer, x: torch.Tensor, share: float) -> None:
    """Set Block 0's threshold so that `share` of the tokens exit there (ties aside)."""
    conf = model.blocks[0].run(model.embedding(x)).confidence.flatten().sort().values
    n_stay = len(conf) - int(round(share * len(conf)))
    model.blocks[0].threshold = float("inf") if n_stay == len(conf) else float(conf[n_stay]) if n_stay else -1.0


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# 1. Causal context -------------------------------------------------------------------------------
@torch.no_grad()
def test_position_t_never_depends_on_later_tokens_with_exits():
    model = make_model((2, 2))
    x = random_tokens()
    set_exit_share(model, x, 0.5)
    t = 5
    y = x.clone()
    y[:, t + 1 :] = (y[:, t + 1 :] + 7) % VOCAB
    logits_x, stats_x = model(x, return_stats=True)
    logits_y, stats_y = model(y, return_stats=True)
    assert 0 < stats_x.exit_counts[0] < x.numel()  # the routed (sparse) path really ran
    torch.testing.assert_close(logits_x[:, : t + 1], logits_y[:, : t + 1], rtol=0, atol=1e-5)
    assert torch.equal(stats_x.exit_block[:, : t + 1], stats_y.exit_block[:, : t + 1])


@torch.no_grad()
def test_active_tokens_attend_to_inactive_context():
    """An active token's output changes when an earlier *inactive* token's kept state changes: inactive
    tokens are keys/values, not dropped (the prototype fed tokens as length-1 sequences)."""
    block = make_model().blocks[1]
    h = torch.randn(1, SEQ, DIM)
    active = torch.zeros(1, SEQ, dtype=torch.bool)
    active[0, 8] = True
    before = block(h, active)[0][0, 8]
    h2 = h.clone()
    h2[0, 3] += 1.0
    after = block(h2, active)[0][0, 8]
    assert not torch.allclose(before, after)
    # ... but a later inactive token does not matter.
    h3 = h.clone()
    h3[0, 10] += 1.0
    torch.testing.assert_close(block(h3, active)[0][0, 8], before, rtol=0, atol=0)


# 2. TRUE early exit: cost scales with active tokens ----------------------------------------------
@torch.no_grad()
def test_flops_fall_with_exit_share():
    model = make_model((2, 2))
    x = random_tokens(batch=8)
    counted = {}
    for share in (0.0, 0.5, 1.0):
        set_exit_share(model, x, share)
        _, stats = model(x, return_stats=True)
        assert stats.exit_counts[0] == pytest.approx(share * x.numel(), abs=1)
        counted[share] = flops(lambda: model(x))
    assert counted[0.0] > counted[0.5] > counted[1.0]
    # All exit at Block 0: Block 1 does nothing at all, so cost = Block 0 + head for every token.
    block0_with_logits = flops(lambda: model.blocks[0](model.embedding(x)))
    assert counted[1.0] == block0_with_logits
    # Half exit: Block 1's layer work follows the honest cost (K/V for kept tokens, the rest for active).
    set_exit_share(model, x, 0.5)
    _, stats = model(x, return_stats=True)
    block1_flops = counted[0.5] - counted[1.0]
    block1_dense = counted[0.0] - counted[1.0]
    assert block1_flops / block1_dense == pytest.approx(stats.active_counts[1] / x.numel(), abs=0.25)
    assert block1_flops < 0.75 * block1_dense


@torch.no_grad()
def test_idle_block_does_no_work_and_all_active_is_plain_dense():
    block = make_model().blocks[1]
    h = torch.randn(2, SEQ, DIM)
    none_active = torch.zeros(2, SEQ, dtype=torch.bool)
    assert flops(lambda: block(h, none_active)) == 0
    out, _, should_exit = block(h, none_active)
    assert torch.equal(out, h) and not should_exit.any()
    all_active = torch.ones(2, SEQ, dtype=torch.bool)
    assert flops(lambda: block(h, all_active)) == flops(lambda: block(h))
    torch.testing.assert_close(block(h, all_active)[0], block(h)[0], rtol=0, atol=0)


@torch.no_grad()
def test_sparse_flops_scale_with_active_tokens():
    block = LEGOBlock(64, 4, 2, max_seq_len=64)
    block.attach_head(torch.nn.Linear(64, VOCAB, bias=False))
    h = torch.randn(4, 32, 64)
    gen = torch.Generator().manual_seed(0)
    dense = flops(lambda: block(h))
    full, kv = block.layer_flops(32)
    for share in (0.25, 0.5, 0.75):
        active = torch.rand(4, 32, generator=gen) < share
        frac = active.float().mean().item()
        ideal = frac + (1 - frac) * kv / full
        assert flops(lambda a=active: block(h, a)) / dense == pytest.approx(ideal, abs=0.12)


# 3. Keep = don't change ---------------------------------------------------------------------------
@torch.no_grad()
def test_inactive_tokens_are_returned_bit_identical():
    block = make_model((1, 3)).blocks[1]
    h = torch.randn(3, SEQ, DIM)
    active = torch.rand(3, SEQ, generator=torch.Generator().manual_seed(3)) < 0.5
    out, logits, should_exit = block(h, active)
    assert torch.equal(out[~active], h[~active])
    assert not torch.equal(out[active], h[active])
    assert torch.all(logits[~active] == 0) and not should_exit[~active].any()


@torch.no_grad()
def test_exited_token_logits_are_its_blocks_logits():
    model = make_model((2, 2))
    x = random_tokens()
    set_exit_share(model, x, 0.5)
    logits, stats = model(x, return_stats=True)
    _, block0_logits, should_exit = model.blocks[0](model.embedding(x))
    exited = stats.exit_block == 0
    assert torch.equal(exited, should_exit)
    torch.testing.assert_close(logits[exited], block0_logits[exited], rtol=0, atol=1e-6)


@torch.no_grad()
def test_one_layer_block_matches_dense_run_for_continuing_tokens():
    """With a one-layer Block 1, a continuing token's K/V context is the same as in a dense run, so its
    logits equal the dense model's."""
    model = make_model((2, 1))
    x = random_tokens()
    dense_logits = model(x)  # thresholds are infinite: nothing exits, every token reaches Block 1
    set_exit_share(model, x, 0.5)
    logits, stats = model(x, return_stats=True)
    continuing = stats.exit_block == 1
    assert 0 < int(continuing.sum()) < x.numel()
    torch.testing.assert_close(logits[continuing], dense_logits[continuing], rtol=1e-5, atol=1e-5)


# 4. Training on hard tokens = inference with active = hard ---------------------------------------
def small_dataset(n=48, seed=0) -> TrainingData:
    windows = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    windows[:, 1::2] = (windows[:, 0:-1:2] * 3 + 1) % VOCAB  # a learnable pattern on every other token
    return TrainingData.from_windows(windows)


FAST = {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16}


def test_training_loss_counts_active_tokens_only():
    model = make_model()
    data = small_dataset()
    hard, _ = model.blocks[0].fit(data, small_dataset(8, seed=1), FitConfig(**FAST), embedding=model.embedding)
    from lego.fitting import train_step

    batch = next(hard.batches(8))
    loss_a = train_step(model.blocks[1], batch, None, FitConfig(**FAST), torch.device("cpu"))
    changed = TrainingData(batch.hidden_states, torch.where(batch.active, batch.targets, 0), batch.active)
    loss_b = train_step(model.blocks[1], changed, None, FitConfig(**FAST), torch.device("cpu"))
    assert loss_a[3] == int(batch.active.sum())
    torch.testing.assert_close(loss_a[0], loss_b[0], rtol=0, atol=0)
    step_flops = flops(lambda: train_step(model.blocks[1], batch, None, FitConfig(**FAST), torch.device("cpu")))
    dense = TrainingData(batch.hidden_states, batch.targets, torch.ones_like(batch.active))
    dense_flops = flops(lambda: train_step(model.blocks[1], dense, None, FitConfig(**FAST), torch.device("cpu")))
    assert step_flops < 0.8 * dense_flops


def test_block1_training_inputs_equal_inference_routing():
    """Block 1 trains on Block 0's stored hidden states with active = hard; at inference with a threshold
    that lets exactly the hard tokens continue, Block 1 computes the same logits for them."""
    model = make_model()
    data = small_dataset(16)
    model.blocks[0].fit(data, small_dataset(8, seed=1), FitConfig(**FAST), embedding=model.embedding)
    hidden, confidence, _ = propagate(model.blocks[0], data, model.embedding, 16)
    hard = select_hard(confidence, data.active, 0.5)
    model.blocks[0].threshold = float(confidence[~hard].min())  # exactly the non-hard tokens exit
    with torch.no_grad():
        logits, stats = model(data.input_ids, return_stats=True)
        _, block1_logits, _ = model.blocks[1](hidden, hard)
    assert torch.equal(stats.exit_block == 1, hard)
    torch.testing.assert_close(logits[hard], block1_logits[hard], rtol=1e-5, atol=1e-5)


# 5. Stage k never changes what earlier stages compute --------------------------------------------
def test_stage_isolation_bit_for_bit():
    model = make_model()
    train, val = small_dataset(), small_dataset(8, seed=1)
    hard, _ = model.blocks[0].fit(train, val, FitConfig(**FAST), embedding=model.embedding)
    x = random_tokens()
    before_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    with torch.no_grad():
        before_out = model.blocks[0].run(model.embedding(x))
    model.blocks[1].fit(hard, route(model.blocks[0], val, model.embedding, 8), FitConfig(**FAST, lr=1e-2))
    after_state = model.state_dict()
    for key, value in before_state.items():
        assert torch.equal(value, after_state[key]), key
    with torch.no_grad():
        after_out = model.blocks[0].run(model.embedding(x))
    assert torch.equal(before_out.hidden, after_out.hidden)
    assert torch.equal(before_out.confidence, after_out.confidence)
    assert not any(p is model.head.weight for p in model.blocks[1].parameters())


# Hard tokens by ratio, threshold calibration, determinism ---------------------------------------
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_hard_count_is_exact_ratio_of_active_tokens(ratio):
    gen = torch.Generator().manual_seed(0)
    active = torch.rand(10, 37, generator=gen) < 0.6
    confidence = torch.rand(10, 37, generator=gen)
    hard = select_hard(confidence, active, ratio)
    n = int(active.sum())
    assert int(hard.sum()) == int(n * ratio)
    assert not (hard & ~active).any()
    # bottom by confidence: every hard token is at most as confident as every non-hard active one
    assert confidence[hard].max() <= confidence[active & ~hard].min()


def test_fit_collects_hard_tokens_and_calibrates_threshold():
    model = make_model()
    train, val = small_dataset(), small_dataset(16, seed=1)
    hard, stats = model.blocks[0].fit(train, val, FitConfig(**FAST, hard_ratio=0.3), embedding=model.embedding)
    assert len(hard) == int(len(train) * 0.3) == stats.hard_count
    assert stats.threshold == model.blocks[0].threshold
    assert stats.calibration["val_exit_rate"] == pytest.approx(0.7, abs=0.02)
    assert hard.hidden_states.shape == (*train.targets.shape, DIM)


def test_fit_is_deterministic_and_learns():
    results = []
    for _ in range(2):
        model = make_model()
        hard, stats = model.blocks[0].fit(
            small_dataset(96),
            small_dataset(16, seed=1),
            FitConfig(**{**FAST, "epochs": 3}, lr=3e-3),
            embedding=model.embedding,
        )
        results.append((model.state_dict(), hard, stats))
    (state_a, hard_a, stats_a), (state_b, hard_b, stats_b) = results
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(hard_a.active, hard_b.active)
    assert stats_a.evals[-1]["val_loss"] < stats_a.evals[0]["val_loss"] or stats_a.best_eval > 0
    assert stats_a.best_val_ppl < VOCAB  # below the uniform guess


def test_exit_classifier_training_never_changes_the_language_model():
    """The exit loss reads a detached input and is clipped on its own: the LM weights after training are the
    same with or without it (a shared clip norm would shrink the LM's steps by the classifier's gradient)."""
    trained = []
    for exit_weight in (0.0, 1.0):
        model = make_model()
        config = FitConfig(**FAST, lr=3e-3, grad_clip=0.5, exit_loss_weight=exit_weight)
        model.blocks[0].fit(small_dataset(), small_dataset(16, seed=1), config, embedding=model.embedding)
        lm_only = {k: v for k, v in model.state_dict().items() if "exit_classifier" not in k and "threshold" not in k}
        trained.append(lm_only)
    assert all(torch.allclose(trained[0][k], trained[1][k], atol=1e-6) for k in trained[0])


def test_early_stopping_restores_best_weights():
    model = make_model()
    config = FitConfig(**{**FAST, "epochs": 6}, lr=0.5, patience=1, evals_per_epoch=2)  # diverges
    _, stats = model.blocks[0].fit(small_dataset(), small_dataset(16, seed=1), config, embedding=model.embedding)
    assert stats.stopped_early
    from lego.training.propagation import evaluate

    restored = evaluate(model.blocks[0], small_dataset(16, seed=1), model.embedding, 16)
    assert restored["ppl"] == pytest.approx(stats.best_val_ppl, rel=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method", ["max_softmax", "entropy"])
def test_confidence_from_logits_decides_exits(method):
    """Comparison confidences are read off the block's own distribution, and routing follows them."""
    model = make_model((1, 1))
    for block in model.blocks:
        block.confidence_method = method
    x = random_tokens()
    out = model.blocks[0].run(model.embedding(x))
    probs = out.logits.softmax(-1)
    if method == "max_softmax":
        expected = probs.max(-1).values
    else:
        expected = 1 + (probs * probs.log()).sum(-1) / torch.log(torch.tensor(float(VOCAB)))
    torch.testing.assert_close(out.confidence.flatten(), expected, rtol=1e-5, atol=1e-6)
    model.blocks[0].threshold = float(out.confidence.median())
    _, stats = model(x, return_stats=True)
    assert torch.equal(stats.exit_block == 0, out.confidence >= model.blocks[0].threshold)


@torch.no_grad()
@pytest.mark.parametrize("share", [0.25, 0.5, 0.9])
def test_honest_cost_matches_counted_flops(share):
    """`honest_cost` is what FlopCounterMode measures for the routed forward over the dense one."""
    model = make_model((2, 2))
    x = random_tokens(batch=8, seq=32)
    dense = flops(lambda: model(x))
    set_exit_share(model, x, share)
    _, stats = model(x, return_stats=True)
    assert stats.honest_cost == pytest.approx(flops(lambda: model(x)) / dense, abs=0.03)
    assert stats.honest_cost > stats.compute_cost  # the original metric leaves out the K/V work


def test_streamed_hard_tokens_equal_in_memory_ones(tmp_path):
    results = []
    for path in (None, str(tmp_path / "hard.safetensors")):
        model = make_model()
        config = FitConfig(**FAST, hard_data_path=path)
        hard, _ = model.blocks[0].fit(small_dataset(), small_dataset(8, seed=1), config, embedding=model.embedding)
        results.append(hard)
    in_memory, streamed = results
    assert torch.equal(in_memory.hidden_states, streamed.hidden_states)
    assert torch.equal(in_memory.active, streamed.active)


def test_bfloat16_dump_is_the_rounded_float32_one_and_the_next_block_trains_on_it_in_float32(tmp_path):
    """`hard_data_dtype="bfloat16"` changes only the stored precision: the same hard tokens, states rounded to
    bfloat16, and Block 1 widens them back to its own float32 (its loss within rounding of the float32 one)."""
    dumps = {}
    for dtype in ("float32", "bfloat16"):
        model = make_model()
        config = FitConfig(**FAST, hard_data_path=str(tmp_path / f"{dtype}.safetensors"), hard_data_dtype=dtype)
        train, val = small_dataset(), small_dataset(8, seed=1)
        dumps[dtype], _ = model.blocks[0].fit(train, val, config, embedding=model.embedding)
    wide, narrow = dumps["float32"], dumps["bfloat16"]
    assert narrow.hidden_states.dtype == torch.bfloat16 and narrow.targets.dtype == torch.int32
    assert torch.equal(narrow.hidden_states, wide.hidden_states.bfloat16())
    assert torch.equal(narrow.active, wide.active) and torch.equal(narrow.targets, wide.targets)
    block = model.blocks[1]
    losses = [evaluate(block, data, None, 16)["loss"] for data in (wide, narrow)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    with pytest.raises(ValueError, match="hard_data_dtype must be one of"):
        FitConfig(hard_data_dtype="float16")


def test_every_training_step_loss_is_recorded_between_validations():
    """Each validation row carries the LM loss of every step since the previous one: the whole training
    curve, not one mean per validation."""
    model = make_model()
    steps = {}
    config = FitConfig(**{**FAST, "epochs": 2}, evals_per_epoch=3, hard_ratio=None, log_every_steps=1)
    _, stats = model.blocks[0].fit(
        small_dataset(),
        small_dataset(8, seed=1),
        config,
        embedding=model.embedding,
        callback=lambda e: steps.update({e["step"]: e["lm_loss"]}) if e["kind"] == "step" else None,
    )
    assert len(stats.evals) >= 6
    recorded = [loss for row in stats.evals for loss in row["step_losses"]]
    assert recorded == [steps[s] for s in sorted(steps)]
    previous = 0
    for row in stats.evals:
        assert len(row["step_losses"]) == row["step"] - previous
        previous = row["step"]
