"""The joint loss: the weighted sum of per-layer LM losses, and the distillation terms."""

import copy

import pytest
import torch
import torch.nn.functional as F

from experiments.universal_trainer import UniversalConfig, distillation_loss
from tests.universal.universal_helpers import make_trainer


def hand_layer_losses(model, x, y) -> list[torch.Tensor]:
    """Each layer's CE through its own norm and the shared head, computed with the block's plain forward."""
    h, losses = model.embedding(x), []
    for block in model.blocks:
        h, logits, _ = block(h)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    return losses


def test_weighted_loss_is_the_hand_computed_sum(windows):
    weights = {1: 0.2, 2: 0.3, 3: 0.5}
    trainer, model = make_trainer(UniversalConfig(weights))
    x, y = windows[:, :-1], windows[:, 1:]
    parts = trainer.compute_loss(model, x, y, trainer.layer_weights(0, 1, 3))
    hand = hand_layer_losses(model, x, y)
    expected = sum(w * hand[i - 1] for i, w in weights.items())
    assert float(parts.total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(parts.task) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert sorted(parts.layer_losses) == [1, 2, 3]


def test_normalized_weights_and_zero_weight_layers(windows):
    trainer, model = make_trainer(UniversalConfig({1: 2.0, 3: 6.0}, normalize_weights=True))
    x, y = windows[:, :-1], windows[:, 1:]
    parts = trainer.compute_loss(model, x, y, trainer.layer_weights(0, 1, 3))
    hand = hand_layer_losses(model, x, y)
    assert float(parts.total.detach()) == pytest.approx(float((0.25 * hand[0] + 0.75 * hand[2]).detach()), rel=1e-5)
    assert sorted(parts.layer_losses) == [1, 3]  # layer 2 weighs 0: no head work for it


def test_learned_confidence_adds_the_exit_classifier_bce(windows):
    trainer, model = make_trainer(UniversalConfig.preset("standard", confidence_method="learned"))
    x, y = windows[:, :-1], windows[:, 1:]
    parts = trainer.compute_loss(model, x, y, trainer.layer_weights(0, 1, 3))
    assert float(parts.exit) > 0
    assert float(parts.total.detach()) == pytest.approx(float(parts.task + parts.exit), rel=1e-5)
    parts.total.backward()
    assert model.blocks[0].exit_classifier.weight.grad is not None


def test_distillation_loss_is_zero_against_itself(windows):
    logits = torch.randn(24, 40)
    assert float(distillation_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, logits, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(24, 40))) > 0


def test_teacher_equal_to_the_student_leaves_only_the_task_share(windows):
    _, student = make_trainer(UniversalConfig.preset("standard"))
    config = UniversalConfig.preset("standard", teacher=copy.deepcopy(student), distillation_alpha=0.3)
    trainer, _ = make_trainer(config)
    trainer.prepare(student)
    x, y = windows[:, :-1], windows[:, 1:]
    parts = trainer.compute_loss(student, x, y, trainer.layer_weights(0, 1, 3))
    assert float(parts.distill) == pytest.approx(0.0, abs=1e-5)
    assert float(parts.total.detach()) == pytest.approx(0.3 * float(parts.task), rel=1e-5)


def test_self_distillation_pulls_the_exit_layer_towards_the_final_one(windows):
    trainer, model = make_trainer(UniversalConfig.preset("standard", self_distillation=0.5))
    x, y = windows[:, :-1], windows[:, 1:]
    parts = trainer.compute_loss(model, x, y, trainer.layer_weights(0, 1, 3))
    assert float(parts.self_distill) > 0
    assert float(parts.total.detach()) == pytest.approx(float(parts.task + 0.5 * parts.self_distill), rel=1e-5)


def test_a_teacher_file_that_is_missing_or_of_another_model_is_one_line(tmp_path):
    from safetensors.torch import save_model

    from lego.errors import DataError

    trainer, model = make_trainer(UniversalConfig.preset("standard"))
    other = trainer.create_model(dim=8, num_heads=2, num_layers=3, max_seq_len=16)  # another width
    trainer.config.teacher = str(tmp_path / "none.safetensors")
    with pytest.raises(DataError, match=r"universal.teacher=.*none.safetensors does not exist"):
        trainer.prepare(model)
    save_model(other, str(tmp_path / "other.safetensors"))
    trainer.config.teacher = str(tmp_path / "other.safetensors")
    with pytest.raises(DataError, match=r"cannot be loaded into this model \(.*\); give a model.safetensors") as err:
        trainer.prepare(model)
    assert "\n" not in str(err.value)


def test_distillation_in_chunks_equals_the_one_shot_kl(monkeypatch):
    """Distillation reads the logits a chunk of rows at a time (never all rows' float32 log-probs): the same loss
    and gradient as the one-shot KL."""
    import lego.methods.universal as universal

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(10, 7, generator=gen, requires_grad=True)
    teacher = torch.randn(10, 7, generator=gen)
    t = 2.0
    one_shot = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="batchmean") * t * t  # fmt: skip
    (expected,) = torch.autograd.grad(one_shot, student)
    monkeypatch.setattr(universal, "LOGIT_CHUNK_ROWS", 3)  # 4 chunks
    chunked = distillation_loss(student, teacher, t)
    (grad,) = torch.autograd.grad(chunked, student)
    assert torch.allclose(chunked, one_shot, atol=1e-6) and torch.allclose(grad, expected, atol=1e-6)
