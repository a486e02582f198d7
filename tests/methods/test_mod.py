"""Mixture-of-Depths (`lego.methods.mod`): top-k routing at the capacity per sequence in training, unrouted tokens
passed on unchanged, causal routing at evaluation, a FLOP count that scales with the routed tokens, and
`python train.py +experiment=mod_tiny` end to end."""

import json

import pytest
import torch

from lego.errors import ConfigError
from lego.layers import TransformerLayer, swiglu_hidden_dim
from lego.methods.mod import MoDConfig, MoDLayer, calibrate_thresholds, forward_flops, mod_layers, routing, to_mod
from lego.model import LEGOConfig, LEGOTransformer
from lego.pipeline.config import RunConfig
from lego.pipeline.loading import load_run
from lego.pipeline.mod import train_from_run
from lego.training.routing import evaluate_routed
from tests.launch import run_train

DIM, SEQ = 32, 32


def _layer(unrouted_kv: bool, capacity: float = 0.125) -> tuple[MoDLayer, LEGOTransformer]:
    torch.manual_seed(0)
    model = LEGOTransformer.from_config(LEGOConfig(64, DIM, 4, [1], max_seq_len=SEQ))
    layer = MoDLayer(TransformerLayer(DIM, 4, swiglu_hidden_dim(DIM)), capacity, unrouted_kv)
    return layer, model


def _model(unrouted_kv: bool, capacity: float = 0.125, every: int = 2) -> LEGOTransformer:
    torch.manual_seed(0)
    model = LEGOTransformer.from_config(LEGOConfig(64, DIM, 4, [4], max_seq_len=SEQ))
    return to_mod(model, MoDConfig(capacity=capacity, every=every, unrouted_kv=unrouted_kv))


@pytest.mark.parametrize("unrouted_kv", [False, True])
def test_training_routes_the_capacity_of_every_sequence_and_leaves_the_others_unchanged(unrouted_kv):
    layer, model = _layer(unrouted_kv, capacity=0.25)
    x = torch.randn(5, SEQ, DIM)
    out = layer.train()(x, model.blocks[0].rope)
    changed = (out != x).any(dim=-1)
    assert changed.sum(dim=1).tolist() == [SEQ // 4] * 5  # top-k: 8 of each sequence's 32 tokens
    scores = layer.router(x).squeeze(-1)
    assert torch.equal(changed, scores >= scores.topk(SEQ // 4, dim=1).values[:, -1:])  # the top-scoring ones
    assert layer.aux_loss is not None and layer.history[-1] == (5 * SEQ, 5 * SEQ // 4)


@pytest.mark.parametrize("unrouted_kv", [False, True])
def test_evaluation_routes_where_the_router_says_so_and_leaves_the_others_unchanged(unrouted_kv):
    layer, model = _layer(unrouted_kv)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(5, SEQ, DIM)
    with torch.no_grad():
        out = layer.eval()(x, model.blocks[0].rope)
        routed = layer.router(x).squeeze(-1) >= 0  # sigmoid(score) >= 0.5
    assert 0 < int(routed.sum()) < routed.numel() and len(set(routed.sum(dim=1).tolist())) > 1  # uneven rows
    assert torch.equal(out[~routed], x[~routed]) and bool((out[routed] != x[routed]).all(dim=-1).all())


@pytest.mark.parametrize("unrouted_kv", [False, True])
def test_evaluation_routing_is_causal_and_training_routing_is_not(unrouted_kv):
    """A later token's router score made the largest of its sequence: causal routing at t < 20 does not move, top-k
    routing drops an earlier token for it."""
    layer, model = _layer(unrouted_kv)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(4, SEQ, DIM)
    later = x.clone()
    later[:, 20:] = 10 * layer.router.weight.detach().squeeze(0)  # the top score of every sequence
    with torch.no_grad():
        for topk, causal in ((False, True), (True, False)):
            layer.topk = topk
            a, b = layer(x, model.blocks[0].rope), layer(later, model.blocks[0].rope)
            assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6) is causal


@pytest.mark.parametrize("unrouted_kv", [False, True])
def test_a_mod_model_in_eval_mode_never_reads_a_later_token(unrouted_kv):
    model = _model(unrouted_kv).eval()
    for layer in mod_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=1.0)  # route a fair share of the tokens
    x = torch.randint(0, 64, (4, SEQ), generator=torch.Generator().manual_seed(1))
    later = x.clone()
    later[:, 17:] = (later[:, 17:] + 1) % 64
    with torch.no_grad():
        a, b = model(x), model(later)
    torch.testing.assert_close(a[:, :17], b[:, :17], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 17:], b[:, 17:])


def test_flops_scale_with_the_routed_tokens():
    """The honest cost of an evaluation is the FLOP count of the tokens routed: with unrouted K/V it rises by the
    same step for each step of routed tokens; without, it is lower; every layer routing all tokens costs what the
    model's own counter says for the dense layers, plus the routers."""
    windows = torch.randint(0, 64, (6, SEQ + 1), generator=torch.Generator().manual_seed(2))
    costs = {}
    for kv in (True, False):
        for capacity in (0.25, 0.5, 0.75):
            model = _model(kv, capacity).eval()
            with routing(model, topk=True):  # exactly the capacity
                costs[kv, capacity] = evaluate_routed(model, windows, 6, torch.device("cpu"))["honest_cost"]
    assert costs[True, 0.25] < costs[True, 0.5] < costs[True, 0.75] < 1.0
    assert costs[True, 0.5] - costs[True, 0.25] == pytest.approx(costs[True, 0.75] - costs[True, 0.5], rel=1e-9)
    assert all(costs[False, c] < costs[True, c] for c in (0.25, 0.5, 0.75))
    block, n = _model(True, 1.0, every=1).blocks[0], 6 * SEQ
    assert forward_flops(block, n, SEQ, [n] * 4) == pytest.approx(block.forward_flops(n, n, SEQ) + 4 * n * 2 * DIM)


def test_capacity_thresholds_route_the_capacity_of_the_calibration_tokens():
    model = _model(unrouted_kv=False, capacity=0.25)
    windows = torch.randint(0, 64, (8, SEQ + 1), generator=torch.Generator().manual_seed(3))
    calibrate_thresholds(model, windows, 0.25, batch_size=4)
    n = evaluate_routed(model, windows, 4, torch.device("cpu"))["tokens"]
    for layer in mod_layers(model).values():
        assert float(layer.threshold_) != 0.0
        assert layer.routed_in_last(n) / n == pytest.approx(0.25, abs=2 / n)


def test_bad_mod_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"mod\.capacity"):
        MoDConfig(capacity=1.5)
    model = LEGOTransformer.from_config(LEGOConfig(64, DIM, 4, [1, 1], max_seq_len=SEQ))
    with pytest.raises(ConfigError, match="method=mod trains one block"):
        train_from_run(RunConfig(method="mod"), model, None, None, None, None)


