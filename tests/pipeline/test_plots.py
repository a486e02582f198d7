"""Every plot writes a real, non-blank PNG with no text cut off at its edges; make_run_plots writes what the
results support and skips the rest."""

import math
from pathlib import Path

import matplotlib.image
import pytest
from hydra import compose, initialize_config_dir
from matplotlib.backends.backend_agg import FigureCanvasAgg

import lego.common.plotting
import lego.pipeline.plots
from lego.common.plotting import plot_expert_load
from lego.pipeline.config import register_configs, to_run_config
from lego.pipeline.plots import (
    make_run_plots,
    plot_confidence_histograms,
    plot_exit_rates,
    plot_ppl_vs_compute,
    plot_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_results() -> dict:
    """A results.json as the runner writes it for a 3-block run; block 2 is last (no threshold), block 1 got no
    exits (NaN PPL), as happens with a high threshold."""
    edges = [i / 50 for i in range(51)]
    evals = [
        [{"step": s, "train_ppl": 400 / s, "val_ppl": 500 / s + 20} for s in (10, 20, 40)],
        [{"step": s, "train_ppl": 900 / s, "val_ppl": 900 / s + 60} for s in (5, 10)],
        [{"step": 8, "val_ppl": 120.0}],  # a row from before per-step losses were recorded
    ]
    for rows in evals[:2]:  # the LM loss of every step since the previous evaluation
        previous = 0
        for row in rows:
            row["step_losses"] = [math.log(row["train_ppl"]) + 0.3 * math.sin(s) for s in range(previous, row["step"])]
            previous = row["step"]
    blocks = [
        {"block": 0, "layers": 2, "threshold": 0.62, "exit_count": 600, "exit_rate": 0.6, "mean_confidence": 0.7},
        {"block": 1, "layers": 2, "threshold": 0.97, "exit_count": 0, "exit_rate": 0.0, "mean_confidence": 0.4},
        {"block": 2, "layers": 4, "threshold": None, "exit_count": 400, "exit_rate": 0.4, "mean_confidence": 0.3},
    ]
    for block, ppl, rows in zip(blocks, (8.0, math.nan, 90.0), evals, strict=True):
        block.update(ppl=ppl, acc=0.3, evals=rows)
    scan = [
        {"target_exit_share": share, "test_ppl": 30 + 40 * share**2, "honest_cost": 1 - 0.5 * share}
        for share in (0.9, 0.6, 0.3, 0.0)
    ]
    return {
        "test_ppl": 35.2,
        "honest_cost": 0.72,
        "compute_cost": 0.64,
        "exit_rates": [0.6, 0.0, 0.4],
        "blocks": blocks,
        "threshold_scan": scan,
        "confidence_histograms": [
            {"edges": edges, "counts": [int(100 * math.exp(-((i - c) ** 2) / 40)) for i in range(50)]}
            for c in (35, 20, 10)
        ],
    }


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).std() > 0.01  # not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary file left by the atomic write


def test_exit_rates(tmp_path):
    assert_real_png(plot_exit_rates(fake_results(), tmp_path / "exit_rates.png"))


def test_confidence_histograms(tmp_path):
    assert_real_png(plot_confidence_histograms(fake_results(), tmp_path / "hist.png"))


@pytest.mark.parametrize("x", ["honest_cost", "compute_cost"])
def test_ppl_vs_compute(tmp_path, x):
    results = fake_results()
    curves = {"LEGO": results["threshold_scan"], "other": [{x: 0.5, "test_ppl": 50.0}, {x: 1.0, "test_ppl": 31.0}]}
    points = {"dense baseline": {x: 1.0, "test_ppl": 29.0}, "missing x": {"test_ppl": 40.0}}
    assert_real_png(plot_ppl_vs_compute(curves, tmp_path / "ppl.png", x=x, points=points))


def test_training_curves(tmp_path):
    stage_evals = [block["evals"] for block in fake_results()["blocks"]]
    assert_real_png(plot_training_curves(stage_evals, tmp_path / "curves.png"))


