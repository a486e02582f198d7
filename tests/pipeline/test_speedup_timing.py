"""The speed-up timing measures its own noise floor: equal-work passes side by side (a null timing) and the
machine's load say whether the figure means anything, and the printed line says so. A fake machine (its own
clock, load average and per-pass costs) stands in for the real one: no timing is asserted."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from lego.pipeline import evaluation
from lego.pipeline.evaluation import measure_speedup, speedup_caveat, timing_passes
from lego.pipeline.summary import format_results
from lego.report import _run_table
from lego.report.collect import Run
from tests.launch import REPO

STUDY_RESULTS = REPO / "docs/study_runs/lego_r0.5/800k/seed0/results.json"  # written before the noise floor


class FakeMachine:
    """A two-block model whose forward of a batch advances a fake clock by `full` seconds at full depth and
    `routed` with the exits on, each off by up to ±`jitter` at random and slower by `drift` than the one before,
    on a machine whose load average is `load`."""

    def __init__(self, full: float, routed: float, jitter=0.0, drift=0.0, load=0.2, cpus=2):
        self.blocks = [SimpleNamespace(threshold=0.4), SimpleNamespace(threshold=float("inf"))]
        self.full, self.routed, self.jitter, self.drift = full, routed, jitter, drift
        self.slowdown = 1.0
        self.load, self.cpus = load, cpus
        self.now = 0.0
        self.rng = random.Random(0)

    def eval(self):
        return self

    def __call__(self, batch):
        cost = self.full if self.blocks[0].threshold == float("inf") else self.routed
        self.now += cost * self.slowdown * (1 + self.rng.uniform(-self.jitter, self.jitter))
        self.slowdown *= 1 + self.drift

    def install(self, monkeypatch):
        monkeypatch.setattr(evaluation, "time", SimpleNamespace(perf_counter=lambda: self.now))
        monkeypatch.setattr(evaluation, "os", SimpleNamespace(getloadavg=lambda: (self.load,) * 3,
                                                              cpu_count=lambda: self.cpus))  # fmt: skip


def timing(machine: FakeMachine, monkeypatch, **kwargs) -> dict:
    machine.install(monkeypatch)
    return measure_speedup(machine, torch.zeros(16, 5, dtype=torch.long), 4, "cpu", **kwargs)


def speedup_line(speedup: dict) -> str:
    """The console line for a run whose timing was `speedup`, stored under results.json's keys."""
    results = json.loads(STUDY_RESULTS.read_text())
    results.update(
        inference_speedup=speedup["median"], inference_speedup_iqr=[speedup["q25"], speedup["q75"]],
        inference_speedup_noise=speedup["noise"], inference_speedup_load=speedup["load"],
        inference_speedup_caveat=speedup["caveat"],
    )  # fmt: skip
    return next(line for line in format_results(results).splitlines() if "measured speed-up" in line)


def test_null_pairs_compare_equal_work(monkeypatch):
    """On an exact machine every equal-work pair times the same: pairing a full pass with a routed one would
    read 2 or 0.5."""
    speedup = timing(FakeMachine(full=2.0, routed=1.0), monkeypatch, repeats=9)
    assert speedup["rounds"] == [2.0] * 9
    assert speedup["null_rounds"] == [1.0] * 8
    assert speedup["noise"] == 0.0 and speedup["caveat"] is None


def test_null_pairs_are_adjacent_passes(monkeypatch):
    """On a machine slowing down 1 % a batch, two adjacent passes of 4 batches differ by 1.01^4 (passes further
    apart, by more): the null timing sees what the rounds' side-by-side passes see."""
    speedup = timing(FakeMachine(full=2.0, routed=1.0, drift=0.01), monkeypatch, repeats=9)
    assert speedup["null_rounds"] == pytest.approx([1 / 1.01**4] * 8)


