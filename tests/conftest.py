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
        "markers",
        "gpu(hopper=False): compiled GPU kernels; skipped without an NVIDIA GPU (with "
        "hopper=True, without a Hopper one); `-m gpu` runs only these",
    )
    config.addinivalue_line(
        "markers", "multi_device: several simulated CPU devices in a subprocess, on any machine"
    )


def _skip_reason(marker) -> str | None:
    if jax.default_backend() != "gpu":
        return "compiled GPU kernels need an NVIDIA GPU"
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    if marker.kwargs.get("hopper") and cc != "9.0":
        return f"compiled Mosaic GPU kernels need a Hopper GPU (sm_90), not compute capability {cc}"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker and (reason := _skip_reason(marker)):
            item.add_marker(pytest.mark.skip(reason=reason))
