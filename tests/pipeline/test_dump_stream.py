"""`trainer.dump=stream`: a stage writes only its hard tokens' mask (1 byte per token) and the next stage makes its
inputs for every batch by running the frozen earlier blocks on the token ids.

In-process runs on random tokens as in test_stage_dumps.py (seconds), against the float32 dump: the same hard
tokens, the same training up to float rounding (the states come from other batches, so other float sums), and a
resume from the masks; then one `train.py` run in a subprocess.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lego import TrainingData
from lego.errors import DataError
from lego.training.propagation import FrozenPrefix, run_flops
from lego.training_data import StreamedTrainingData, load_mask, load_mask_shard, save_mask, shard_path, shard_rows
from tests.launch import run_train
from tests.pipeline.test_stage_dumps import SEQ, assert_same_weights, interrupted, stage_run

LOSS_TOLERANCE = 1e-5  # float32 dump vs streamed states: the same computation in other batches


def stats(run_dir, k: int) -> dict:
    return json.loads((run_dir / f"stage_{k}" / "stats.json").read_text())


def step_losses(run_dir, k: int) -> list[float]:
    return [loss for row in stats(run_dir, k)["evals"] for loss in row["step_losses"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-block run with float32 dumps and the same run streamed."""
    root = tmp_path_factory.mktemp("stream")
    return {
        "keep": (root / "keep", stage_run(root / "keep", blocks=3, dump_dtype="float32")),
        "stream": (root / "stream", stage_run(root / "stream", blocks=3, dump="stream")),
    }


def test_stream_writes_only_a_one_byte_mask_of_the_dump_paths_hard_tokens(runs):
    keep, stream = runs["keep"][0], runs["stream"][0]
    assert not list(stream.rglob("hard_tokens*")) and not list(stream.rglob("*.tmp"))  # no dump, no scratch left
    assert not (stream / "stage_2" / "hard_mask.npy").exists()  # the last block passes nothing on
    for k in (0, 1):
        path = stream / f"stage_{k}" / "hard_mask.npy"
        mask = load_mask(path)[:]
        dumped = TrainingData.load(keep / f"stage_{k}" / "hard_tokens.safetensors")
        assert torch.equal(mask, dumped.active)
        assert len(dumped) == stats(stream, k)["hard_count"] == stats(keep, k)["hard_count"]
        assert path.stat().st_size == 128 + mask.numel()  # the .npy header, then 1 byte per token


def test_block_1_trains_as_on_the_float32_dump(runs):
    (keep, keep_model), (stream, stream_model) = runs["keep"], runs["stream"]
    for k in (1, 2):
        expected, got = step_losses(keep, k), step_losses(stream, k)
        assert len(got) == len(expected) > 5  # the same batches: windows with a hard token, in the seeded order
        assert max(abs(a - b) for a, b in zip(expected, got, strict=True)) < LOSS_TOLERANCE
    assert_same_weights(stream_model, keep_model, exact=False)


