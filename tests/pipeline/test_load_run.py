"""`load_run(run_dir)` rebuilds the model a real train.py run trained: its weights, thresholds and test numbers, any
stage; a missing or damaged piece is one DataError line naming the path. README's load snippet runs as printed."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lego.data.tokenizer import train_bpe
from lego.errors import DataError
from lego.pipeline import load_run
from lego.training.routing import evaluate_routed
from tests.launch import REPO, offline_env


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_weights_are(model: torch.nn.Module, path: Path) -> None:
    """Every tensor of the saved file is the model's (the tied head is stored once, as embedding.weight)."""
    state = model.state_dict()
    saved = load_file(path)
    for key in state:
        expected = saved.get(key, saved["embedding.weight"] if key == "head.weight" else None)
        assert expected is not None and torch.equal(state[key], expected), key


def test_the_loaded_model_is_the_trained_one(tiny_run, cache_dir):
    run = load_run(tiny_run)
    assert run.stage == 1 and len(run.model.blocks) == 2 and not run.model.training  # the last complete stage
    assert run.config.experiment_name == "tiny" and run.run_dir == tiny_run
    assert run.model.head.weight is run.model.embedding.weight
    _assert_weights_are(run.model, tiny_run / "stage_1" / "model.safetensors")
    assert run.model.blocks[0].threshold == _json(tiny_run / "stage_0" / "stats.json")["threshold"]
    assert math.isinf(run.model.blocks[1].threshold)  # the last block never exits early

    results = _json(tiny_run / "results.json")
    test = evaluate_routed(run.model, run.prepare_data(cache_dir).test, run.config.trainer.eval_batch_size, "cpu")
    assert test["ppl"] == pytest.approx(results["test_ppl"], rel=1e-6)
    assert test["exit_counts"] == results["exit_counts"]

    exits = run.token_exits("It is a truth universally acknowledged, " * 4)  # longer than one window (seq_len 32)
    assert "".join(token for token, _ in exits) == "It is a truth universally acknowledged, " * 4
    assert {block for _, block in exits} == {0, 1}
    assert run.token_exits("") == []


def test_stage_0_is_block_0_alone(tiny_run, cache_dir):
    """After stage 0 only Block 0 is trained: the model is Block 0 on every token, and scores its best val PPL."""
    run = load_run(tiny_run, stage=0)
    assert run.stage == 0 and len(run.model.blocks) == 1
    _assert_weights_are(run.model, tiny_run / "stage_0" / "model.safetensors")
    val = evaluate_routed(run.model, run.prepare_data(cache_dir).val, run.config.trainer.eval_batch_size, "cpu")
    assert val["ppl"] == pytest.approx(_json(tiny_run / "stage_0" / "stats.json")["best_val_ppl"], rel=1e-6)


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run's loadable files, to break."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("wandb", "*plots", "hard_*")))


def _remove(path: Path) -> Path:
    path.unlink()
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _other_tokenizer(run: Path) -> Path:
    train_bpe(["It is a truth universally acknowledged. " * 20], 300, progress=False).save(run / "tokenizer.json")
    return run / "stage_1" / "model.safetensors"  # whose embedding no longer fits the vocabulary


def _no_complete_stage(run: Path) -> Path:
    for k in (0, 1):
        _remove(run / f"stage_{k}" / "stats.json")
    return run


# name: (break the run dir, returning the path the message must name; load_run's keyword arguments)
BREAKAGES = {
    "no run dir": (lambda run: run / "absent", {}),
    "no run_config.json": (lambda run: _remove(run / "run_config.json"), {}),
    "unknown config key": (lambda run: _write(run / "run_config.json", '{"model": {"dimm": 3}}'), {}),
    "not a lego run": (lambda run: _write(run / "run_config.json", '{"method": "universal"}').parent, {}),
    "no tokenizer.json": (lambda run: _remove(run / "tokenizer.json"), {}),
    "stage out of range": (lambda run: run, {"stage": 2}),
    "incomplete stage": (lambda run: _remove(run / "stage_1" / "stats.json").parent, {"stage": 1}),
    "no complete stage": (_no_complete_stage, {}),
    "no weights": (lambda run: _remove(run / "stage_1" / "model.safetensors"), {}),
    "damaged weights": (lambda run: _truncate(run / "stage_1" / "model.safetensors"), {}),
    "another tokenizer": (_other_tokenizer, {}),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_what_is_missing_is_one_line_naming_it(run_copy, name):
    breaks, kwargs = BREAKAGES[name]
    named = breaks(run_copy)
    with pytest.raises(DataError) as err:
        load_run(named if name == "no run dir" else run_copy, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(named)), message


def test_an_interrupted_run_loads_its_last_complete_stage(run_copy):
    (run_copy / "stage_1" / "stats.json").unlink()  # stage 1 interrupted: its stats.json is written last
    assert load_run(run_copy).stage == 0


def test_readme_load_snippet_runs_as_printed(tiny_run, cache_dir):
    """README's load_run block, on the tiny run fixture instead of /tmp/tinyrun, prints what the README shows it
    printing: the same lines, and a test PPL and exit counts that are the run's own results.json's."""
    section = (REPO / "README.md").read_text().split("## Using the model from Python", 1)[1].split("\n## ", 1)[0]
    after = next(block for block in section.split("```python\n")[1:] if "load_run(" in block.split("```", 1)[0])
    code, shown = after.split("```", 1)[0], after.split("```text\n", 1)[1].split("```", 1)[0]
    assert '"/tmp/tinyrun"' in code
    proc = subprocess.run(
        [sys.executable, "-c", code.replace('"/tmp/tinyrun"', repr(str(tiny_run)))],
        cwd=REPO, env=offline_env(cache_dir), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed, expected = proc.stdout.splitlines(), shown.splitlines()
    assert [line.split()[0] for line in printed] == [line.split()[0] for line in expected]
    results = _json(tiny_run / "results.json")
    assert f"test PPL {results['test_ppl']:.2f}, exits per block {results['exit_counts']}" in printed
