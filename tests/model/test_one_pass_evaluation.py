"""The final evaluation reads each split once for all its threshold settings (`evaluate_settings`): Block 0 runs
once per batch, and every setting's numbers are those of a forward of its own (`model(x)` with those thresholds)."""

import math

import pytest
import torch

from lego import LEGOConfig, LEGOTransformer
from lego.pipeline.evaluation import exit_share_thresholds, threshold_scan
from lego.training.routing import evaluate_routed, evaluate_settings
from lego.training.selection import calibrate_threshold

VOCAB, SEQ = 40, 12


def model_of(layers: list[int], seed: int = 0) -> LEGOTransformer:
    torch.manual_seed(seed)
    config = LEGOConfig(VOCAB, dim=16, num_heads=2, layers_per_block=layers, max_seq_len=SEQ)
    return LEGOTransformer.from_config(config).eval()


def windows(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def set_thresholds(model: LEGOTransformer, thresholds: list[float]) -> None:
    for block, threshold in zip(model.blocks, thresholds, strict=True):
        block.threshold = threshold


def settings_of(model: LEGOTransformer, x: torch.Tensor) -> list[list[float]]:
    """Full depth, and thresholds at a few quantiles of each block's confidences at full depth."""
    _, stats = model(x, return_stats=True)
    quantiles = [[float(c.quantile(q)) for c in stats.confidences[:-1]] for q in (0.2, 0.5, 0.9)]
    return [[math.inf] * len(model.blocks), *[[*q, math.inf] for q in quantiles]]


@torch.no_grad()
@pytest.mark.parametrize("layers", [[1, 1], [2, 2], [1, 2, 1]])
def test_forward_with_block_0_reused_is_the_forward_of_its_own(layers):
    model, x = model_of(layers), windows()[:, :-1]
    first = model.first_block(x)
    for thresholds in settings_of(model, x):
        set_thresholds(model, thresholds)
        logits, stats = model(x, return_stats=True)
        again, stats_again = model(x, return_stats=True, first=first)
        assert stats_again.exit_counts == stats.exit_counts and torch.equal(stats_again.exit_block, stats.exit_block)
        torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)  # one head call instead of one per subset
        assert stats.exit_counts[-1] > 0


@torch.no_grad()
def test_block_0_runs_once_per_batch_for_every_setting():
    model, data = model_of([2, 2]), windows(12)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(0))
    for layer in model.blocks[0].layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    settings = settings_of(model, data[:, :-1])
    calls.clear()
    evaluate_settings(model, data, settings, 4, "cpu")
    assert calls.count(1) == 3 * 2  # 3 batches x Block 0's 2 layers, for 4 settings


@torch.no_grad()
@pytest.mark.parametrize("layers", [[2, 2], [1, 2, 1]])
def test_every_setting_scores_as_its_own_evaluation(layers):
    model, data = model_of(layers), windows(10)
    settings = settings_of(model, data[:, :-1])
    saved = [block.threshold for block in model.blocks]
    together = evaluate_settings(model, data, settings, 4, "cpu", keep_confidences=1)
    assert [block.threshold for block in model.blocks] == saved  # restored
    for thresholds, result in zip(settings, together, strict=True):
        set_thresholds(model, thresholds)
        alone = reference_evaluation(model, data, 4)
        assert result["exit_counts"] == alone["exit_counts"] and result["active_counts"] == alone["active_counts"]
        assert result["ppl"] == pytest.approx(alone["ppl"], rel=1e-5)
        assert result["acc"] == alone["acc"]
        assert torch.equal(result["confidences"], alone["confidences"])
        assert [row["threshold"] for row in result["blocks"][:-1]] == thresholds[:-1]
        set_thresholds(model, saved)


def reference_evaluation(model: LEGOTransformer, data: torch.Tensor, batch_size: int) -> dict:
    """PPL, accuracy, counts and block 1's confidences from plain forwards, batch by batch."""
    ce, right, exits, active, conf = 0.0, 0, None, None, []
    for batch in data.split(batch_size):
        x, y = batch[:, :-1], batch[:, 1:]
        logits, stats = model(x, return_stats=True)
        ce += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        right += int((logits.argmax(-1) == y).sum())
        exits = [a + b for a, b in zip(exits or [0] * len(model.blocks), stats.exit_counts, strict=True)]
        active = [a + b for a, b in zip(active or [0] * len(model.blocks), stats.active_counts, strict=True)]
        conf.append(stats.confidences[1].float())
    n = data[:, 1:].numel()
    return {"ppl": math.exp(ce / n), "acc": right / n, "exit_counts": exits, "active_counts": active,
            "confidences": torch.cat(conf)}  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("layers", [[2, 2], [1, 1, 1, 1]])
def test_exit_share_thresholds_are_chosen_block_by_block(layers):
    """Block k's threshold for a share is the share's quantile of block k's confidences of the tokens reaching it
    when the blocks before it have that share's thresholds: the definition, computed one forward at a time."""
    model, val = model_of(layers), windows(16)
    shares = [0.0, 0.25, 0.5]
    chosen = exit_share_thresholds(model, val, shares, 4, "cpu")
    for share in shares:
        expected = [math.inf] * len(model.blocks)
        for k in range(len(model.blocks) - 1 if share else 0):
            set_thresholds(model, expected)
            reached = torch.cat([model(b[:, :-1], return_stats=True)[1].confidences[k].float() for b in val.split(4)])
            expected[k] = calibrate_threshold(reached, hard_ratio=1.0 - share)
        assert chosen[share] == expected
    last_exit = len(model.blocks) - 2
    only = exit_share_thresholds(model, val, [0.5], 4, "cpu", exits=[last_exit])[0.5]  # the others never exit
    assert only[last_exit] < math.inf and only.count(math.inf) == len(model.blocks) - 1


@torch.no_grad()
def test_the_scan_and_the_calibrated_setting_in_one_read_of_each_split():
    model, val, test = model_of([2, 2]), windows(12, seed=2), windows(8, seed=3)
    model.blocks[0].threshold = 0.5
    rows, (test_own,), (val_own,) = threshold_scan(model, val, test, [0.3, 0.6], 4, "cpu", score_val=True,
                                                   also=[[0.5, math.inf]])  # fmt: skip
    assert model.blocks[0].threshold == 0.5
    assert test_own["ppl"] == pytest.approx(evaluate_routed(model, test, 4, "cpu")["ppl"], rel=1e-6)
    assert val_own["ppl"] == pytest.approx(evaluate_routed(model, val, 4, "cpu")["ppl"], rel=1e-6)
    assert [row["target_exit_share"] for row in rows] == [0.6, 0.3, 0.0]  # by honest cost
    full = rows[-1]
    model.blocks[0].threshold = math.inf
    assert full["test_ppl"] == pytest.approx(evaluate_routed(model, test, 4, "cpu")["ppl"], rel=1e-6)
    assert full["honest_cost"] == pytest.approx(1.0) and "val_ppl" in full
