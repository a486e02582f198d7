"""FSDP2 (`FitConfig.fsdp`) with 2 gloo ranks: the layers really are sharded while a stage trains, the
stage computes what the replicated (DDP-style) stage computes, and an interrupted sharded stage resumes
from its full-tensor checkpoint, on 2 ranks or on 1."""

import pytest
import torch

from lego import FitConfig, TrainingData
from lego.model import LEGOConfig, LEGOTransformer
from lego.training.routing import route

from .conftest import spawn_ranks

SEQUENCES, VAL_SEQUENCES, SEQ_LEN = 25, 7, 12  # 25: shards of 13 and 12 sequences


class Interrupt(Exception):
    pass


def model_and_data() -> tuple[LEGOTransformer, TrainingData, TrainingData]:
    torch.manual_seed(0)
    config = LEGOConfig(vocab_size=40, dim=16, num_heads=2, layers_per_block=[2, 2], max_seq_len=SEQ_LEN)
    windows = torch.randint(0, 40, (SEQUENCES + VAL_SEQUENCES, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    data = TrainingData.from_windows(windows)
    return (
        LEGOTransformer.from_config(config),
        data.select(torch.arange(SEQUENCES)),
        data.select(torch.arange(SEQUENCES, SEQUENCES + VAL_SEQUENCES)),
    )


def fit_config(fsdp: bool, **overrides) -> FitConfig:
    return FitConfig(
        **{
            "epochs": 2,
            "batch_size": 8,
            "eval_batch_size": 4,
            "warmup_steps": 1,
            "patience": 9,
            "fsdp": fsdp,
            "hard_ratio": 0.4,
            "log_every_steps": 1,  # every step's grad_norm
            **overrides,
        }  # fmt: skip
    )


def _train_two_stages(rank: int, world: int, out: str, fsdp: bool, checkpoint: str = "", stop_at: int = 0) -> None:
    """Block 0 on everything, Block 1 on the hard tokens; saves weights, thresholds and hard masks."""
    model, train, val = model_and_data()
    train, val = train.shard(rank, world), val.shard(rank, world)
    seen: list[tuple[str, int, int]] = []  # per step: type of a layer weight, its local rows, the step
    grad_norms: list[float] = []

    def watch(event: dict) -> None:
        if event["kind"] == "step":
            weight = model.blocks[training[0]].layers[0].attn.wqkv.weight  # the block being trained
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            seen.append((type(weight).__name__, local.shape[0], event["step"]))
            grad_norms.append(event["grad_norm"])
            if event["step"] == stop_at:
                raise Interrupt

    hard_masks, training = [], [0]
    try:
        for k, block in enumerate(model.blocks):
            training[0] = k
            config = fit_config(fsdp, checkpoint_path=f"{checkpoint}{k}.pt" if checkpoint else None)
            if k == len(model.blocks) - 1:
                config.hard_ratio = None
            embedding = model.embedding if k == 0 else None
            hard, _ = block.fit(train, val, config, embedding=embedding, callback=watch)
            if hard is not None:
                hard_masks.append(hard.active)
                train, val = hard, route(block, val, embedding, 4)
    except Interrupt:
        return
    state = {key: value for key, value in model.state_dict().items()}
    torch.save({"state": state, "hard": hard_masks, "seen": seen, "grad_norms": grad_norms}, f"{out}/rank{rank}.pt")


def _run(tmp_path, name: str, world: int, fsdp: bool, **kwargs) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    if world == 1:
        _train_two_stages(0, 1, str(out), fsdp, **kwargs)
    else:
        spawn_ranks(_train_two_stages, world, str(out), fsdp, *kwargs.values())
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert not hasattr(a[key], "to_local") and not hasattr(b[key], "to_local"), f"{key} is still sharded"
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("replicated"), "run", 2, fsdp=False)


def test_sharded_stage_trains_like_the_replicated_one(tmp_path, replicated):
    sharded = _run(tmp_path, "fsdp", 2, fsdp=True)
    for saved in sharded:
        assert {kind for kind, _, _ in saved["seen"]} == {"DTensor"}  # sharded during every step...
        assert {rows for _, rows, _ in saved["seen"]} == {3 * 16 // 2}  # ...half of wqkv's 48 rows per rank
    assert {kind for kind, _, _ in replicated[0]["seen"]} == {"Parameter"}
    for rank in range(2):
        # the same gradients (Adam would hide a wrong scale in the weights, not in the norm)
        torch.testing.assert_close(sharded[rank]["grad_norms"], replicated[rank]["grad_norms"], rtol=1e-4, atol=0)
        assert_close_states(sharded[rank]["state"], replicated[rank]["state"])  # plain weights after the stage
        for got, want in zip(sharded[rank]["hard"], replicated[rank]["hard"], strict=True):
            assert torch.equal(got, want)
    assert_close_states(sharded[0]["state"], sharded[1]["state"])  # one model on both ranks


@pytest.mark.parametrize("resume_world", [2, 1])
def test_interrupted_sharded_stage_resumes_on_any_number_of_ranks(tmp_path, replicated, resume_world):
    checkpoint = str(tmp_path / "checkpoint")
    # stop in Block 0's second epoch, after its first-epoch checkpoint (3 steps per epoch)
    assert _run_interrupted(tmp_path, checkpoint, stop_at=5) == []
    resumed = _run(tmp_path, "resumed", resume_world, fsdp=resume_world > 1, checkpoint=checkpoint)
    saved = torch.load(f"{checkpoint}0.pt", weights_only=True)
    assert not any(hasattr(v, "to_local") for v in saved["weights"][0].values())  # full tensors on disk
    kind, _, first_step = resumed[0]["seen"][0]
    assert first_step == 4  # Block 0 went on after its 3 checkpointed steps, it did not start over
    assert kind == ("DTensor" if resume_world == 2 else "Parameter")
    if resume_world == 2:  # the same ranks and batches: what the uninterrupted run computed
        assert_close_states(resumed[0]["state"], replicated[0]["state"])


def _run_interrupted(tmp_path, checkpoint: str, stop_at: int) -> list:
    out = tmp_path / "interrupted"
    out.mkdir()
    spawn_ranks(_train_two_stages, 2, str(out), True, checkpoint, stop_at)
    return list(out.glob("rank*.pt"))
