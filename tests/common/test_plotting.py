"""Plotting helpers shared by a run's plots and the report's."""

import pytest

from lego.common.plotting import moving_average


@pytest.mark.parametrize("n", [1, 2, 3, 4, 30])
def test_moving_average_keeps_the_length_of_short_curves(n):
    values = [float(v) for v in range(n)]
    smooth = moving_average(values, half_window=max(1, n // 25))
    assert len(smooth) == n
    assert all(min(values) <= v <= max(values) for v in smooth)
