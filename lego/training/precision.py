"""The precision forward passes run in (`trainer.precision`, `FitConfig.precision`): auto | float32 | bf16.

`bf16` is autocast to bfloat16: matrix multiplies and attention in bf16, weights, optimizer state, norms' statistics
and losses in float32 (autocast keeps reductions and the cross-entropy in float32; `lego.training.propagation`
upcasts the logits chunk by chunk). `auto` is bf16 on a CUDA device that has it and float32 everywhere else, so
the CPU's numbers stay the float32 ones. Every forward takes it: training steps, validation, calibration, routing,
hard-token collection and the final evaluation.

Depends on torch only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from lego.errors import ConfigError

PRECISIONS = ("auto", "float32", "bf16")
DEFAULT_PRECISION = "auto"


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 autocast natively: the CPU does (slowly, but exactly as autocast defines it),
    a CUDA device from Ampere on (`torch.cuda.is_bf16_supported`, emulation not counted)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def autocast_dtype(device: torch.device | str, precision: str = DEFAULT_PRECISION) -> torch.dtype | None:
    """The dtype forwards autocast to on `device` (None: plain float32). A one-line ConfigError for an unknown
    precision, or bf16 asked of a device without it."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is unknown; use one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else None
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(
            f"trainer.precision=bf16, but {device} ({_name(device)}) has no bfloat16 support; use "
            "trainer.precision=auto or float32"
        )
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device | str, precision: str = DEFAULT_PRECISION) -> AbstractContextManager:
    """The context a forward runs in: bf16 autocast on `device`, or nothing (float32)."""
    dtype = autocast_dtype(device, precision)
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def enable_tf32(device: torch.device) -> None:
    """float32 matrix multiplies on TF32 tensor cores on CUDA (what is left in float32 under bf16, and all of a
    float32 run); once, at the start of a run. Nothing on the CPU, whose numbers stay exact float32."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def _name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
