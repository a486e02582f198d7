import pytest
import torch

from tests.universal.universal_helpers import VOCAB


@pytest.fixture
def windows() -> torch.Tensor:
    """(8, 13) random token windows: 8 sequences of 12 inputs and targets."""
    return torch.randint(0, VOCAB, (8, 13), generator=torch.Generator().manual_seed(1))
