"""The model-level checks of the GPU path (experiments/gpu_check.py) on every device there is: on the CPU in float32
at float32 tolerance, on CUDA under bfloat16 autocast at bfloat16 tolerance (marked `cuda`: skipped without one).
`scripts/gpu_check.sh` runs the same functions on a GPU machine without pytest."""

import warnings

import pytest

from experiments import gpu_check


@pytest.fixture(autouse=True)
def _quiet_flex_attention():
    """FlexAttention on the CPU runs its unfused reference and warns so on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("check", gpu_check.CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_model_check(check, device):
    check(device)