def fake_moe(layers: int, experts: int) -> list[dict]:
    """results.json's `moe`: one row per MoE layer (lego.moe.RoutingTally.summary)."""
    rows = []
    for i in range(layers):
        load = [(e + 1.0) ** (i % 2) for e in range(experts)]
        rows.append({
            "layer": f"block{i}.layer1", "load": [x / sum(load) for x in load], "imbalance": 1.0 + i,
            "entropy": 1.5, "max_entropy": math.log(experts), "dropped": 0.02 * i, "tokens": 12_345,
        })  # fmt: skip
    return rows


def test_expert_load(tmp_path):
    assert_real_png(plot_expert_load(fake_moe(layers=3, experts=8), tmp_path / "expert_load.png"))


def test_make_run_plots_writes_all_four(tmp_path):
    written = make_run_plots(fake_results(), tmp_path / "plots")
    assert set(written) == {"exit_rates", "confidence_histograms", "ppl_vs_compute", "training_curves"}
    for name, path in written.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        assert_real_png(path)


def test_make_run_plots_skips_what_is_missing(tmp_path):
    results = fake_results()
    results["threshold_scan"] = []
    for block in results["blocks"]:
        block["evals"] = []
    written = make_run_plots(results, tmp_path)
    assert set(written) == {"exit_rates", "confidence_histograms"}
    assert not (tmp_path / "ppl_vs_compute.png").exists()


@pytest.fixture
def figures(monkeypatch) -> dict:
    """Every figure a run's plots save (`lego.common.plotting` draws the expert load), by file name."""
    captured, save = {}, lego.common.plotting.save_png

    def capture(fig, path: Path) -> Path:
        captured[path.name] = fig
        return save(fig, path)

    for module in (lego.pipeline.plots, lego.common.plotting):
        monkeypatch.setattr(module, "save_png", capture)
    return captured


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_no_text_is_cut_off_at_the_figure_edges(tmp_path, figures, blocks):
    """What is drawn (titles, labels, tick labels, legends) lies inside the figure: a title wider than a narrow
    one- or two-block figure used to run off its right edge."""
    results = fake_results()
    results.update(test_ppl=93.77, honest_cost=0.840)
    for key in ("blocks", "confidence_histograms"):
        results[key] = results[key][:blocks]
    results["moe"] = fake_moe(layers=blocks, experts=4 * blocks)  # up to 12 experts, the widest heatmap here
    make_run_plots(results, tmp_path)
    assert len(figures) == 5
    for name, fig in figures.items():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        drawn, inside = fig.get_tightbbox(canvas.get_renderer()), fig.bbox_inches
        assert inside.x0 <= drawn.x0 and drawn.x1 <= inside.x1 and inside.y0 <= drawn.y0 and drawn.y1 <= inside.y1, name


def test_training_curves_show_every_step_smoothed_and_the_validations_per_stage(tmp_path, figures):
    stage_evals = [block["evals"] for block in fake_results()["blocks"]]
    plot_training_curves(stage_evals, tmp_path / "curves.png")
    axes = figures["curves.png"].axes
    assert [ax.get_title() for ax in axes] == ["stage 0: all tokens", "stage 1: Block 0's hard tokens",
                                               "stage 2: Block 1's hard tokens"]  # fmt: skip
    for ax, rows in zip(axes, stage_evals, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["validation"].get_xdata()) == [row["step"] for row in rows]
        if "step_losses" in rows[0]:
            every_step = lines["train, every step"].get_ydata()
            assert len(every_step) == rows[-1]["step"]  # one point per training step
            smoothed = lines["train, smoothed"].get_ydata()
            assert len(smoothed) == len(every_step)
            assert max(smoothed) - min(smoothed) < max(every_step) - min(every_step)  # less noisy
        else:
            assert set(lines) == {"validation"}


def test_small_preset_validates_often_enough_to_draw_a_curve():
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).parents[2] / "conf"), version_base="1.3"):
        run = to_run_config(compose(config_name="config", overrides=["+experiment=small"]))
    assert [stage.evals_per_epoch for stage in run.block_schedule.blocks] == [8, 8]
