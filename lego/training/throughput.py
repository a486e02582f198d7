"""Training throughput: tokens per second and model FLOPs utilisation (MFU), the model's FLOPs per second over
the device's dense bf16 peak. A stage's `stats.json` records both, W&B and the report show them.

MFU counts the FLOPs the model counts (`LEGOBlock.forward_flops`, 3x for forward + backward: no recomputation,
no optimizer), over the seconds of the training loop (its validations included), over the peak of every rank's
device. It is None where the peak is unknown: the CPU, or a device the table below does not list.

Depends on torch only.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched in order against the device's name (so "H100 NVL"
# before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
)  # fmt: skip


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the device called `device_name` (`torch.cuda.get_device_name`), None if unlisted."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def device_peak_flops(device: torch.device | str) -> float | None:
    """`device`'s dense bf16 peak in FLOP/s; None on the CPU and on an unlisted device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else peak * 1e12


def throughput(
    tokens: int, flops: float, seconds: float, device: torch.device | str, ranks: int = 1
) -> dict[str, float | None]:
    """`tokens_per_second` and `mfu` of a training run of `seconds` that trained `tokens` tokens (over all
    `ranks`) with `flops` model FLOPs; None where there is no time to divide by, or no known peak."""
    if seconds <= 0:
        return {"tokens_per_second": None, "mfu": None}
    peak = device_peak_flops(device)
    return {"tokens_per_second": tokens / seconds, "mfu": flops / seconds / (peak * ranks) if peak else None}


def pooled(stages: list[dict]) -> dict[str, float | None]:
    """A run's `tokens_per_second` and `mfu` from its stages' (each stage's own over its `train_seconds`): their
    means weighted by the seconds, i.e. all the stages' tokens (FLOPs) over all their seconds. Stages without
    them (trained by older code, or a Universal layer after the first, which shares the first's time) are left out."""
    timed = [stage for stage in stages if stage.get("train_seconds") and stage.get("tokens_per_second") is not None]
    seconds = sum(stage["train_seconds"] for stage in timed)
    if not seconds:
        return {"tokens_per_second": None, "mfu": None}
    rate = sum(stage["tokens_per_second"] * stage["train_seconds"] for stage in timed) / seconds
    with_mfu = [stage for stage in timed if stage.get("mfu") is not None]
    mfu = sum(s["mfu"] * s["train_seconds"] for s in with_mfu) / seconds if len(with_mfu) == len(timed) else None
    return {"tokens_per_second": rate, "mfu": mfu}
