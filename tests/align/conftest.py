import torch
import pytest


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
