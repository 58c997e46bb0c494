"""Lowering for a GPU or a TPU on a host without one: `jax.jit(f).trace(...).lower(
lowering_platforms=("cuda",))` (or `("tpu",)`) in the tests, `experiments.kernel_registers`
and `experiments.mosaic_registers`; `experiments.tpu_compile` compiles for a TPU topology with
libtpu (`jax.experimental.topologies`)."""

import contextlib
from unittest import mock

import jax

# A TPU v5e core (the device kind JAX reports for it): Mosaic's lowering asks for the chip.
V5E = "TPU v5 lite"


def _abstract_device(platform: str, device_kind: str, num_cores: int):
    """Context naming an abstract device of `platform` as the target."""
    sharding = jax.sharding
    device = sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform=platform
    )
    mesh = sharding.AbstractMesh(
        (1,), ("x",), (sharding.AxisType.Explicit,), abstract_device=device
    )
    return sharding.use_abstract_mesh(mesh)


def abstract_gpu():
    """Context naming an abstract H100 as the target: from jax 0.11 the Pallas Triton lowering
    asks for the GPU's compute capability, which a CPU-only host cannot give. A no-op on a
    GPU host and on jax versions without abstract devices."""
    if jax.default_backend() == "gpu" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    return _abstract_device("gpu", "NVIDIA H100 80GB HBM3", 132)


@contextlib.contextmanager
def gpu_target():
    """`abstract_gpu()`, and `jax.default_backend()` answering "gpu" so that the kernels pick
    their GPU launch settings (and skip the device check) while tracing."""
    with abstract_gpu(), mock.patch.object(jax, "default_backend", lambda: "gpu"):
        yield


@contextlib.contextmanager
def tpu_target(device_kind: str = V5E, num_cores: int = 1):
    """Traces as for a TPU of `device_kind`: an abstract device names the chip (Mosaic's
    lowering and `pallas._tpu_vmem_limit` ask for it), and `jax.default_backend()` answers
    "tpu" so that the kernels take their TPU tiles and checks."""
    with (
        _abstract_device("tpu", device_kind, num_cores),
        mock.patch.object(jax, "default_backend", lambda: "tpu"),
    ):
        yield
