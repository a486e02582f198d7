"""experiments/bench_dump.py runs at a tiny size and measures the formats it names (timings not checked)."""

import pytest

from experiments import bench_dump


def test_bench_dump_measures_each_format(tmp_path, capsys):
    args = ["--train-tokens", "4000", "--eval-tokens", "1000", "--dim", "32", "--heads", "2", "--seq", "32"]
    result = bench_dump.main([*args, "--repeats", "1", "--cache-dir", str(tmp_path)])
    per_token = result["bytes_per_token"]
    header = 8 + 4096  # HiddenStateWriter's fixed header room, spread over the tokens
    tokens = header / (per_token["bfloat16"] - (2 * 32 + 5))
    assert per_token["float32"] == pytest.approx(4 * 32 + 5 + header / tokens)
    assert per_token["none"] < 10  # token ids and targets as int32, and the mask
    assert set(result["runs"]) == {"float32", "bfloat16", "seed 2"}
    assert "of Block 0's training time" in capsys.readouterr().out
