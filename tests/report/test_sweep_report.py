"""The report of a real multirun, as a user sees it: the CSVs Hydra's callback wrote at the end of the sweep,
W&B names and groups, the CLI, and report.html rendered in a real headless browser from a copied folder."""

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.launch import REPO
from tests.wandb_offline import read_offline_run


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_multirun_writes_one_row_per_job(sweep):
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 4
    assert {(row["hard_ratio.value"], row["seed"]) for row in rows} == {("0.3", "0"), ("0.3", "1"), ("0.6", "0"),
                                                                        ("0.6", "1")}  # fmt: skip
    assert all(row["status"] == "finished" for row in rows)
    for column in ("test_ppl", "val_ppl", "test_ppl_full_depth", "shallow_ratio", "honest_cost", "compute_cost",
                   "inference_speedup", "train_flops_vs_dense", "exit_rate_block_0", "exit_rate_block_1",
                   "wall_seconds"):  # fmt: skip
        assert all(float(row[column]) > 0 for row in rows), column
    # more hard tokens passed on: fewer exits at Block 0
    by_ratio = {row["hard_ratio.value"]: float(row["exit_rate_block_0"]) for row in rows if row["seed"] == "0"}
    assert by_ratio["0.3"] > by_ratio["0.6"]


def test_grouped_over_seeds_with_spread(sweep):
    rows = read_csv(sweep / "summary_by_config.csv")
    assert sorted(row["hard_ratio.value"] for row in rows) == ["0.3", "0.6"]
    per_run = read_csv(sweep / "summary.csv")
    for row in rows:
        assert row["test_ppl_n"] == "2" and float(row["test_ppl_sd"]) > 0
        seeds = [float(r["test_ppl"]) for r in per_run if r["hard_ratio.value"] == row["hard_ratio.value"]]
        assert float(row["test_ppl_mean"]) == pytest.approx(sum(seeds) / 2)
        assert float(row["test_ppl_sd"]) == pytest.approx(abs(seeds[0] - seeds[1]) / 2**0.5)
        assert "seed" not in row


def test_seeds_share_the_test_set(sweep):
    """The run seed changes the model, never the split: every job is scored on the same test tokens."""
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len({r["data"]["fingerprint"] for r in results}) == 1
    assert len({r["test_tokens"] for r in results}) == 1
    assert len({round(r["unigram_ppl"], 6) for r in results}) == 1
    assert len({round(r["test_ppl"], 6) for r in results}) == 4  # ...while the models differ


def test_wandb_group_name_and_swept_keys(sweep):
    job = next(p for p in sweep.iterdir() if p.name.startswith("3_"))
    run = read_offline_run(job)
    assert run["group"] == f"tiny/{sweep.name}"
    assert run["name"].startswith("tiny ") and "hard_ratio.value=0.6" in run["name"] and "seed=1" in run["name"]
    assert run["config"]["overrides"]["hard_ratio.value"] == 0.6  # a number: W&B can plot it
    assert run["config"]["overrides"]["seed"] == 1


def test_sweep_returns_a_validation_objective(sweep):
    for path in sweep.glob("*/results.json"):
        results = json.loads(path.read_text())
        assert results["objective_metric"] == "val_ppl"
        assert results["objective"] == results["val_ppl"] != results["test_ppl"]


def test_cli_writes_the_report_elsewhere_and_rejects_bad_input(sweep, tmp_path):
    out = tmp_path / "elsewhere"
    proc = subprocess.run([sys.executable, "-m", "lego.report", str(sweep), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 runs (4 finished)" in proc.stdout
    assert read_csv(out / "summary.csv") == read_csv(sweep / "summary.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "lego.report", str(empty)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no run folders") and len(proc.stderr.strip().splitlines()) == 1


def test_unfinished_job_is_a_row_with_its_status(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    broken = next(p for p in copy.iterdir() if p.name.startswith("1_"))
    (broken / "results.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "lego.report", str(copy)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {row["run"]: row for row in read_csv(copy / "summary.csv")}
    assert len(rows) == 4
    assert rows[broken.name]["status"] == "incomplete: 2 stage(s) done" and rows[broken.name]["test_ppl"] == ""
    grouped = {row["hard_ratio.value"]: row for row in read_csv(copy / "summary_by_config.csv")}
    assert grouped["0.3"]["test_ppl_n"] == "1" and grouped["0.3"]["test_ppl_sd"] == ""


def test_report_renders_offline_from_a_copied_folder(sweep, tmp_path, browser):
    copy = tmp_path / "copied"
    shutil.copytree(sweep, copy)
    context = browser.new_context(viewport={"width": 1366, "height": 768}, offline=True)
    page = context.new_page()
    errors, requests = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto((copy / "report.html").as_uri())
    page.wait_for_load_state("load")
    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in requests)  # nothing from the network
    assert page.locator("table").first.is_visible()
    assert page.locator("table").first.locator("tbody tr").count() == 2  # one row per config
    images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) == 5 and all(done and width > 400 for done, width, _ in images), images
    assert page.evaluate("document.documentElement.scrollWidth") <= 1366  # no sideways scrolling on a laptop
    for index, image in enumerate(page.locator("img").all()):
        shot = Image.open(io.BytesIO(image.screenshot())).convert("L")
        low, high = shot.getextrema()
        assert high - low > 100 and len(shot.getcolors(maxcolors=1 << 16)) > 20, f"plot {index} looks blank"
    context.close()
