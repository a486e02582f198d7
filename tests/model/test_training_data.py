"""TrainingData: container invariants, batching, splits, safetensors round trip and bad files."""

import pytest
import torch
from safetensors.torch import save_file

from lego import TrainingData
from lego.errors import DataError
from lego.training_data import HiddenStateWriter, dump_bytes


def hidden_data(sequences=6, seq=5, dim=4, seed=0) -> TrainingData:
    gen = torch.Generator().manual_seed(seed)
    return TrainingData(
        hidden_states=torch.randn(sequences, seq, dim, generator=gen),
        targets=torch.randint(0, 9, (sequences, seq), generator=gen),
        active=torch.rand(sequences, seq, generator=gen) < 0.4,
    )


def test_len_counts_active_tokens_and_windows_shift_targets():
    windows = torch.arange(12).view(2, 6)
    data = TrainingData.from_windows(windows)
    assert len(data) == 10 and data.seq_len == 5
    assert torch.equal(data.input_ids[0], torch.arange(5)) and torch.equal(data.targets[0], torch.arange(1, 6))


def test_batches_are_whole_sequences_and_skip_idle_ones():
    data = hidden_data()
    data.active[2] = False
    seen = [row for batch in data.batches(4) for row in batch.targets]
    assert len(seen) == data.num_sequences - 1 == sum(1 for _ in data.batches(1))
    assert data.num_batches(4) == 2
    shuffled = list(data.batches(2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sum(len(b) for b in shuffled) == len(data)


def test_split_is_disjoint_and_deterministic():
    data = hidden_data(sequences=20)
    train, val = data.split(0.25, seed=3)
    train2, val2 = data.split(0.25, seed=3)
    assert val.num_sequences == 5 and train.num_sequences == 15
    assert torch.equal(val.hidden_states, val2.hidden_states)
    rows = {tuple(r.flatten().tolist()) for r in train.hidden_states}
    assert not rows & {tuple(r.flatten().tolist()) for r in val.hidden_states}


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="targets and active"):
        TrainingData(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly one"):
        TrainingData(None, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("make", [hidden_data, lambda: TrainingData.from_windows(torch.randint(0, 9, (3, 8)))])
def test_save_load_round_trip(tmp_path, make):
    data = make()
    data.save(tmp_path / "d.safetensors")
    loaded = TrainingData.load(tmp_path / "d.safetensors")
    for name in ("hidden_states", "targets", "active", "input_ids"):
        a, b = getattr(data, name), getattr(loaded, name)
        assert (a is None and b is None) or torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "d.safetensors"
    hidden_data().save(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="truncated"):
        TrainingData.load(path)


def test_foreign_or_inconsistent_files_are_rejected(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(DataError, match="not a LEGO TrainingData"):
        TrainingData.load(foreign)
    with pytest.raises(DataError, match="not found"):
        TrainingData.load(tmp_path / "missing.safetensors")
    data = hidden_data()
    bad = tmp_path / "bad.safetensors"
    meta = '{"format": "lego.TrainingData/1", "sequences": 6, "seq_len": 5, "active_tokens": 1, "dim": 4}'
    save_file(
        {"hidden_states": data.hidden_states, "targets": data.targets, "active": data.active[:, :4].contiguous()},
        str(bad),
        metadata={"lego": meta},
    )
    with pytest.raises(DataError, match="mismatched"):
        TrainingData.load(bad)


def test_mmap_load_equals_load_and_leaves_file_untouched(tmp_path):
    data = hidden_data()
    path = tmp_path / "d.safetensors"
    data.save(path)
    before = path.read_bytes()
    mapped = TrainingData.load(path, mmap=True)
    assert torch.equal(mapped.hidden_states, data.hidden_states) and torch.equal(mapped.active, data.active)
    mapped.hidden_states[0] += 1.0  # copy-on-write: the file keeps its bytes
    assert path.read_bytes() == before
    path.write_bytes(before[:-40])
    with pytest.raises(DataError, match="truncated"):
        TrainingData.load(path, mmap=True)


def test_hidden_state_writer_streams_a_loadable_file(tmp_path):
    data = hidden_data(sequences=5)
    path = tmp_path / "streamed.safetensors"
    with HiddenStateWriter(path, 5, 5, 4) as writer:
        for row in reversed(range(5)):  # any order
            writer.hidden[row] = data.hidden_states[row]
        writer.finish(data.targets, data.active)
    for mmap in (False, True):
        loaded = TrainingData.load(path, mmap=mmap)
        assert torch.equal(loaded.hidden_states, data.hidden_states)
        assert torch.equal(loaded.targets, data.targets) and torch.equal(loaded.active, data.active)


def test_unfinished_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), HiddenStateWriter(tmp_path / "x.safetensors", 2, 3, 4) as writer:
        writer.hidden[0] = 1.0
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_files_store_token_ids_and_targets_as_int32(tmp_path):
    """4 bytes per token less than int64, read back as they are (a memory map needs no int64 copy)."""
    for data in (hidden_data(), TrainingData.from_windows(torch.randint(0, 9, (6, 6)))):
        path = tmp_path / "d.safetensors"
        data.save(path)
        for mmap in (False, True):
            loaded = TrainingData.load(path, mmap=mmap)
            assert loaded.targets.dtype == torch.int32 and torch.equal(loaded.targets, data.targets)
            if data.input_ids is not None:
                assert loaded.input_ids.dtype == torch.int32 and torch.equal(loaded.input_ids, data.input_ids)
    with pytest.raises(ValueError, match="int32/int64"):
        TrainingData(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_bfloat16_writer_takes_2_dim_plus_5_bytes_per_token(tmp_path):
    data = hidden_data(sequences=4, seq=8, dim=16)
    path = tmp_path / "bf16.safetensors"
    with HiddenStateWriter(path, 4, 8, 16, torch.bfloat16) as writer:
        writer.hidden[:] = data.hidden_states
        writer.finish(data.targets, data.active)
    assert path.stat().st_size - 8 - 4096 == dump_bytes(4, 8, 16, itemsize=2) == 4 * 8 * (2 * 16 + 5)
    loaded = TrainingData.load(path, mmap=True)
    assert torch.equal(loaded.hidden_states, data.hidden_states.bfloat16())
    assert torch.equal(loaded.targets, data.targets) and torch.equal(loaded.active, data.active)


def test_scratch_floats_write_rows_and_read_slices_through_the_file(tmp_path):
    """The streamed hand-off's confidence scratch: rows written in runs, read back by slices, zeros where unwritten,
    the file gone afterwards."""
    from lego.training_data import scratch_floats

    values = torch.randn(3, 4)
    with scratch_floats(tmp_path / "hard_mask.npy", (6, 4)) as scratch:
        scratch[torch.tensor([1, 2, 4])] = values  # two runs: rows 1-2, then row 4
        read = scratch[0:6]
        assert torch.equal(read[[1, 2, 4]], values) and torch.equal(read[[0, 3, 5]], torch.zeros(3, 4))
        assert torch.equal(scratch[4:5], values[2:])
    assert list(tmp_path.iterdir()) == []
