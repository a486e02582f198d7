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
