"""Every benchmark script runs at a tiny size, so none of them rots. Not timed: the numbers are not checked."""

import json
import shutil

import pytest

from experiments import bench_block, bench_dense_peer, bench_inference, bench_layer_ops, bench_moe, bench_train_hard


@pytest.mark.parametrize("train", [False, True])
def test_bench_block(train, capsys):
    rows = bench_block.main(
        ["--dim", "32", "--heads", "2", "--seq", "16", "--batch", "2", "--repeats", "1"]
        + (["--train"] if train else [])
    )
    assert [row["active"] for row in rows[:6]] == list(bench_block.SHARES)
    assert "ratio/ideal" in capsys.readouterr().out


def test_bench_inference():
    rows = bench_inference.main(
        ["--dim", "32", "--heads", "2", "--vocab", "64", "--seq", "16", "--batch", "2", "--repeats", "1"]
    )
    assert len(rows) == len(bench_inference.SHARES)
    assert rows[0]["honest_cost"] == pytest.approx(1.0)
    assert rows[-1]["exit_share"] == pytest.approx(0.9, abs=0.05)


def test_bench_train_hard():
    rows = bench_train_hard.main(
        ["--dim", "32", "--heads", "2", "--vocab", "64", "--seq", "16", "--batch", "2", "--repeats", "1"]
    )
    assert [row["hard_ratio"] for row in rows] == list(bench_train_hard.RATIOS)
    assert rows[0]["ideal"] == pytest.approx(1.0)


def test_bench_dense_peer():
    result = bench_dense_peer.main(
        ["--dim", "32", "--heads", "2", "--layers", "1", "--seq", "16", "--batch", "2", "--repeats", "1"]
    )
    assert result["ratio"] > 0
    low, high = result["ratio_quartiles"]
    assert low <= result["ratio"] <= high


def test_bench_layer_ops():
    result = bench_layer_ops.main(["--dim", "32", "--seq", "16", "--batch", "2", "--repeats", "2"])
    assert set(result) == {"rmsnorm_speedup", "rmsnorm_vs_layernorm", "swiglu_speedup"}
    assert all(ratio > 0 for ratio in result.values())


def test_bench_moe(capsys):
    (result,) = bench_moe.main(["--dims", "32", "--seq", "16", "--batch", "2", "--repeats", "2"])
    assert result["expert_hidden"] * 2 == result["dense_hidden"]  # top-2 of half-width experts
    assert result["active_flops_ratio"] == pytest.approx(1.0, abs=0.05)  # the router's share only
    assert result["ffn_params_ratio"] == pytest.approx(4.0, rel=0.02)  # 8 experts of half the width
    assert all(ratio > 0 for ratio in (result["grouped_vs_dense"], result["loop_vs_dense"], result["loop_vs_grouped"]))
    assert "MoE grouped_mm / dense" in capsys.readouterr().out


def test_bench_data(monkeypatch):
    from experiments import bench_data

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert bench_data.main(["--repeats", "1"]) > 1.0  # warm (cached) is faster than cold


def test_bench_memory():
    from experiments import bench_memory

    rows = bench_memory.main(["--sequences", "20", "40", "--seq", "8", "--dim", "16", "--vocab", "32"])
    assert [row["tokens"] for row in rows] == [160, 320]
    assert rows[0]["bytes_per_token"] > 4 * 16 + 9  # the state, target and mask, plus the header
    assert all(row[mode]["owned_mb"] > 0 for row in rows for mode in ("in_memory", "streamed"))


