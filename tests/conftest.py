"""Test setup: float32 matmuls at full precision so comparisons are meaningful on any backend;
tests marked `gpu` (compiled GPU kernels) run on an NVIDIA GPU and skip elsewhere."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: compiled GPU kernels; skipped without a GPU (`-m gpu` runs only these)"
    )


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="compiled GPU kernels need an NVIDIA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