def test_mod_tiny_end_to_end(tmp_path, cache_dir):
    """With `trainer.calibration=ltt` too: a model without early exit has nothing to calibrate, and says so."""
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=mod_tiny", f"hydra.run.dir={run_dir}", "wandb=disabled", "trainer.calibration=ltt",
                     cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Learn-then-Test exits" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mod" and results["test_ppl"] < results["unigram_ppl"] * 1.5
    mod = results["mod"]
    assert mod["test_ppl_routing"].startswith("causal") and mod["capacity"] == 0.125 and not mod["unrouted_kv"]
    assert list(mod["test_routed_share"]) == ["block0.layer1"] and 0 <= mod["test_routed_share"]["block0.layer1"] < 1
    assert results["honest_cost"] < 1 and results["train_flops_vs_dense"] < 1  # layer 1 computes few tokens
    assert (run_dir / "stage_0" / "stats.json").is_file() and not (run_dir / "stage_0" / "checkpoint.pt").exists()
    ltt = results["ltt"]
    assert results["calibration"] == "ltt" and ltt["exit_blocks"] == [] and ltt["exit_share"] == 0.0
    assert ltt["tested"] == [] and ltt["test_risk"] == 0.0 and results["shallow_ratio"] == 0.0
    # the run loads back as the model that scored its test PPL: its routers and causal thresholds included
    loaded = load_run(run_dir)
    batch = loaded.config.trainer.eval_batch_size
    test = evaluate_routed(loaded.model, loaded.prepare_data(cache_dir).test, batch, torch.device("cpu"))
    assert test["ppl"] == pytest.approx(results["test_ppl"], rel=1e-6)
    assert {name: float(layer.threshold_) for name, layer in mod_layers(loaded.model).items()} == mod["thresholds"]