def test_compare_methods_study_quick(tmp_path, monkeypatch, capsys):
    """Two methods x two budgets x two seeds at smoke size, and MoE at one: the report has per-budget tables with
    n=2, a verdict per LEGO method and the MoE section against its dense-FFN twin; a re-run resumes (skips every
    finished run)."""
    from experiments import compare_methods

    monkeypatch.setenv("LEGO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    report = tmp_path / "results.md"
    args = ["--quick", "--out", str(tmp_path / "runs"), "--report", str(report), "--methods", "dense", "lego r=0.3",
            "dense MoE", "--budgets", "400k", "100k", "--dense-budgets", "200k", "--seeds", "0", "1",
            "--archive", str(tmp_path / "archive"), "--jobs", "2"]  # fmt: skip
    text = compare_methods.main(args)
    assert report.read_text() == text
    assert text.index("### 100k") < text.index("### 400k")  # budgets by size, whatever the run order
    assert "--peers`, docs/peers.md" in text  # the untuned study points to the tuned one's sweep and rates
    for budget in ("100k", "400k"):
        section = text.split(f"### {budget}")[1].split("###")[0]
        assert "| dense | 2 |" in section and "| lego r=0.3 | 2 |" in section and " ± " in section
        verdict = next(line for line in section.splitlines() if line.startswith("- **lego r=0.3**"))
        assert any(word in verdict for word in ("ahead", "behind", "within noise")), verdict
    assert (tmp_path / "results_isoflop.png").stat().st_size > 1000
    # dense alone at 200k: a point on its isoFLOP curve, in a table of its own, with no section or LEGO run
    assert "--dense-budgets 200k`" in text and "### 200k" not in text
    assert "| 200k | 2 |" in text.split("### Dense between the budgets")[1].split("###")[0]
    assert sorted(p.name for p in (tmp_path / "runs" / "dense" / "200k").iterdir()) == ["seed0", "seed1"]
    assert not (tmp_path / "runs" / "lego_r0.3" / "200k").exists()
    moe = text.split("## Mixture of Experts")[1]
    row = next(line for line in moe.splitlines() if line.startswith("| dense MoE | 2 |"))
    assert "(dense)" in row and any(word in row for word in ("ahead", "behind", "within noise")), row
    assert "![test PPL of experts and dense FFNs](results_moe.png)" in moe
    assert (tmp_path / "results_moe.png").stat().st_size > 1000
    results = json.loads(next((tmp_path / "runs" / "dense_MoE").glob("400k/seed0/results.json")).read_text())
    assert len(results["moe"]) == 4  # every layer of the 4-layer block
    assert len((tmp_path / "runs" / "summary.csv").read_text().splitlines()) == 1 + 12
    finished = sorted((tmp_path / "runs").glob("*/*/*/results.json"))
    assert len(finished) == 12
    assert not list((tmp_path / "runs").glob("*/*/*/stage_*/hard_tokens*.safetensors"))  # dumps removed
    stamps = [path.stat().st_mtime_ns for path in finished]
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(progress) == 12 and "to go)" in progress[0] and progress[-1].startswith("[12/12]")  # with an ETA
    compare_methods.main(args)  # a re-run skips every finished run
    assert "12 already finished, 0 to run" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in finished] == stamps
    # the archive alone (a few kB a run) reproduces the report, and a study resumes from it
    assert len(list((tmp_path / "archive").glob("*/*/*/results.json"))) == 12
    shutil.rmtree(tmp_path / "runs")
    assert compare_methods.main([*args, "--report-only"]) == text
    compare_methods.main(args)
    assert "12 already finished, 0 to run" in capsys.readouterr().out


