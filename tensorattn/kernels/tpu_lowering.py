"""Lowering and compiling for a TPU on a host without one: the tests lower the Pallas kernels
with `lowering_platforms=("tpu",)`, and `experiments.tpu_compile` compiles them for a TPU
topology with libtpu (`jax.experimental.topologies`)."""

import contextlib
from unittest import mock

import jax

# A TPU v5e core (the device kind JAX reports for it): Mosaic's lowering asks for the chip.
V5E = "TPU v5 lite"


@contextlib.contextmanager
def tpu_target(device_kind: str = V5E, num_cores: int = 1):
    """Traces as for a TPU of `device_kind`: an abstract device names the chip (Mosaic's
    lowering and `pallas._tpu_vmem_limit` ask for it), and `jax.default_backend()` answers
    "tpu" so that the kernels take their TPU tiles and checks."""
    sharding = jax.sharding
    device = sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="tpu")
    mesh = sharding.AbstractMesh(
        (1,), ("x",), (sharding.AxisType.Explicit,), abstract_device=device
    )
    with sharding.use_abstract_mesh(mesh), mock.patch.object(jax, "default_backend", lambda: "tpu"):
        yield
