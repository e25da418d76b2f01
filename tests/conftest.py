"""Shared test setup: the repository root on sys.path; fixtures for the tiny CPU run of tests/test_train.py
(`tiny_config`) and for a policy that differs from pi_ref (`perturb`)."""
import os
import sys
from dataclasses import replace

import pytest
import torch

# Tests import the top-level files (model.py, cpo.py, ...) directly, as users do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from test_train import TINY  # noqa: E402


@pytest.fixture
def tiny_config():
    """-> tiny_config(**overrides): the train.Config of test_train.TINY's run, with `overrides` replaced."""
    def make(**overrides):
        _, flags = train.parse_args(TINY)
        return replace(train.Config(**flags), **overrides)
    return make


@pytest.fixture
def perturb():
    """-> perturb(model, seed=0, scale=0.02): adds scale * N(0, 1) noise to every weight, in place, drawn
    from a generator seeded with `seed` (torch's global stream is left alone)."""
    def add_noise(model, seed=0, scale=0.02):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return add_noise
