"""Shared fixtures: tiny random Llama checkpoints written by transformers, and GPU / slow markers."""

from __future__ import annotations

import jax
import pytest

from helpers import make_hf_llama

def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (jax.default_backend() != 'gpu')")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def hf_llama(tmp_path):
    """Factory: hf_llama(**config_overrides) -> (directory, torch model)."""

    def make(seed: int = 0, **overrides):
        directory = tmp_path / f"llama_{seed}_{len(list(tmp_path.iterdir()))}"
        model = make_hf_llama(directory, seed=seed, **overrides)
        return str(directory), model

    return make


@pytest.fixture
def full_float32_matmuls():
    """No TF32 on a GPU: float32 products (references included) at full precision, as on CPU."""
    with jax.default_matmul_precision("highest"):
        yield
