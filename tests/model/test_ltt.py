"""Learn-then-Test (`lego.training.ltt`): its p-values against values computed independently, fixed-sequence testing's
stopping rule, its guarantee and its efficiency in a seeded simulation, and the exit thresholds it sets on a model
(`lego.pipeline.evaluation.ltt_calibrate`)."""

import math

import pytest
import torch

from lego.model import LEGOConfig, LEGOTransformer
from lego.pipeline.evaluation import LTT_SHARES, ltt_calibrate, measured_risk, token_predictions
from lego.training.ltt import binomial_cdf, fixed_sequence_test, p_value


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(("k", "n", "p"), [(2, 10, 0.5), (0, 20, 0.05), (3, 100, 0.05), (40, 300, 0.1)])
def test_binomial_cdf_is_exact(k, n, p):
    assert binomial_cdf(k, n, p) == pytest.approx(_binomial_cdf(k, n, p), rel=1e-10)
    assert binomial_cdf(2, 10, 0.5) == pytest.approx(56 / 1024, rel=1e-12)


def test_binomial_cdf_edges():
    assert binomial_cdf(-1, 10, 0.3) == 0.0 and binomial_cdf(10, 10, 0.3) == 1.0
    assert binomial_cdf(3, 10, 0.0) == 1.0 and binomial_cdf(3, 10, 1.0) == 0.0


def test_p_value_of_binary_losses_is_the_binomial_tail():
    losses = torch.zeros(100)
    losses[:2] = 1
    assert p_value(losses, 0.05) == pytest.approx(_binomial_cdf(2, 100, 0.05), rel=1e-10)


def test_p_value_of_bounded_losses_is_hoeffding_bentkus():
    # mean 0.01, not 0/1: Hoeffding, or e * the binomial tail at ceil(n r) = 1
    losses = torch.full((100,), 0.01, dtype=torch.float64)
    kl = 0.01 * math.log(0.01 / 0.05) + 0.99 * math.log(0.99 / 0.95)
    expected = min(math.exp(-100 * kl), math.e * _binomial_cdf(1, 100, 0.05))
    assert p_value(losses, 0.05) == pytest.approx(expected, rel=1e-10)
    assert p_value(torch.full((100,), 0.2), 0.05) == 1.0  # a risk above the level is never rejected
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p_value(torch.tensor([0.5, 1.5]), 0.05)


def test_fixed_sequence_stops_at_the_first_failure_and_reads_no_further():
    risks = [0.0, 0.01, 0.3, 0.0, 0.0]  # the bump at setting 2 ends the test, whatever follows
    read = []

    def losses():
        for j, risk in enumerate(risks):
            read.append(j)
            yield (torch.arange(1000) < risk * 1000).double()

    result = fixed_sequence_test(losses(), level=0.05, delta=0.1)
    assert result.chosen == 1 and result.certified
    assert read == [0, 1, 2] and [row["n"] for row in result.tested] == [1000] * 3
    assert result.tested[1]["p_value"] <= 0.1 < result.tested[2]["p_value"]
    # too few units to certify even risk 0: nothing is
    assert fixed_sequence_test([torch.zeros(10)], level=0.05, delta=0.1).chosen == -1


@pytest.mark.parametrize("kind", ["binary", "bounded"])
def test_ltt_controls_the_risk_and_is_not_needlessly_conservative(kind):
    """200 synthetic calibrations of n units over a grid of known, rising risks: the risk of the chosen setting
    exceeds epsilon in at most delta of them (plus three standard errors of that rate), and on average it is within
    three binomial standard errors of epsilon plus one grid step."""
    epsilon, delta, n, draws, step = 0.1, 0.1, 1000, 200, 0.005
    risks = [step * j for j in range(41)]
    generator = torch.Generator().manual_seed(0)
    chosen = []
    for _ in range(draws):
        if kind == "binary":  # one uniform per unit: unit i's loss is 1 where u_i < the setting's risk
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            true, losses = risks, ((u < r).double() for r in risks)
        else:  # losses min(1, r * E_i), E_i ~ Exp(1): risk r (1 - exp(-1/r))
            e = torch.empty(n, dtype=torch.float64).exponential_(generator=generator)
            true = [r * -math.expm1(-1 / r) if r else 0.0 for r in risks]
            losses = ((r * e).clamp(max=1.0) for r in risks)
        result = fixed_sequence_test(losses, epsilon, delta)
        chosen.append(true[result.chosen] if result.certified else 0.0)
    violations = sum(risk > epsilon for risk in chosen) / draws
    assert violations <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    margin = 3 * math.sqrt(epsilon * (1 - epsilon) / n) + step
    assert sum(epsilon - risk for risk in chosen) / draws <= margin