def test_compare_methods_chooses_each_methods_learning_rate_on_validation(tmp_path):
    """`--tune-lr`: the rate with the lowest validation objective among a method's sweep runs is chosen, the
    comparison's jobs run at it, and the report has the sweep table and a frontier plot of the threshold scans."""
    from experiments import compare_methods as cm

    scores = {("dense", 5e-4): 30.0, ("dense", 1e-3): 25.0, ("dense", 2e-3): 27.0, ("LayerSkip", 1e-3): 40.0,
              ("LayerSkip", 4e-3): 35.0, ("MoD", 1e-3): 50.0}  # fmt: skip
    for (method, lr), objective in scores.items():
        path = tmp_path / cm.Job(method, cm.TUNE_BUDGET, 0, lr).name / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"objective": objective, "test_ppl": 1.0}))  # the test PPL is never read
    rates = cm.chosen_rates(tmp_path, ["dense", "LayerSkip", "MoD"])
    assert rates == {"dense": 1e-3, "LayerSkip": 4e-3}  # MoD: one finished rate, nothing to choose from
    jobs = cm.jobs_for(["dense", "LayerSkip", "MoD"], ["800k"], [0], rates)
    # dense's chosen rate is its preset's: the untuned study's job; LayerSkip's is not; MoD has none
    assert [job.name for job in jobs] == ["dense/800k/seed0", "LayerSkip_lr0.004/800k/seed0", "MoD/800k/seed0"]
    assert "block_schedule.blocks.0.lr=0.004" in cm.job_overrides(jobs[1], quick=False)
    assert not any(".lr=" in arg for job in (jobs[0], jobs[2]) for arg in cm.job_overrides(job, quick=False))
    lines = cm.lr_sweep_lines(tmp_path, ["dense", "MoD"], rates)
    assert f"| dense | {cm.TUNE_BUDGET} | 30.00 | **25.00** | 27.00 | - | 0.001 |" in lines
    assert f"| MoD | {cm.TUNE_BUDGET} | - | 50.00 | - | - | not tuned: its preset's |" in lines
    for lr, objective in ((1e-3, 21.0), (2e-3, 20.0)):  # a sweep at another budget: shown, its lowest in italics
        other = tmp_path / cm.Job("dense", "800k", 0, lr).name / "results.json"
        other.parent.mkdir(parents=True)
        other.write_text(json.dumps({"objective": objective}))
    lines = cm.lr_sweep_lines(tmp_path, ["dense", "MoD"], rates)
    assert "| dense | 800k | - | 21.00 | *20.00* | - | not used |" in lines
    assert not any(line.startswith("| MoD | 800k") for line in lines)  # no sweep of MoD there
    assert cm.chosen_rates(tmp_path, ["dense"], "200k") == {}  # the sweep of another budget
    assert any(line.startswith("| LayerSkip |") and "grid's edge" in line
               for line in cm.lr_sweep_lines(tmp_path, ["LayerSkip"], rates))  # fmt: skip
    # a report shows a method's preset-rate runs while those at its chosen rate are not run, and says so
    twin = tmp_path / "LayerSkip" / "800k" / "seed0" / "results.json"
    twin.parent.mkdir(parents=True)
    twin.write_text("{}")
    shown, stand_ins = cm.with_preset_stand_ins(tmp_path, jobs)
    assert [job.name for job in shown] == ["dense/800k/seed0", "LayerSkip/800k/seed0", "MoD/800k/seed0"]
    assert stand_ins == ["LayerSkip"]
    scan = [{"target_exit_share": share, "honest_cost": 1 - share / 2, "test_ppl": 20 + share} for share in (0, .5)]
    groups = {("LayerSkip", "800k"): [{"threshold_scan": scan}, {"threshold_scan": scan}]}
    cm.plot_frontier(groups, "800k", tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_a_sweep_at_a_compared_budget_reuses_the_comparisons_runs_and_the_other_way_round(tmp_path):
    """A sweep job and a comparison job that are the same run (seed 0, same budget, same rate; the presets' rate
    is the untuned job) are trained once: the finished one is copied under the other's name."""
    from experiments import compare_methods as cm

    def finish(root, job, objective):
        for name, text in ((".hydra/config.yaml", "{}"), (".hydra/overrides.yaml", "[]"), ("results.json", "")):
            (root / job.name / name).parent.mkdir(parents=True, exist_ok=True)
            (root / job.name / name).write_text(text or json.dumps({"objective": objective}))

    compare, sweep = tmp_path / "runs", tmp_path / "runs" / "lr_sweep"
    finish(compare, cm.Job("dense", "800k", 0), 20.0)  # the presets' rate, untuned
    finish(compare, cm.Job("MoD", "800k", 0, 2e-3), 30.0)
    finish(compare, cm.Job("MoD", "800k", 1, 4e-3), 31.0)  # seed 1: not the sweep's
    jobs = cm.sweep_jobs(["dense", "MoD"], "800k")
    assert cm.adopt_twins(jobs, sweep, [compare], cm.comparison_twin) == 2
    assert cm.chosen_rates(sweep, ["dense", "MoD"], "800k") == {}  # one rate each: nothing chosen yet
    assert json.loads((sweep / "dense_lr0.001/800k/seed0/results.json").read_text())["objective"] == 20.0
    assert (sweep / "MoD_lr0.002/800k/seed0/results.json").is_file()
    assert not (sweep / "MoD_lr0.004/800k/seed0").exists()
    assert cm.adopt_twins(jobs, sweep, [compare], cm.comparison_twin) == 0  # nothing finished is overwritten
    finish(sweep, cm.Job("MoD", "800k", 0, 4e-3), 25.0)
    comparison = cm.jobs_for(["dense", "MoD"], ["800k"], [0, 1], cm.chosen_rates(sweep, ["MoD"], "800k"))
    target = tmp_path / "archive"
    assert cm.adopt_twins(comparison, target, [sweep], cm.sweep_twin("800k")) == 2  # dense and MoD seed 0
    assert sorted(p.parent.relative_to(target).as_posix() for p in target.glob("*/*/*/results.json")) == [
        "MoD_lr0.004/800k/seed0", "dense/800k/seed0"]  # fmt: skip
    assert cm.adopt_twins(comparison, target, [sweep], cm.sweep_twin("200k")) == 0  # a sweep at another budget


def test_the_peer_study_is_one_flag():
    """`--peers` alone is the published study: its methods, budgets, dense's extra budgets and the tuning budget;
    without it, the untuned study's defaults."""
    from experiments import compare_methods as cm

    peers = cm.parse_args(["--peers"])
    assert (peers.methods, peers.budgets) == (list(cm.PEER_STUDY), ["800k", "3.2M"])
    assert (peers.tune_lr, peers.tune_budget, peers.dense_budgets) == (True, "800k", ["1.6M", "2.4M"])
    assert peers.report.name == "peers.md" and peers.archive.name == "peer_runs"
    plain = cm.parse_args([])
    assert (plain.tune_lr, plain.tune_budget, plain.dense_budgets) == (False, "400k", [])
    assert "MoD" not in plain.methods and plain.report.name == "results.md"
    other = cm.parse_args(["--peers", "--tune-budget", "200k", "--dense-budgets"])
    assert (other.tune_budget, other.dense_budgets) == ("200k", [])


def test_the_peer_report_says_how_mixture_of_depths_was_scored():
    from experiments import compare_methods as cm

    def run(ppl, topk, shares):
        mod = {"capacity": 0.125, "test_ppl_routing": "causal: routed where sigmoid(score) >= 0.5",
               "test_routed_share": dict(enumerate(shares)), "test_ppl_topk": topk}  # fmt: skip
        return {"test_ppl": ppl, "mod": mod}

    groups = {("MoD", "800k"): [run(50.0, 49.0, (0.10, 0.12)), run(52.0, 51.0, (0.12, 0.14))]}
    assert cm.mod_routing_lines(groups, ["800k", "3.2M"]) == [
        "## How Mixture-of-Depths was scored", "",
        "- 800k: test PPL 51.00 ± 1.41 with causal routing (routed where sigmoid(score) >= 0.5), routing 12.0% of "
        "the test tokens per routed layer (training's capacity 12.5%); training's top-k routing, which reads later "
        "tokens, would score 50.00 ± 1.41.", ""]  # fmt: skip
    assert cm.mod_routing_lines({("dense", "800k"): [{"test_ppl": 1.0}]}, ["800k"]) == []


def test_equal_flops_verdicts_read_dense_off_its_measured_points_between_the_budgets():
    """Dense alone at a budget between the compared ones (`--dense-budgets`) is a point of its isoFLOP curve: a
    method at that budget's FLOPs is compared with the measured dense PPL, not with the chord across the gap."""
    from experiments import compare_methods as cm

    def runs(flops, ppl):
        run = {"train_flops": flops, "test_ppl": ppl, "test_ppl_full_depth": ppl, "honest_cost": 0.8,
               "shallow_ratio": 0.3, "inference_speedup": 1.2}  # fmt: skip
        return [{**run, "test_ppl": ppl * (1 + d)} for d in (-0.01, 0.01)]

    groups = {("dense", "800k"): runs(1.0, 100.0), ("dense", "3.2M"): runs(4.0, 25.0),
              ("lego r=0.3", "3.2M"): runs(2.0, 42.0)}  # fmt: skip
    chord = cm.budget_lines(groups, ["800k", "3.2M"])
    assert "dense interpolated to lego r=0.3's 0.50x FLOPs: 50.00, lego r=0.3 ahead" in "\n".join(chord)
    groups[("dense", "1.6M")] = runs(2.0, 40.0)  # the measured curve bends below the chord
    lines = cm.budget_lines(groups, ["800k", "3.2M"], ["1.6M"])
    text = "\n".join(lines)
    assert "dense interpolated to lego r=0.3's 0.50x FLOPs: 40.00, lego r=0.3 behind" in text
    table = text.split("### Dense between the budgets")[1].split("###")[0]
    assert "| 1.6M | 2 | 40.00 ± 0.57 | 0.50 ± 0.00 |" in table and "| 3.2M | 2 |" in table
    assert "### 1.6M" not in text  # a dense-only budget has no section of its own


def test_the_frontier_verdict_names_the_best_method_at_three_quarters_of_dense_cost():
    from experiments import compare_methods as cm

    def run(*points):
        return {"threshold_scan": [{"honest_cost": c, "test_ppl": p} for c, p in points]}

    assert cm.ppl_within_cost(run((1.0, 100.0), (0.5, 120.0))) == pytest.approx(110.0)  # crossing 0.75
    assert cm.ppl_within_cost(run((1.0, 100.0), (0.7, 104.0), (0.5, 90.0))) == 90.0  # a cheaper, better point
    assert cm.ppl_within_cost(run((1.0, 100.0))) is None
    groups = {
        ("dense", "800k"): [run((1.0, 100.0))] * 2,
        ("lego r=0.3", "800k"): [run((1.0, 98.0), (0.5, 118.0)), run((1.0, 99.0), (0.5, 119.0))],
        ("MoD", "800k"): [run((0.6, 120.0)), run((0.6, 121.0))],
    }
    text = cm.frontier_verdict(groups, "800k")
    assert "lego r=0.3 108.50 ± 0.71, MoD 120.50 ± 0.71" in text and "never that cheap: dense" in text
    assert "On the frontier: **lego r=0.3**; against MoD: ahead" in text and "against dense" not in text


def test_bench_scale_smoke():
    """One `train.py` run with dump=stream at smoke size: its row has its memory, disk and time (the numbers
    themselves are the benchmark's, not the test's)."""
    from experiments import bench_scale

    rows = bench_scale.main(["--tokens", "60000", "--contrast", "--steps", "2"])
    assert [(row["tokens"], row["dump"]) for row in rows] == [(60_000, "stream")]
    for row in rows:
        assert row["peak_rss_mb"] > 0 and row["shard_mb"] > 0 and row["prefix_share_of_block0"] > 0
        assert 1.0 <= row["handoff_bytes_per_token"] < 1.5  # the 1-byte mask (and its .npy header), no dump


def test_bench_prep_runs_the_path_before_token_shards_beside_this_one(capsys):
    """The side-by-side preparation: the commit before token shards, exported from git, and this code, in fresh
    processes each; on the same text they make the same tokens (the shards changed how tokens are stored, not which)."""
    import subprocess

    from experiments import bench_prep

    known = subprocess.run(["git", "cat-file", "-e", f"{bench_prep.BEFORE_SHARDS}^{{commit}}"], cwd=bench_prep.ROOT)
    if known.returncode:
        pytest.skip(f"a clone without {bench_prep.BEFORE_SHARDS} (shallow): nothing to compare against")
    rows = bench_prep.main(["--mb", "0.05", "--vocab", "300"])
    assert [row["path"] for row in rows] == [bench_prep.BEFORE_SHARDS, "this code"]
    assert rows[0]["cold"]["tokens"] == rows[1]["cold"]["tokens"] == rows[1]["warm"]["tokens"] > 10_000
    assert all(row["cache_mb"] > 0 for row in rows)
    assert "this code's cold preparation" in capsys.readouterr().out


def test_every_compared_methods_preset_trains_at_the_preset_rate():
    """PRESET_LR is what each method's preset sets: a chosen rate equal to it reuses the untuned job's runs."""
    from hydra import compose, initialize_config_dir

    from experiments import compare_methods as cm
    from lego.pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(cm.REPO / "conf"), version_base="1.3"):
        for method in cm.METHODS.values():
            blocks = compose("config", overrides=list(method.overrides)).block_schedule.blocks
            assert blocks[0].lr == cm.PRESET_LR, method.overrides
