"""How the report reads: its tables fit a laptop's width, curves several configs share are drawn once and said to
be, and a one-config report states its training compute instead of plotting one lone dot."""

from pathlib import Path

import pytest

from lego.report import write_report
from lego.report.collect import Run, find_runs
from lego.report.plots import training_curves_figure
from lego.report.tables import config_label, group_runs, varying_keys
from tests.launch import REPO

STUDY = REPO / "docs" / "study_runs"  # 16 configs, 4 blocks and MoE: the widest config table the project has


def curve_run(seed: int, experiment: str, stage_losses: list[list[float]], **overrides) -> Run:
    """A finished run whose stage k logged `stage_losses[k]` (one evaluation at the last step)."""
    blocks = [{"evals": [{"step": len(losses), "step_losses": losses, "val_ppl": 10 + sum(losses)}]}
              for losses in stage_losses]  # fmt: skip
    return Run(Path("."), f"{experiment}{seed}", {"experiment": experiment, **overrides}, seed, "finished",
               {"blocks": blocks})  # fmt: skip


def drawn_lines(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata())]  # not the legend's empty handles


def notes(ax) -> list[str]:
    return [text.get_text() for text in ax.texts]


def legend_texts(fig) -> list[str]:
    return [text.get_text().replace("\n", " ") for text in fig.legends[0].get_texts()]


def test_curves_that_configs_share_are_drawn_once_and_said_to_be():
    """Stage 0 does not depend on the hard ratio: configs that differ only in it log the same stage-0 curve per
    seed. Each is drawn once, the panel counts them, the legend says whose colour draws the hidden config's."""
    stage0 = {0: [3.0, 2.5, 2.2], 1: [3.1, 2.6, 2.1]}
    runs = [curve_run(seed, "small", [stage0[seed], [2 + ratio, 2 + ratio + seed]], **{"hard_ratio.value": str(ratio)})
            for ratio in (0.3, 0.6) for seed in (0, 1)]  # fmt: skip
    runs.append(curve_run(0, "dense", [[3.3, 2.0, 1.8]]))
    groups = group_runs(runs)
    labels = [config_label(group, varying_keys(runs)) for group in groups]
    assert labels == ["small hard_ratio=0.3", "small hard_ratio=0.6", "dense"]

    fig = training_curves_figure(groups, labels)
    stage_0, stage_1 = fig.axes[:2]
    assert notes(stage_0) == ["identical in 2 configs: 2 curves drawn once"]
    assert notes(stage_1) == []  # every stage-1 curve is its own
    assert len(drawn_lines(stage_0)) == 2 * 3  # training line + validation dots of 3 distinct curves, not 5
    assert len(drawn_lines(stage_1)) == 2 * 4
    assert legend_texts(fig) == ["small hard_ratio=0.3", "small hard_ratio=0.6 (stage 0 drawn as hard_ratio=0.3)",
                                 "dense"]  # fmt: skip


def test_a_long_legend_is_never_cut_off():
    """16 configs with three-line labels: the figure grows until every legend entry is inside it."""
    groups = group_runs([curve_run(0, f"lego{i}", [[3.0 - i / 100, 2.0]]) for i in range(16)])
    labels = [f"compare_lego data.max_train_tokens=400000 moe=e8_top2_aux hard_ratio=0.3 model.dim={i}"
              for i in range(16)]  # fmt: skip
    fig = training_curves_figure(groups, labels)
    fig.canvas.draw()  # lays the constrained layout out
    legend = fig.legends[0].get_window_extent()
    assert len(fig.legends[0].get_texts()) == 16
    assert legend.y0 >= 0 and legend.y1 <= fig.bbox.height and legend.x1 <= fig.bbox.width


def test_a_real_sweeps_stage_0_is_shared_across_hard_ratios(sweep):
    runs = find_runs([sweep])
    groups = group_runs(runs)
    fig = training_curves_figure(groups, [config_label(group, varying_keys(runs)) for group in groups])
    assert notes(fig.axes[0]) == ["identical in 2 configs: 2 curves drawn once"]
    assert notes(fig.axes[1]) == []  # Block 1 trains on each ratio's own hard tokens


def test_one_config_states_its_training_compute_instead_of_one_dot(sweep, tmp_path):
    """A single run's report (what train.py writes in its run folder) has one config: no PPL-vs-training-compute
    plot, its numbers in words; the sweep's two configs are plotted."""
    job = next(p for p in sweep.iterdir() if p.name.startswith("0_"))
    report = write_report([job], out=tmp_path / "one")
    page = report.html.read_text()
    assert "One config, so no plot of test PPL against training compute: training took " in page
    assert page.count("<img ") == 4
    assert not (tmp_path / "one" / "report_plots" / "ppl_vs_train_flops.png").exists()
    assert (sweep / "report_plots" / "ppl_vs_train_flops.png").exists()
    assert "One config" not in (sweep / "report.html").read_text()


@pytest.mark.parametrize("width", [1400, 1920])
def test_config_table_fits_without_scrolling(width, browser, tmp_path):
    """The widest table (16 configs with long labels, 4 exit columns, MoE) shows every column at laptop widths."""
    report = write_report([STUDY], out=tmp_path / "study")
    context = browser.new_context(viewport={"width": width, "height": 900}, offline=True)
    page = context.new_page()
    page.goto(report.html.as_uri())
    page.wait_for_load_state("load")
    widths = page.evaluate("[...document.querySelectorAll('.scroll')].map(e => [e.scrollWidth, e.clientWidth])")
    assert len(widths) == 2 and all(scroll <= client for scroll, client in widths), widths
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    header = page.locator("table").first.locator("th").all_inner_texts()
    assert header[-1] == "wall s" and any("MoE" in text for text in header)  # the last columns are there
    context.close()
