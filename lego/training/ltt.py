"""Learn-then-Test (Angelopoulos, Bates, Candès, Jordan and Lei, 2021), as CALM (Schuster et al., 2022) uses it to
set early-exit thresholds: the most aggressive setting on a grid whose risk is at most `level` with probability at
least `1 - delta`, distribution-free.

Each grid setting j carries the null hypothesis "its risk R_j = E[loss] is above `level`". The settings are tested in
a fixed order, from the most conservative (no exit, risk 0) on, each with a valid p-value at level `delta`, and
testing stops at the first one not rejected: every setting before it is certified. Because the order is fixed before
the data is seen, the family-wise error is at most `delta` without any correction for the grid's size (fixed-sequence
testing), so P(R_chosen > level) <= delta. The risk need not be monotone along the grid: a bump only stops the test
earlier.

The guarantee needs the calibration units (the losses handed in) to be i.i.d. (exchangeable) draws of the units the
risk is promised for. Pure functions on tensors; `lego.pipeline.evaluation.ltt_calibrate` applies them to a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def binomial_cdf(k: float, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), exact: the pmf summed in log space (float64), so it stays accurate far in the tail."""
    k = math.floor(k)
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    )
    return min(1.0, float(torch.logsumexp(log_pmf, dim=0).exp()))


def _kl_bernoulli(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)), the exponent of Hoeffding's bound for a mean of [0, 1] variables."""
    first = 0.0 if a == 0.0 else a * math.log(a / b)
    second = 0.0 if a == 1.0 else (1 - a) * math.log((1 - a) / (1 - b))
    return first + second


def p_value(losses: Tensor, level: float) -> float:
    """A valid p-value for "E[loss] > level" from i.i.d. losses in [0, 1].

    0/1 losses: the exact binomial tail P(Bin(n, level) <= sum of the losses). Any other losses in [0, 1]: the
    Hoeffding-Bentkus p-value (Bates et al. 2021, "Distribution-free, risk-controlling prediction sets", Prop. 3),
    min(exp(-n KL(min(r, level) || level)), e * P(Bin(n, level) <= ceil(n r))) for the mean loss r: Hoeffding's
    bound, and Bentkus's, which is the binomial tail up to a factor e and much tighter for small risks.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"the risk level must be in (0, 1), got {level}")
    losses = losses.detach().double().flatten()
    n = losses.numel()
    if n == 0:
        return 1.0
    if bool((losses < 0).any() | (losses > 1).any()):
        raise ValueError("LTT needs losses in [0, 1]")
    total = float(losses.sum())
    if bool(((losses == 0) | (losses == 1)).all()):
        return binomial_cdf(round(total), n, level)
    risk = total / n
    hoeffding = math.exp(-n * _kl_bernoulli(min(risk, level), level))
    bentkus = math.e * binomial_cdf(math.ceil(n * risk - 1e-9), n, level)  # n * r is a sum of floats
    return min(1.0, hoeffding, bentkus)


@dataclass
class LTTResult:
    """The outcome of fixed-sequence testing over a grid."""

    chosen: int  # the last certified setting (index into the grid); -1 when not even the first one is
    tested: list[dict] = field(default_factory=list)  # per setting tested, in order: risk (mean loss), p_value, n

    @property
    def certified(self) -> bool:
        return self.chosen >= 0


def fixed_sequence_test(losses: Iterable[Tensor], level: float, delta: float) -> LTTResult:
    """Test the grid's settings in the order `losses` gives them (one tensor of per-unit losses per setting, most
    conservative first) and stop at the first whose p-value exceeds `delta`.

    `losses` is consumed lazily: a generator computes only the settings that are tested, up to the first failure.
    With i.i.d. units, P(risk of the chosen setting > level) <= delta.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    result = LTTResult(chosen=-1)
    for j, loss in enumerate(losses):
        p = p_value(loss, level)
        result.tested.append({"risk": float(loss.double().mean()) if loss.numel() else 0.0, "p_value": p,
                              "n": loss.numel()})  # fmt: skip
        if p > delta:
            break
        result.chosen = j
    return result
