"""What a stage leaves for the next one (`trainer.dump`, `trainer.dump_dtype`) and how a resume finds its inputs.

`train_staged` runs in-process on random tokens (seconds); an interruption is a tracker that raises at a
chosen step of a chosen stage, after that stage has written a checkpoint: a resume then continues it.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from lego import LEGOConfig, LEGOTransformer, TrainingData
from lego.pipeline.config import BlockScheduleConf, RunConfig, StageConf, validate
from lego.pipeline.staged import train_staged
from lego.training_data import dump_bytes
from tests.launch import run_train

VOCAB, DIM, SEQ = 40, 16, 12


class Interrupt(Exception):
    pass


class FakeTracker:
    """Records what a stage logs to W&B; raises `Interrupt` at step `stop_at` of stage `stop_stage`."""

    def __init__(self, stop_stage: int | None = None, stop_at: int = 5) -> None:
        self.stop_stage, self.stop_at = stop_stage, stop_at
        self.steps: dict[int, set[str]] = {}
        self.ends: dict[int, dict] = {}

    def log_step(self, stage: int, metrics: dict) -> None:
        self.steps.setdefault(stage, set()).update(metrics)
        if stage == self.stop_stage and metrics.get("step") == self.stop_at and "tokens" in metrics:  # a step
            raise Interrupt

    def log_stage_end(self, stage: int, stats: dict) -> None:
        self.ends[stage] = stats


def run_config(blocks: int, **trainer) -> RunConfig:
    stage = StageConf(layers=1, epochs=1, lr=1e-2, warmup_steps=1, evals_per_epoch=3, batch_size=4)
    run = RunConfig(block_schedule=BlockScheduleConf(blocks=[stage] * blocks))
    run.trainer.progress = False
    run.trainer.eval_batch_size = 8
    for key, value in trainer.items():
        setattr(run.trainer, key, value)
    validate(run)
    return run


def stage_run(run_dir, blocks: int = 2, tracker: FakeTracker | None = None, **trainer) -> LEGOTransformer:
    """`train_staged` as the runner calls it, on fixed random tokens and fixed initial weights."""
    run = run_config(blocks, **trainer)
    gen = torch.Generator().manual_seed(0)
    train = TrainingData.from_windows(torch.randint(0, VOCAB, (48, SEQ + 1), generator=gen))
    val = TrainingData.from_windows(torch.randint(0, VOCAB, (12, SEQ + 1), generator=gen))
    torch.manual_seed(0)
    model = LEGOTransformer.from_config(
        LEGOConfig(vocab_size=VOCAB, dim=DIM, num_heads=2, layers_per_block=[1] * blocks, max_seq_len=SEQ)
    )
    train_staged(run, model, train, val, run_dir, tracker or FakeTracker())
    return model


def interrupted(run_dir, stage: int, blocks: int = 2, **trainer) -> None:
    with pytest.raises(Interrupt):
        stage_run(run_dir, blocks, FakeTracker(stop_stage=stage), **trainer)
    assert (run_dir / f"stage_{stage}" / "checkpoint.pt").is_file()  # resumable mid-stage


def assert_same_weights(a: LEGOTransformer, b: LEGOTransformer, exact: bool = True) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5, msg=key)


def test_default_dump_holds_bfloat16_states_and_int32_targets(tmp_path):
    stage_run(tmp_path)
    path = tmp_path / "stage_0" / "hard_tokens.safetensors"
    with safe_open(str(path), framework="pt") as f:
        dtypes = {key: f.get_tensor(key).dtype for key in f.keys()}  # noqa: SIM118 (no __iter__)
    assert dtypes == {"hidden_states": torch.bfloat16, "targets": torch.int32, "active": torch.bool}
    header = 8 + 4096  # HiddenStateWriter's fixed header room
    assert path.stat().st_size == dump_bytes(48, SEQ, DIM, itemsize=2) + header  # 2 * dim + 5 bytes per token


def test_delete_removes_a_dump_once_the_next_stage_is_complete_and_resume_never_needs_it(tmp_path):
    reference = stage_run(tmp_path / "keep", blocks=3)
    run_dir = tmp_path / "delete"
    interrupted(run_dir, stage=2, blocks=3, dump="delete")
    # stage 1 is complete: stage 0's dump is gone; stage 2 was interrupted: stage 1's dump stays
    assert not list((run_dir / "stage_0").glob("hard_tokens*"))
    assert (run_dir / "stage_1" / "hard_tokens.safetensors").is_file()
    resumed = stage_run(run_dir, blocks=3, dump="delete")
    assert_same_weights(resumed, reference)  # deleting changes nothing that is computed
    assert not list(run_dir.glob("stage_*/hard_tokens*"))
    assert_same_weights(stage_run(run_dir, blocks=3, dump="delete"), reference)  # all complete: no dump needed


def test_none_writes_no_dump_and_a_resume_recomputes_the_same_inputs(tmp_path, capsys):
    float32 = stage_run(tmp_path / "float32", blocks=3, dump_dtype="float32")
    uninterrupted = stage_run(tmp_path / "none", blocks=3, dump="none")
    assert_same_weights(uninterrupted, float32, exact=False)  # the same inputs, up to float rounding
    run_dir = tmp_path / "resumed"
    interrupted(run_dir, stage=2, blocks=3, dump="none")
    assert not list(run_dir.glob("stage_*/hard_tokens*"))
    resumed = stage_run(run_dir, blocks=3, dump="none")  # recomputes Block 1's inputs, then Block 2's
    assert capsys.readouterr().out.count("recomputed Block") == 2
    assert_same_weights(resumed, uninterrupted, exact=False)
    for k in (0, 1):  # the hard tokens the stage chose, stored beside the token ids
        mask = TrainingData.load(run_dir / f"stage_{k}" / "hard_mask.safetensors")
        dumped = TrainingData.load(tmp_path / "float32" / f"stage_{k}" / "hard_tokens.safetensors")
        assert torch.equal(mask.active, dumped.active)
        assert len(mask) == json.loads((run_dir / f"stage_{k}" / "stats.json").read_text())["hard_count"]


@pytest.mark.parametrize("before, after", [("keep", "none"), ("none", "keep"), ("none", "delete")])
def test_a_resume_may_switch_the_dump_mode(tmp_path, capsys, before, after):
    reference = stage_run(tmp_path / "reference", blocks=3, dump_dtype="float32")
    run_dir = tmp_path / "switched"
    interrupted(run_dir, stage=2, blocks=3, dump=before, dump_dtype="float32")
    capsys.readouterr()
    resumed = stage_run(run_dir, blocks=3, dump=after, dump_dtype="float32")
    # a dump is read back, a mask is recomputed from along the chain (stage 0's and stage 1's)
    assert capsys.readouterr().out.count("recomputed Block") == (2 if before == "none" else 0)
    assert_same_weights(resumed, reference, exact=False)
    assert bool(list(run_dir.glob("stage_2/hard_*"))) is False  # the last block leaves nothing
    if after == "delete":
        assert not list(run_dir.glob("stage_*/hard_tokens*"))


def test_delete_keeps_the_dump_a_later_mask_is_recomputed_from(tmp_path):
    """keep -> none -> delete, each interrupted: stage 1 left only a mask, made from stage 0's dump, so
    `delete` must not remove that dump while a later resume may still need it."""
    reference = stage_run(tmp_path / "reference", blocks=3, dump_dtype="float32")
    run_dir = tmp_path / "switched"
    interrupted(run_dir, stage=1, blocks=3, dump="keep", dump_dtype="float32")
    interrupted(run_dir, stage=2, blocks=3, dump="none", dump_dtype="float32")
    assert (run_dir / "stage_1" / "hard_mask.safetensors").is_file()
    interrupted(run_dir, stage=2, blocks=3, dump="delete", dump_dtype="float32")
    assert (run_dir / "stage_0" / "hard_tokens.safetensors").is_file()
    resumed = stage_run(run_dir, blocks=3, dump="delete", dump_dtype="float32")
    assert_same_weights(resumed, reference, exact=False)
    assert not list(run_dir.glob("stage_*/hard_*"))  # all complete: nothing is needed any more, nothing kept


def test_a_resume_whose_inputs_are_gone_names_the_earliest_folder_to_delete_before_any_work(tmp_path):
    """After a full `delete` run only the last stage's folder is removed: stage 1's inputs were deleted with
    stage 0's, so both must be retrained, and the error says so at once (not one stage per attempt)."""
    run_dir = tmp_path / "run"
    stage_run(run_dir, blocks=3, dump="delete")
    shutil.rmtree(run_dir / "stage_2")
    tracker = FakeTracker()
    with pytest.raises(ValueError, match="stage_1 holds neither hard_tokens nor hard_mask.*delete stage_0 and"):
        stage_run(run_dir, blocks=3, tracker=tracker)
    assert not (run_dir / "stage_2").exists() and tracker.steps == {}  # refused before any work


