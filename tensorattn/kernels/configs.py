"""Typed, frozen, validated options of each implementation (one class per kernel).

`tensor_attention(..., implementation=name, config=<config>)`; keyword options are a shorthand
that builds the same config (`config_for`). Every config is plain data: `to_dict()` and
`from_mapping()` round-trip it through a JSON file or an ml_collections config
(`--config.kernel.pallas.fwd_block_rows=64`). A field left at None is chosen by the library
for the call's shapes and device.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

POLYNOMIALS = ("taylor", "chebyshev")
GRADIENTS = ("closed_form", "autodiff")
ON_UNCERTIFIED = ("warn", "error", "ignore")
MAX_DEGREE = 40
FUSED_PRECISIONS = ("bf16x3", "highest", "bf16")
MOSAIC_BACKWARDS = ("pallas", "mosaic_gpu")


def _fail(cls, field: str, what: str, value) -> None:
    raise ValueError(f"{cls.__name__}.{field} must be {what}, got {value!r}")


def _positive_int(cfg, field: str, optional: bool = False, zero: bool = False) -> None:
    v = getattr(cfg, field)
    if v is None and optional:
        return
    low = 0 if zero else 1
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
        what = ("a non-negative int" if zero else "a positive int") + (" or None" * optional)
        _fail(type(cfg), field, what, v)


def _positive_float(cfg, field: str) -> None:
    v = getattr(cfg, field)
    if v is None:
        return
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0 < v < math.inf:
        _fail(type(cfg), field, "a positive finite number or None", v)


def _choice(cfg, field: str, choices: tuple) -> None:
    v = getattr(cfg, field)
    if v not in choices:
        _fail(type(cfg), field, f"one of {choices}", v)


def _tiles_and_interpret(cfg, flags: tuple[str, ...] = ("interpret",), others=()) -> None:
    """Checks a config whose fields are optional positive ints, but `flags` (bool/None) and
    `others` (checked by the caller)."""
    for f in dataclasses.fields(cfg):
        if f.name in others:
            continue
        if f.name in flags:
            value = getattr(cfg, f.name)
            if value is not None and not isinstance(value, (bool, np.bool_)):
                _fail(type(cfg), f.name, "a bool or None", value)
        else:
            _positive_int(cfg, f.name, optional=True)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Base class: `implementation` names the kernel that takes this config."""

    implementation: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None, prefix: str | None = None):
        """Builds the config from a mapping of its fields; ValueError names an unknown field
        (`prefix.field`, prefix defaulting to the implementation) and lists the known ones."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        for name in options:
            if name not in known:
                where = f"{prefix}.{name}" if prefix else repr(name)
                raise ValueError(
                    f"implementation={cls.implementation!r} takes no option {where}; its "
                    f"{cls.__name__} has {known or 'no options'}"
                )
        return cls(**options)


@dataclasses.dataclass(frozen=True)
class ReferenceConfig(KernelConfig):
    """The reference kernel (scores materialised, `[B,T,N,S1,S2]`) takes no options."""

    implementation: ClassVar[str] = "reference"


@dataclasses.dataclass(frozen=True)
class BlockedConfig(KernelConfig):
    """Tiles of the blocked XLA kernel; None: chosen by the library (64, 32, and 128, or 64
    under a causal mask), then clamped to the call's lengths and windows.

    block_q: query positions per tile (times the grouped query heads gives the rows).
    block_outer: positions per tile of each outer key set (order 3: k1; order 4: k1 and k2).
    block_inner: positions per tile of the inner (last) key set: the matmul's columns.
    """

    implementation: ClassVar[str] = "blocked"
    block_q: int | None = None
    block_outer: int | None = None
    block_inner: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _positive_int(self, f.name, optional=True)


@dataclasses.dataclass(frozen=True)
class PallasConfig(KernelConfig):
    """Tiles and launch settings of the Pallas kernels (order 3); None: chosen by the library
    for the call's shapes.

    fwd_block_rows: rows per forward tile, `G·block_q` (query heads of a group times positions).
    fwd_block_k2: second-key positions per forward tile (the columns of each score product).
    bwd_block_rows, bwd_block_k2: the same for the backward kernels.
    bwd_block_k1: first-key positions per program of the dK1/dV1 backward kernel.
    bwd_fuse_k1: compute dK1/dV1 inside the dQ kernel, as per-query-tile partial sums added
      afterwards (two backward kernels and 8 tile products per step instead of three and 11;
      needs a causal window on the first key set). None: fused when the partials are at most
      twice a tile's rows per query tile (docs/pallas.md, "Backward").
    num_warps, num_stages: GPU launch settings.
    interpret: run in Pallas interpret mode (any backend; slow, for tests). None: the
      environment variable TENSORATTN_PALLAS_INTERPRET.
    """

    implementation: ClassVar[str] = "pallas"
    fwd_block_rows: int | None = None
    fwd_block_k2: int | None = None
    bwd_block_rows: int | None = None
    bwd_block_k1: int | None = None
    bwd_block_k2: int | None = None
    bwd_fuse_k1: bool | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    interpret: bool | None = None

    def __post_init__(self):
        _tiles_and_interpret(self, flags=("bwd_fuse_k1", "interpret"))


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig(KernelConfig):
    """Tiles of the Mosaic GPU forward kernel (order 3, Hopper), and its backward. None:
    chosen by the library for the call's shapes.

    Not yet measured on a GPU: `implementation=None` keeps choosing `pallas` until a GPU
    session has timed it (docs/pallas.md, "Mosaic GPU forward").

    block_q: query positions per program; `G·block_q` rows must fill compute warpgroups of 64
      or 128 rows (None: the fewest positions giving at least 128 rows, 64 in interpret
      mode).
    block_k1: first keys per pipeline step (multiple of 8; loaded with each step).
    block_k2: second keys per step, the columns of each score product (multiple of 64).
    num_compute_wgs: consumer warpgroups splitting the rows (a producer warpgroup issues the
      TMA copies).
    max_concurrent_steps: shared-memory slots of the k1/v1/k2/v2 pipeline.
    register_operands: the first operands of both wgmma products (`x = q ∘ k1[a]`, `P`) from
      registers, q held in registers (False: all three in shared memory, each store followed
      by a fence). None: True when compiled; interpret mode needs False.
    schedule_barrier: with two compute warpgroups, alternate them (FA3's ping-pong): one runs
      its softmax while the other's products use the tensor cores. None: on with two compute
      warpgroups and at least two pipeline slots when compiled; off in interpret mode.
    interpret: run in Mosaic GPU interpret mode on CPU (slow, for tests). None: the
      environment variable TENSORATTN_MOSAIC_GPU_INTERPRET.
    backward: "pallas" (the portable Pallas backward, default tiles) or "mosaic_gpu" (the
      Mosaic GPU dQ and dK/dV kernels, `mosaic_gpu_bwd`; not yet measured). None: "pallas".
    bwd_fuse_k1: with backward="mosaic_gpu", dK1/dV1 as partial sums inside the dQ kernel
      (needs a causal window on the first key set, the smaller once ordered, and shared
      memory for `block_q + w1 - 1` rows) instead of the dK/dV kernel. None: fused when
      possible.
    """

    implementation: ClassVar[str] = "mosaic_gpu"
    block_q: int | None = None
    block_k1: int | None = None
    block_k2: int | None = None
    num_compute_wgs: int | None = None
    max_concurrent_steps: int | None = None
    register_operands: bool | None = None
    schedule_barrier: bool | None = None
    interpret: bool | None = None
    backward: str | None = None
    bwd_fuse_k1: bool | None = None

    def __post_init__(self):
        flags = ("register_operands", "schedule_barrier", "interpret", "bwd_fuse_k1")
        _tiles_and_interpret(self, flags=flags, others=("backward",))
        if self.backward is not None:
            _choice(self, "backward", MOSAIC_BACKWARDS)
        if self.bwd_fuse_k1 is not None and self.backward != "mosaic_gpu":
            raise ValueError(
                "MosaicGPUConfig.bwd_fuse_k1 is an option of the Mosaic GPU backward: set "
                "backward='mosaic_gpu' (or leave it None)"
            )


@dataclasses.dataclass(frozen=True)
class PolynomialConfig(KernelConfig):
    """The polynomial method (docs/math.md §4-§5).

    degree: polynomial degree `g`; None: 4, or the smallest reaching `tolerance`.
    polynomial: "taylor" or "chebyshev" (a fit of exp on `[-R, R]`: needs bound or score_range).
    bound: largest `|entry|` of q and the keys; gives `R = scale·H·bound^(order)`.
    score_range: `R` directly (overrides the one from `bound`).
    tolerance: largest certified relative error of the attention weights; picks the degree
      when `degree` is None (needs bound or score_range) and is the check's threshold
      (None: 1e-2).
    on_uncertified: "warn", "error" or "ignore" when a call's certified error exceeds it.
    gradient: "closed_form" (docs/math.md §5) or "autodiff".
    chunk_size: sequence positions per scan step; None: sized to the feature rank.
    fused: run the fused Pallas kernels (`polynomial_fused`: features formed on chip, never
      `[T, rank]` in memory; order 3, no windows, float scale; closed-form gradient) instead
      of the XLA scan. Off by default until measured on a GPU (issue 14); on CPU they run in
      Pallas interpret mode; on TPU they refuse (Triton kernels) unless interpret=True.
    Options of the fused kernels only (fused=True; None: chosen by the library for the call):
    precision: their matmul precision, "bf16x3" (None: operands split into bfloat16 hi + lo,
      ~2^-16 relative per product), "highest" (float32 products: polynomial.py's numerics,
      slow on a GPU) or "bf16" (one bfloat16 product, ~2^-8, faster). The certificate's
      rounding term assumes float32 products: use "highest" where that term matters. The
      selection of the features is exact in every mode.
    block_q: query positions per program (non-causal forward, dQ, Γ); block_k: key positions
      per step or program (key sums, dK/dV); block_rank: monomials per on-chip feature block;
      rank_group: monomials per causal program (a multiple of block_rank); causal_chunk:
      positions per step of the causal kernels. Powers of two (>= 16 on a GPU, but
      causal_chunk, 8 by default: its 8-row products compile with Triton 3.9).
    num_warps, num_stages: GPU launch settings.
    interpret: Pallas interpret mode (any backend; slow, for tests). None: on on CPU or with
      TENSORATTN_PALLAS_INTERPRET=1; False emits the GPU kernels (refused without a GPU).
    """

    implementation: ClassVar[str] = "polynomial"
    degree: int | None = None
    polynomial: str = "taylor"
    bound: float | None = None
    score_range: float | None = None
    tolerance: float | None = None
    on_uncertified: str = "warn"
    gradient: str = "closed_form"
    chunk_size: int | None = None
    fused: bool = False
    precision: str | None = None
    block_q: int | None = None
    block_k: int | None = None
    block_rank: int | None = None
    rank_group: int | None = None
    causal_chunk: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    interpret: bool | None = None

    FUSED_OPTIONS: ClassVar[tuple[str, ...]] = (
        "precision",
        "block_q",
        "block_k",
        "block_rank",
        "rank_group",
        "causal_chunk",
        "num_warps",
        "num_stages",
        "interpret",
    )

    def __post_init__(self):
        _positive_int(self, "degree", optional=True, zero=True)
        if self.degree is not None and self.degree > MAX_DEGREE:
            _fail(type(self), "degree", f"at most {MAX_DEGREE}", self.degree)
        _choice(self, "polynomial", POLYNOMIALS)
        _positive_float(self, "bound")
        _positive_float(self, "score_range")
        t = self.tolerance
        if t is not None and (
            not isinstance(t, numbers.Real) or isinstance(t, bool) or not 0 < t < 1
        ):
            _fail(type(self), "tolerance", "a number in (0, 1) or None", t)
        _choice(self, "on_uncertified", ON_UNCERTIFIED)
        _choice(self, "gradient", GRADIENTS)
        _positive_int(self, "chunk_size", optional=True)
        if not isinstance(self.fused, (bool, np.bool_)):
            _fail(type(self), "fused", "a bool", self.fused)
        if self.fused and (self.gradient != "closed_form" or self.chunk_size is not None):
            raise ValueError(
                "PolynomialConfig.fused=True runs the fused kernels with the closed-form "
                "gradient and their own tiles: leave gradient='closed_form' and chunk_size=None"
            )
        if self.precision is not None:
            _choice(self, "precision", FUSED_PRECISIONS)
        for name in ("block_q", "block_k", "block_rank", "rank_group", "causal_chunk"):
            v = getattr(self, name)
            _positive_int(self, name, optional=True)
            if v is not None and v & (v - 1):
                _fail(type(self), name, "a power of two or None", v)
        _positive_int(self, "num_warps", optional=True)
        _positive_int(self, "num_stages", optional=True)
        if self.interpret is not None and not isinstance(self.interpret, bool):
            _fail(type(self), "interpret", "a bool or None", self.interpret)
        if self.block_rank and self.rank_group and self.rank_group % self.block_rank:
            what = f"a multiple of block_rank={self.block_rank}"
            _fail(type(self), "rank_group", what, self.rank_group)
        given = [n for n in self.FUSED_OPTIONS if getattr(self, n) is not None]
        if given and not self.fused:
            raise ValueError(
                f"PolynomialConfig.{given[0]} is an option of the fused kernels: set fused=True "
                "(or leave it None)"
            )
        if self.polynomial == "chebyshev" and self.bound is None and self.score_range is None:
            raise ValueError(
                "PolynomialConfig.polynomial='chebyshev' needs bound or score_range (the "
                "interval it fits exp on)"
            )
        if self.tolerance is not None and self.degree is None:
            if self.bound is None and self.score_range is None:
                raise ValueError(
                    "PolynomialConfig.tolerance picks the degree from bound or score_range; "
                    "give one of them, or a degree"
                )


CONFIGS: dict[str, type[KernelConfig]] = {
    c.implementation: c
    for c in (ReferenceConfig, BlockedConfig, PallasConfig, MosaicGPUConfig, PolynomialConfig)
}


def config_for(
    implementation: str, config: KernelConfig | None = None, options: Mapping | None = None
) -> KernelConfig:
    """The typed config of one call: `config` (checked to belong to `implementation`) or one
    built from keyword `options`; ValueError names a mismatch or an option it does not take."""
    if implementation not in CONFIGS:
        raise ValueError(
            f"unknown implementation={implementation!r}; choose one of {sorted(CONFIGS)} or None"
        )
    cls = CONFIGS[implementation]
    if config is not None:
        if options:
            raise ValueError(
                f"give either config= or keyword options, not both (got config and "
                f"{sorted(options)})"
            )
        if not isinstance(config, cls):
            raise ValueError(
                f"implementation={implementation!r} takes a {cls.__name__}, got "
                f"{type(config).__name__}"
            )
        return config
    return cls.from_mapping(options)
