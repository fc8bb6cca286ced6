"""Shared fixtures for the zoo tests (models in `zoo.py`, invariant checks in `helpers.py`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, so random inputs and weights repeat."""
    torch.manual_seed(0)
    yield