def test_a_resume_missing_the_inputs_it_needs_says_which_folders_to_delete(tmp_path):
    run_dir = tmp_path / "run"
    interrupted(run_dir, stage=2, blocks=3)
    (run_dir / "stage_1" / "hard_tokens.safetensors").unlink()
    with pytest.raises(ValueError, match="stage_1 holds neither hard_tokens nor hard_mask.*delete stage_1 and"):
        stage_run(run_dir, blocks=3)


def test_none_refuses_inputs_larger_than_the_memory_budget(tmp_path):
    with pytest.raises(ValueError, match="trainer.dump=none holds the next stage's inputs in memory"):
        stage_run(tmp_path, dump="none", memory_budget_mb=0.01)
    assert not tmp_path.joinpath("stage_0").exists()  # refused before any work


def test_later_stages_say_their_metrics_are_on_hard_tokens_only(tmp_path, capsys):
    tracker = FakeTracker()
    stage_run(tmp_path, tracker=tracker)
    lines = [line for line in capsys.readouterr().out.splitlines() if "best val PPL" in line]
    assert "(all validation tokens)" in lines[0]
    share = json.loads((tmp_path / "stage_1" / "stats.json").read_text())["val_token_share"]
    assert 0.3 < share < 0.7
    assert f"(only the {share:.1%} of validation tokens Block 0 passes on, its hard ones)" in lines[1]
    assert {"val_ppl", "lm_loss"} <= tracker.steps[0] and "best_val_ppl" in tracker.ends[0]
    assert {"val_ppl_hard_tokens", "lm_loss_hard_tokens", "train_ppl_hard_tokens"} <= tracker.steps[1]
    assert not {"val_ppl", "lm_loss"} & tracker.steps[1]
    assert "best_val_ppl_hard_tokens" in tracker.ends[1] and tracker.ends[1]["val_token_share"] == share


@pytest.mark.parametrize(
    "override, message",
    [("trainer.dump=discard", "trainer.dump='discard' is unknown"), ("trainer.dump_dtype=fp8", "trainer.dump_dtype")],
)
def test_bad_dump_options_are_one_line_errors(tmp_path, cache_dir, override, message):
    proc = run_train("+experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}", override, cache_dir=cache_dir)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
