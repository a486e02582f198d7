"""Small pieces of the report, without a run: labels, overrides, and smoothing of short curves."""

import pytest

from lego.pipeline.plots import _moving_average
from lego.report.collect import parse_overrides, run_label


@pytest.mark.parametrize("n", [1, 2, 3, 4, 30])
def test_moving_average_keeps_the_length_of_short_curves(n):
    values = [float(v) for v in range(n)]
    smooth = _moving_average(values, half_window=max(1, n // 25))
    assert len(smooth) == n
    assert all(min(values) <= v <= max(values) for v in smooth)


def test_overrides_and_run_label():
    overrides = parse_overrides(["+experiment=small", "hard_ratio.value=0.3", "seed=1", "trainer.progress=false",
                                 "++model.dim=64"])  # fmt: skip
    assert overrides == {"experiment": "small", "hard_ratio.value": "0.3", "seed": "1", "trainer.progress": "false",
                         "model.dim": "64"}  # fmt: skip
    assert run_label("small", overrides) == "small hard_ratio.value=0.3 seed=1 model.dim=64"
