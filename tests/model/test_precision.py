"""The forwards' precision (`lego.training.precision`): auto is float32 on the CPU and bf16 on a CUDA device with
it, every forward of a stage and of Universal runs in the one chosen, the cross-entropy never upcasts more than a
chunk of the logits (and gives the one-shot numbers), and FSDP's mixed-precision policy follows the precision."""

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from lego import FitConfig, LEGOConfig, LEGOTransformer, TrainingData
from lego import model as model_module
from lego.errors import ConfigError
from lego.methods.universal import UniversalConfig, UniversalTrainer
from lego.model import cross_entropy_rows, logit_confidence
from lego.sharding import mixed_precision
from lego.training.precision import autocast_dtype
from lego.training.routing import evaluate_routed, route

VOCAB, SEQ = 40, 12
FAST = {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 8, "max_steps": 2}


def fake_cuda(monkeypatch, bf16: bool) -> None:
    """A CUDA device, with or without native bf16, as far as `lego.training.precision` can tell."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100" if not bf16 else "NVIDIA H100")


def test_auto_is_float32_on_the_cpu_and_bf16_on_cuda_where_the_device_has_it(monkeypatch):
    assert [autocast_dtype("cpu", p) for p in ("auto", "float32", "bf16")] == [None, None, torch.bfloat16]
    fake_cuda(monkeypatch, bf16=True)
    assert [autocast_dtype("cuda", p) for p in ("auto", "float32", "bf16")] == [torch.bfloat16, None, torch.bfloat16]
    fake_cuda(monkeypatch, bf16=False)
    assert autocast_dtype("cuda", "auto") is None  # a V100: float32, not an error
    with pytest.raises(ConfigError) as caught:
        autocast_dtype("cuda", "bf16")
    message = str(caught.value)
    assert "\n" not in message and "trainer.precision=bf16" in message and "Tesla V100" in message
    with pytest.raises(ConfigError, match="trainer.precision='fp16' is unknown; use one of: auto, float32, bf16"):
        autocast_dtype("cpu", "fp16")


def linear_output_dtypes(model: nn.Module) -> list[torch.dtype]:
    """The dtype of every nn.Linear output from now on (what autocast decides)."""
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda _, __, out: seen.append(out.dtype))
    return seen


def token_data(n: int, seed: int) -> TrainingData:
    windows = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return TrainingData.from_windows(windows)


@pytest.mark.parametrize("precision,dtype", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_every_forward_of_a_stage_runs_in_its_precision(precision, dtype):
    """Training steps, validation, calibration and hard-token collection (`fit`), routing, the routed evaluation."""
    torch.manual_seed(0)
    config = LEGOConfig(VOCAB, dim=16, num_heads=2, layers_per_block=[1, 1], max_seq_len=SEQ)
    model = LEGOTransformer.from_config(config)
    seen = linear_output_dtypes(model)
    train, val = token_data(24, 0), token_data(8, 1)
    hard, stats = model.blocks[0].fit(train, val, FitConfig(**FAST, precision=precision), embedding=model.embedding)
    assert len(seen) > 20 and set(seen) == {dtype}
    assert hard.hidden_states.dtype == torch.float32 and stats.evals  # the residual stream stays float32
    seen.clear()
    routed = route(model.blocks[0], val, model.embedding, 8, precision=precision)
    evaluate_routed(model, torch.randint(0, VOCAB, (8, SEQ + 1)), 4, "cpu", precision)
    assert seen and set(seen) == {dtype} and routed.hidden_states.dtype == torch.float32


@pytest.mark.parametrize("precision,dtype", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_universal_runs_every_forward_in_its_precision(precision, dtype):
    trainer = UniversalTrainer(UniversalConfig.preset("lpt"), VOCAB, precision=precision)
    torch.manual_seed(0)
    model = trainer.create_model(dim=16, num_heads=2, num_layers=3, max_seq_len=SEQ)
    seen = linear_output_dtypes(model)
    windows = torch.randint(0, VOCAB, (16, SEQ + 1), generator=torch.Generator().manual_seed(0))
    trainer.train_epoch(model, windows, trainer.create_optimizer(model), batch_size=8, max_steps=2)
    trainer.layer_metrics(model, windows[:8], batch_size=8)
    trainer.evaluate(model, windows[:8], batch_size=8)
    assert len(seen) > 20 and set(seen) == {dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_gives_the_one_shot_losses_and_gradients(dtype):
    """Row by row the same loss and the same gradient as one F.cross_entropy over every row, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 17, generator=generator).to(dtype)
    targets = torch.randint(0, 17, (50,), generator=generator)
    weights = torch.rand(50, generator=generator)
    results = []
    for chunk in (7, 50):  # 8 chunks, then all rows at once
        leaf = logits.clone().requires_grad_()
        ce = cross_entropy_rows(leaf, targets, chunk=chunk)
        (ce * weights).sum().backward()
        results.append((ce.detach(), leaf.grad))
    (chunked, chunked_grad), (whole, whole_grad) = results
    assert chunked.dtype == torch.float32 and torch.equal(chunked, whole) and torch.equal(chunked_grad, whole_grad)
    with torch.no_grad():
        assert torch.equal(cross_entropy_rows(logits, targets, chunk=7), whole)


def test_cross_entropy_never_upcasts_more_than_a_chunk(monkeypatch):
    """Every float32 upcast is of at most `chunk` rows, and in training each chunk is recomputed in the backward
    (so autograd holds no float32 log-probabilities of all rows)."""
    rows_upcast = []
    plain = model_module._cross_entropy
    monkeypatch.setattr(model_module, "_cross_entropy", lambda x, t: rows_upcast.append(len(x)) or plain(x, t))
    logits = torch.randn(30, 11, dtype=torch.bfloat16, requires_grad=True)
    ce = cross_entropy_rows(logits, torch.randint(0, 11, (30,)), chunk=8)
    assert rows_upcast == [8, 8, 8, 6]
    ce.sum().backward()
    assert sorted(rows_upcast[4:]) == [6, 8, 8, 8] and logits.grad.dtype == torch.bfloat16  # (in reverse order)


@pytest.mark.parametrize("method", ["max_softmax", "entropy"])
def test_confidence_read_off_the_logits_is_the_same_chunked(method, monkeypatch):
    logits = torch.randn(30, 11, generator=torch.Generator().manual_seed(0))
    whole = logit_confidence(logits, method)
    monkeypatch.setattr(model_module, "LOGIT_CHUNK_ROWS", 7)
    assert torch.equal(logit_confidence(logits, method), whole)


def test_fsdp_mixed_precision_follows_the_precision(monkeypatch):
    """bf16: weights gathered and used in bf16, gradients reduced and outputs handed back in float32; float32:
    FSDP casts nothing; auto on a CUDA device with bf16 is bf16."""
    assert mixed_precision(None) == MixedPrecisionPolicy()
    bf16 = mixed_precision(autocast_dtype("cpu", "bf16"))
    assert (bf16.param_dtype, bf16.reduce_dtype, bf16.output_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    fake_cuda(monkeypatch, bf16=True)
    assert mixed_precision(autocast_dtype("cuda", "auto")) == bf16
