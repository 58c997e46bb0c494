"""Lowering for CUDA on a host without a GPU: `jax.jit(f).trace(...).lower(lowering_platforms=
("cuda",))` in the tests and in `experiments.kernel_registers`."""

import contextlib
from unittest import mock

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


@contextlib.contextmanager
def gpu_target():
    """`abstract_gpu()`, and `jax.default_backend()` answering "gpu" so that the kernels pick
    their GPU launch settings (and skip the device check) while tracing."""
    with abstract_gpu(), mock.patch.object(jax, "default_backend", lambda: "gpu"):
        yield
