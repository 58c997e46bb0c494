"""Device meshes and shardings: data parallel on a `data` axis, queries on a `seq` axis.

Params are replicated, the batch is sharded over `data`. For long sequences, tensor attention
can shard its queries over `seq` with `jax.shard_map` while every device sees all keys and
values (they are gathered); each query row's softmax is local, so no cross-device reduction.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ShardedQueries:
    """An attend function (`tensorattn.tensor_attention`'s signature) that runs `attend` with
    the queries' time axis sharded over the mesh axis `seq_axis` (`jax.shard_map`); see
    `shard_queries`. Frozen and compared by value, so equal ones share jit compilations."""

    attend: Callable
    seq_axis: str = SEQ_AXIS

    def __call__(
        self,
        q,
        k1,
        k2,
        v1,
        v2,
        *,
        causal=False,
        window=None,
        k1_mask=None,
        k2_mask=None,
        scale=None,
    ):
        seq_axis = self.seq_axis
        if causal or window is not None:
            raise ValueError(
                "sequence sharding supports only non-causal attention (causal and window masks "
                "need each query's global position)"
            )
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
        # Optional operands (masks, an array scale) enter shard_map only when given.
        masks = (k1_mask, k2_mask)
        array_scale = scale is not None and not isinstance(scale, int | float)
        extra = [m for m in masks if m is not None] + ([scale] if array_scale else [])
        present = tuple(m is not None for m in masks)

        def local(q, k1, k2, v1, v2, *given):
            it = iter(given)
            m1, m2 = (next(it) if p else None for p in present)
            s = next(it) if array_scale else scale
            return self.attend(q, k1, k2, v1, v2, k1_mask=m1, k2_mask=m2, scale=s)

        kv_spec = P(batch)
        in_specs = (P(batch, seq_axis),) + (kv_spec,) * 4 + (kv_spec,) * sum(present)
        in_specs += (P(),) * array_scale  # a per-head scale is replicated
        # check_vma=False: the kernels' scans and Pallas calls start their carries from
        # constants, which shard_map's varying-axes check would refuse (the query tile is
        # varying over `seq`); the output's spec is stated, not inferred.
        fn = jax.shard_map(local, in_specs=in_specs, out_specs=P(batch, seq_axis), check_vma=False)
        return fn(q, k1, k2, v1, v2, *extra)


def shard_queries(attend: Callable, seq_axis: str = SEQ_AXIS) -> ShardedQueries:
    """Wraps an attend function (`tensorattn.tensor_attention`'s signature, e.g.
    `tensorattn.layers.Kernel(...)`) to shard the queries' time axis over `seq_axis`.

    Uses the mesh set by `jax.set_mesh`; the batch axis follows `data` when the mesh has it.
    Keys, values, masks and a per-head scale are gathered (replicated along `seq_axis`); each
    query row's softmax is local. Causal and window masks raise ValueError (they need global
    query positions).
    """
    return ShardedQueries(attend, seq_axis)
