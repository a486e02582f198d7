"""An interrupted stage resumes from its last checkpoint and ends exactly where an uninterrupted one does."""

import pytest
import torch

from lego import FitConfig, LEGOConfig, LEGOTransformer, TrainingData


class Interrupt(Exception):
    pass


def setup(sequences: int = 40):
    """A fresh two-block model with `sequences` training windows and 8 validation ones, the same every call."""
    torch.manual_seed(0)
    model = LEGOTransformer.from_config(LEGOConfig(vocab_size=30, dim=16, num_heads=2, layers_per_block=[1, 1]))
    gen = torch.Generator().manual_seed(0)
    train = TrainingData.from_windows(torch.randint(0, 30, (sequences, 9), generator=gen))
    val = TrainingData.from_windows(torch.randint(0, 30, (8, 9), generator=gen))
    return model, train, val


def test_interrupted_fit_resumes_to_the_same_weights(tmp_path):
    config = dict(epochs=3, batch_size=8, warmup_steps=1, evals_per_epoch=2, patience=10)
    model, train, val = setup()
    model.blocks[0].fit(train, val, FitConfig(**config), embedding=model.embedding)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = tmp_path / "stage.pt"
    model, train, val = setup()

    def kill_after_step_8(event):
        if event["kind"] == "step" and event["step"] == 8:
            raise Interrupt

    with pytest.raises(Interrupt):
        model.blocks[0].fit(
            train,
            val,
            FitConfig(**config, checkpoint_path=str(ckpt)),
            embedding=model.embedding,
            callback=kill_after_step_8,
        )
    assert ckpt.is_file()
    saved = torch.load(ckpt, weights_only=True)
    assert 0 < saved["state"]["step"] < 8
    model, train, val = setup()
    steps = []
    model.blocks[0].fit(
        train,
        val,
        FitConfig(**config, checkpoint_path=str(ckpt)),
        embedding=model.embedding,
        callback=lambda e: steps.append(e["step"]) if e["kind"] == "step" else None,
    )
    assert steps[0] == saved["state"]["step"] + 1  # continued, did not restart
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