def _model(blocks: int = 3) -> LEGOTransformer:
    torch.manual_seed(0)
    return LEGOTransformer.from_config(LEGOConfig(vocab_size=32, dim=16, num_heads=2, layers_per_block=[1] * blocks,
                                                  max_seq_len=16))  # fmt: skip


def _windows(seed: int, n: int = 60) -> torch.Tensor:
    return torch.randint(0, 32, (n, 17), generator=torch.Generator().manual_seed(seed))


def _calibrate(model, test_windows, risk="disagreement", epsilon=0.1, val_windows=None):
    val_windows = _windows(1) if val_windows is None else val_windows
    return ltt_calibrate(model, val_windows, test_windows, risk, epsilon, 0.2, 64, torch.device("cpu"))


def _deep_blocks_matter(model: LEGOTransformer) -> LEGOTransformer:
    """Blocks 1 and 2 with large output projections: a token exiting at block 0 often changes its prediction."""
    with torch.no_grad():
        for block in model.blocks[1:]:
            for layer in block.layers:
                layer.attn.wo.weight.mul_(5)
                layer.ffn.w_down.weight.mul_(5)
    model.blocks[0].threshold, model.blocks[1].threshold = 0.5, float("inf")  # the method lets only block 0 exit
    return model


def test_ltt_thresholds_on_a_model_certify_what_the_test_measures():
    model = _deep_blocks_matter(_model())
    test = _windows(2)
    record = _calibrate(model, test)
    assert record["exit_blocks"] == [0] and model.blocks[1].threshold == math.inf
    assert record["thresholds"][0] == model.blocks[0].threshold
    chosen = LTT_SHARES.index(record["exit_share"])
    assert [row["exit_share"] for row in record["tested"]] == list(LTT_SHARES[: chosen + 2])  # stopped after a failure
    assert record["p_value"] <= 0.2 < record["tested"][-1]["p_value"]
    routed = token_predictions(model, test, 64, "cpu")
    for block in model.blocks:
        block.threshold = math.inf
    assert record["test_risk"] == pytest.approx(measured_risk(routed, token_predictions(model, test, 64, "cpu"),
                                                              "disagreement"))  # fmt: skip
    assert record["test_risk"] > 0  # a random block 1 changes the exited tokens' predictions
    # the same model with another test split: the same thresholds (the test split chooses nothing)
    assert _calibrate(_deep_blocks_matter(_model()), _windows(3))["exit_share"] == record["exit_share"]


@pytest.mark.parametrize("risk", ["disagreement", "ppl"])
def test_ltt_certifies_every_share_when_exiting_changes_nothing(risk):
    """A last block that leaves the hidden state as it is (zero output projections): exiting early changes no
    prediction and no loss, so every share of the grid is certified and the test risk is 0."""
    model = _model(blocks=2)
    torch.nn.init.zeros_(model.blocks[1].layers[0].attn.wo.weight)
    torch.nn.init.zeros_(model.blocks[1].layers[0].ffn.w_down.weight)
    model.blocks[0].threshold = 0.5
    record = _calibrate(model, _windows(2, 10), risk, epsilon=0.3, val_windows=_windows(1, 20))
    assert record["exit_share"] == LTT_SHARES[-1] and record["calibration_windows"] == 10
    assert record["test_risk"] == pytest.approx(0.0, abs=1e-6)