def test_quiet_machine_gives_the_figure_with_its_noise_floor(monkeypatch):
    speedup = timing(FakeMachine(full=1.2, routed=1.0, jitter=0.005, load=0.3), monkeypatch)
    assert speedup["caveat"] is None
    assert 0 < speedup["noise"] < 0.01
    assert speedup["load"] == {"start": 0.3, "end": 0.3, "cpus": 2}
    line = speedup_line(speedup)
    assert f"full depth 1.20x (quartiles {speedup['q25']:.2f}-{speedup['q75']:.2f}x; noise floor ±" in line
    assert line.endswith(f"±{speedup['noise'] * 100:.1f} %; load 0.3 on 2 CPUs)")
    assert "not meaningful" not in line


def test_busy_machine_says_the_figure_means_nothing(monkeypatch):
    speedup = timing(FakeMachine(full=1.2, routed=1.0, jitter=0.15, load=8.1), monkeypatch)
    assert speedup["noise"] > 0.05
    assert speedup["caveat"] == "machine busy"
    line = speedup_line(speedup)
    assert "not meaningful: machine busy" in line and "load 8.1 on 2 CPUs" in line
    assert line.endswith("rerun on a quiet machine")


def test_noisy_timings_on_an_idle_machine_mean_nothing(monkeypatch):
    """The load can miss what competes (another container, a GPU's other tenants): the null timing does not."""
    speedup = timing(FakeMachine(full=1.05, routed=1.0, jitter=0.3, load=0.1), monkeypatch)
    assert speedup["noise"] > 0.05 and speedup["caveat"] == "noisy timings"
    assert "not meaningful: noisy timings" in speedup_line(speedup)


@pytest.mark.parametrize(
    ("median", "q25", "q75", "noise", "load", "caveat"),
    [
        (1.30, 1.25, 1.35, 0.10, 1.0, None),  # ±10 % noise, yet far more effect than noise
        (1.02, 1.01, 1.03, 0.10, 1.0, "noisy timings"),  # the same noise, a 2 % effect
        (1.02, 0.90, 1.14, 0.01, 1.0, "noisy timings"),  # quiet null pairs, scattered rounds
        (1.16, 1.15, 1.18, 0.02, 1.0, None),
        (1.16, 1.15, 1.18, 0.02, 3.5, "machine busy"),  # more runnable work than 1.5 per CPU
        (1.16, 1.15, 1.18, 0.02, None, None),  # no load average (Windows): judged by the noise alone
    ],
)
def test_caveat_rule(median, q25, q75, noise, load, caveat):
    loads = None if load is None else {"start": 1.0, "end": load, "cpus": 2}
    assert speedup_caveat({"median": median, "q25": q25, "q75": q75, "noise": noise, "load": loads}) == caveat


def test_timing_moves_a_progress_bar_and_restores_thresholds(monkeypatch):
    machine = FakeMachine(full=1.2, routed=1.0)
    clock_at_calls = []
    timing(machine, monkeypatch, repeats=5, on_pass=lambda: clock_at_calls.append(machine.now))
    assert len(clock_at_calls) == timing_passes(5) == 12  # one per pass, warm-up included, not one at the end
    assert clock_at_calls == sorted(set(clock_at_calls))  # each after a pass of its own
    assert [block.threshold for block in machine.blocks] == [0.4, float("inf")]


def test_old_results_print_the_figure_as_before():
    """results.json files from before the noise floor (the study's) still print, with their quartiles only."""
    results = json.loads(STUDY_RESULTS.read_text())
    assert "inference_speedup_noise" not in results
    (low, high), speedup = results["inference_speedup_iqr"], results["inference_speedup"]
    expected = f"measured speed-up over full depth {speedup:.2f}x (quartiles {low:.2f}-{high:.2f}x)"
    assert expected in format_results(results).splitlines()


def test_report_marks_a_speed_up_its_run_judged_noise(tmp_path):
    busy = Run(
        tmp_path, "busy", {}, 0, "finished", {"inference_speedup": 0.96, "inference_speedup_caveat": "machine busy"}
    )
    old = Run(tmp_path, "old", {}, 1, "finished", json.loads(STUDY_RESULTS.read_text()))
    table = _run_table([busy, old])
    assert "0.96 (not meaningful: machine busy)" in table
    assert table.count("not meaningful") == 1