def test_stream_counts_the_frozen_blocks_forward(runs):
    stream, model = runs["stream"]
    assert stats(stream, 0)["stream_flops"] == 0.0  # Block 0 reads token ids
    mask = load_mask(stream / "stage_0" / "hard_mask.npy")
    rows = int(mask.any(dim=1).sum())
    # Block 1's windows go through Block 0 (dense) once to train (one epoch) and once to be scored for Block 2
    one_pass = run_flops(model.blocks[0], rows * SEQ, rows * SEQ, SEQ)
    assert len(step_losses(stream, 1)) == -(-rows // 4)  # a whole epoch of batches of 4 (`run_config`)
    assert stats(stream, 1)["stream_flops"] == pytest.approx(2 * one_pass)
    assert stats(stream, 2)["stream_flops"] > one_pass  # Blocks 0 and 1, once


@pytest.mark.parametrize("before", ["stream", "keep"])
def test_a_resume_after_a_complete_stage_0_rebuilds_block_1s_inputs_from_the_mask(runs, tmp_path, before):
    """Interrupted in stage 1 (stage 0 complete), resumed with dump=stream: the same result as an uninterrupted
    run, whichever way stage 0 left Block 1's inputs; stage 1 then leaves a mask too."""
    run_dir = tmp_path / "run"
    interrupted(run_dir, stage=1, blocks=3, dump=before, dump_dtype="float32")
    resumed = stage_run(run_dir, blocks=3, dump="stream", dump_dtype="float32")
    assert_same_weights(resumed, runs["stream"][1], exact=before == "stream")
    assert (run_dir / "stage_1" / "hard_mask.npy").is_file()


def test_a_streamed_stage_may_be_resumed_with_a_dump(runs, tmp_path):
    """stream, then keep: Block 2's dump is propagated from Block 1's streamed inputs."""
    run_dir = tmp_path / "run"
    interrupted(run_dir, stage=2, blocks=3, dump="stream")
    resumed = stage_run(run_dir, blocks=3, dump="keep", dump_dtype="float32")
    assert_same_weights(resumed, runs["stream"][1], exact=False)


def test_a_truncated_mask_is_a_one_line_error_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    interrupted(run_dir, stage=1, blocks=2, dump="stream")
    path = run_dir / "stage_0" / "hard_mask.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=f"{path} is missing, truncated or not a hard-token mask"):
        stage_run(run_dir, blocks=2, dump="stream")


def test_a_mask_written_by_two_ranks_is_read_back_by_three(tmp_path):
    mask = torch.rand(11, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    path = tmp_path / "hard_mask.npy"
    for rank in range(2):  # each rank its round-robin rows, in chunks
        save_mask(shard_path(path, rank, 2), mask[rank::2].split(2), tuple(mask[rank::2].shape))
    assert torch.equal(load_mask_shard(path, 2, 1, 2)[:], mask[1::2])  # as many ranks: its own file, read
    for rank in range(3):
        assert torch.equal(load_mask_shard(path, 2, rank, 3), mask[shard_rows(11, rank, 3)])


def test_a_mask_is_read_by_file_reads_as_the_tensor_it_stores(tmp_path):
    """`load_mask` maps nothing (its pages stay out of the process's RSS, however large the corpus): rows by slice
    and by index tensor, in any order and with repeats, and the reductions of `TrainingData.active`, equal the
    tensor's."""
    mask = torch.rand(23, 6, generator=torch.Generator().manual_seed(1)) > 0.7
    mask[4] = False  # a window with no hard token
    path = tmp_path / "hard_mask.npy"
    save_mask(path, mask.split(5), tuple(mask.shape))
    loaded = load_mask(path)
    loaded.CHUNK_BYTES = 12  # two rows a chunk: the reductions cross chunks
    assert loaded.shape == mask.shape and loaded.dtype == torch.bool and len(loaded) == 23
    assert torch.equal(loaded[:], mask) and torch.equal(loaded[3:9], mask[3:9]) and loaded[30:].shape == (0, 6)
    rows = torch.tensor([7, 2, 3, 4, 22, 0, 3, 8])
    assert torch.equal(loaded[rows], mask[rows]) and loaded[torch.tensor([], dtype=torch.long)].shape == (0, 6)
    picked = torch.arange(23) % 3 == 0
    assert torch.equal(loaded[picked], mask[picked]) and torch.equal(loaded[5], mask[5])
    assert torch.equal(loaded.any(dim=1), mask.any(dim=1)) and not bool(loaded.any(dim=1)[4])
    assert int(loaded.count_nonzero()) == int(mask.count_nonzero()) and not bool(loaded.all())
    with pytest.raises(IndexError):
        loaded[torch.tensor([23])]
    assert str(path) not in Path("/proc/self/maps").read_text()  # read, never mapped
    data = TrainingData(None, torch.zeros(23, 6, dtype=torch.long), mask, torch.zeros(23, 6, dtype=torch.long))
    streamed = StreamedTrainingData(data, loaded, FrozenPrefix(None, [], "float32"))
    assert len(streamed) == int(mask.count_nonzero())
    windows = int(mask.any(dim=1).count_nonzero())
    assert windows < 23 and streamed.num_batches(4) == -(-windows // 4)  # windows without a hard token: not read


def test_train_py_with_dump_stream_completes_without_a_dump(tiny_run, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", "trainer.dump=stream", "wandb=disabled",
                     cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(run_dir.rglob("hard_tokens*")) and not list(run_dir.rglob("*.tmp"))
    mask = np.load(run_dir / "stage_0" / "hard_mask.npy")
    dumped = TrainingData.load(tiny_run / "stage_0" / "hard_tokens.safetensors")  # the default run's dump
    assert torch.equal(torch.from_numpy(mask), dumped.active)  # Block 0 is the same model: the same choice
    results = json.loads((run_dir / "results.json").read_text())
    stages = [stats(run_dir, k) for k in (0, 1)]
    assert stages[1]["stream_flops"] > 0
    assert results["train_flops"] == sum(s["train_flops"] + s["collect_flops"] + s["stream_flops"] for s in stages)
