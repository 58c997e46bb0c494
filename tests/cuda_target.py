"""Lowering for CUDA on a host without a GPU (the tests' `lower(lowering_platforms=("cuda",))`)."""

import contextlib

import jax


def abstract_gpu():
    """Context naming an abstract H100 as the target: from jax 0.11 the Pallas Triton lowering
    asks for the GPU's compute capability, which a CPU-only host cannot give. A no-op on a
    GPU host and on jax versions without abstract devices."""
    sharding = jax.sharding
    if jax.default_backend() == "gpu" or not hasattr(sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
    )
    mesh = sharding.AbstractMesh(
        (1,), ("x",), (sharding.AxisType.Explicit,), abstract_device=device
    )
    return sharding.use_abstract_mesh(mesh)
