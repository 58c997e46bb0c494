"""Device meshes and shardings: data parallel on a `data` axis, queries on a `seq` axis.

Params are replicated, the batch is sharded over `data`. For long sequences, tensor attention
can shard its queries over `seq` with `jax.shard_map` while every device sees all keys and
values (they are gathered); each query row's softmax is local, so no cross-device reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
SEQ_AXIS = "seq"


def make_mesh(sequence_shards: int = 1, devices=None) -> Mesh:
    """A `(data, seq)` mesh over all (or the given) devices; `seq` has `sequence_shards`."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) % sequence_shards:
        raise ValueError(
            f"sequence_shards={sequence_shards} does not divide the {len(devices)} devices"
        )
    grid = np.asarray(devices).reshape(len(devices) // sequence_shards, sequence_shards)
    return Mesh(grid, (DATA_AXIS, SEQ_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over `data`, everything else replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def shard_queries(attend: Callable, seq_axis: str = SEQ_AXIS) -> Callable:
    """Wraps `attend(q, k1, k2, v1, v2, k1_mask, k2_mask)` to shard `q`'s time axis.

    Uses the mesh set by `jax.set_mesh`; the batch axis follows `data` when the mesh has it.
    Keys, values and masks are gathered (replicated along `seq_axis`).
    """

    def wrapped(q, k1, k2, v1, v2, k1_mask, k2_mask):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or seq_axis not in mesh.axis_names:
            raise ValueError(
                f"sequence parallelism needs a mesh with axis {seq_axis!r} set by jax.set_mesh"
            )
        batch = DATA_AXIS if DATA_AXIS in mesh.axis_names else None
        if q.shape[1] % mesh.shape[seq_axis]:
            raise ValueError(
                f"query length {q.shape[1]} is not divisible by the {mesh.shape[seq_axis]} "
                f"devices of mesh axis {seq_axis!r}"
            )
        masks = (k1_mask, k2_mask)
        present = tuple(m is not None for m in masks)

        def local(q, k1, k2, v1, v2, *given):
            it = iter(given)
            m1, m2 = (next(it) if p else None for p in present)
            return attend(q, k1, k2, v1, v2, m1, m2)

        kv_spec = P(batch)
        in_specs = (P(batch, seq_axis), kv_spec, kv_spec, kv_spec, kv_spec) + tuple(
            kv_spec for p in present if p
        )
        fn = jax.shard_map(local, in_specs=in_specs, out_specs=P(batch, seq_axis))
        return fn(q, k1, k2, v1, v2, *(m for m in masks if m is not None))

    return wrapped
