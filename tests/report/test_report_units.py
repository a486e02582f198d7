"""Small pieces of the report, without a run: config labels and grouping, iso-FLOP interpolation."""

from pathlib import Path

import pytest

from lego.report.collect import Run
from lego.report.tables import config_label, group_runs, varying_keys


def test_labels_name_only_the_keys_that_tell_configs_apart():
    def run(seed, **overrides):
        return Run(Path("."), "run", {k.replace("__", "."): v for k, v in overrides.items()}, seed, "finished")

    lego = {"experiment": "lego", "block_schedule__blocks__1__epochs": "1"}
    runs = [
        run(0, experiment="dense"),
        run(1, experiment="dense"),
        run(0, **lego, hard_ratio__value="0.3"),
        run(0, **lego, hard_ratio__value="0.5"),
        run(1, **lego, hard_ratio__value="0.5", trainer__progress="0"),
    ]
    assert varying_keys(runs) == ["experiment", "hard_ratio.value"]  # the epochs key adds nothing, progress is noise
    groups = group_runs(runs)
    assert len(groups) == 3 and [len(g.runs) for g in groups] == [2, 1, 2]
    labels = [config_label(g, varying_keys(runs)) for g in groups]
    assert labels == ["dense", "lego hard_ratio=0.3", "lego hard_ratio=0.5"]


def test_isoflop_interpolation_in_log_log():
    from experiments.compare_methods import interpolate_log

    points = [(1.0, 100.0), (4.0, 50.0), (8.0, 40.0)]
    assert interpolate_log(points, 2.0) == (pytest.approx(100 / 2**0.5), False)  # halfway in log x: the geometric mean
    assert interpolate_log(points, 0.8)[1] and interpolate_log(points, 10.0)[1]  # extended end segments
    assert interpolate_log(points, 0.5) is None and interpolate_log(points[:1], 1.0) is None


def test_a_scan_shows_its_seed_spread_as_a_band_and_a_single_cost_keeps_its_error_bars(tmp_path):
    """`plot_series(band=True)`: a line along several x values draws its y spread as a shaded band (the picture
    changes); points stacked at one x (a method without early exit) are drawn exactly as without the band."""
    from lego.report.plots import plot_series

    def draw(series, band):
        return plot_series(series, tmp_path / "p.png", xlabel="cost", ylabel="PPL", title="t", band=band)

    scan = {"scan": [{"x": x, "y": 100 - 10 * x, "xerr": 0.0, "yerr": 3.0} for x in (0.6, 0.8, 1.0)]}
    assert draw(scan, True) != draw(scan, False)
    stacked = {"dense": [{"x": 1.0, "y": 90.0, "xerr": 0.0, "yerr": 3.0} for _ in range(3)]}
    assert draw(stacked, True) == draw(stacked, False)
