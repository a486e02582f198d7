"""Bad config values: one clear line on stderr, a non-zero exit, and no run directory left behind."""

import pytest

from tests.launch import run_train

BAD = [
    ("hard_ratio.value=1.5", "hard_ratio.value=1.5"),
    ("model.num_heads=3", "model.num_heads=3"),
    ("block_schedule.blocks.0.layers=0", "block_schedule.blocks[0].layers=0"),
    ("hard_ratio.per_block=[0.5,0.5,0.5]", "hard_ratio.per_block has 3 values"),
    ("wandb.mode=sometimes", "wandb.mode='sometimes'"),
    ("data.seq_len=0", "data.seq_len=0"),
    ("trainer.memory_budget_mb=-1", "trainer.memory_budget_mb=-1.0 is negative"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_out_of_range_values_fail_before_any_work(tmp_path, cache_dir, override, message):
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", override, cache_dir=cache_dir, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


UNKNOWN = {
    "+model.foo=1": "unknown config key model.foo (no such key;",
    "+model.dimm=3": "unknown config key model.dimm (did you mean model.dim?)",
    "+block_schedule.blocks.0.lrr=0.1": "block_schedule.blocks[0].lrr (did you mean block_schedule.blocks[0].lr?)",
    "+model.seq_len=64": "unknown config key model.seq_len (did you mean data.seq_len?)",
    "+seeed=3": "unknown config key seeed (did you mean seed?)",
}


@pytest.mark.parametrize(
    "overrides,messages",
    [
        (list(UNKNOWN), list(UNKNOWN.values())),
        (["+universal.preset=lpt"], ["universal.preset is read only by method=universal"]),
    ],
)
def test_unknown_keys_fail_before_any_work(tmp_path, cache_dir, overrides, messages):
    """`+key=value` adds a key that Hydra's typed nodes lack; it must not be dropped silently."""
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", *overrides, cache_dir=cache_dir, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert all(message in lines[0] for message in messages), lines[0]
    assert not run_dir.exists()


def test_wrong_type_is_rejected_by_the_schema(tmp_path, cache_dir):
    proc = run_train("+experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}", "model.dim=wide", cache_dir=cache_dir)
    assert proc.returncode != 0
    assert "model.dim" in proc.stderr and "wide" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_is_one_line_and_leaves_no_run(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_train(
        "+experiment=tiny",
        f"hydra.run.dir={run_dir}",
        "data=text_files",
        f"data.files=[{tmp_path}/missing.txt]",
        cache_dir=cache_dir,
        timeout=60,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.files" in last and "missing.txt" in last
    assert not run_dir.exists()
