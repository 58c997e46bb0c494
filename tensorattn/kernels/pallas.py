"""Exact order-3 tensor attention as Pallas kernels, forward and backward (docs/math.md §1-§3).

One program owns a tile of `R = G·block_q` rows: the `G` query heads of a key/value group times
`block_q` query positions (backward tiles may hold part of a large group's heads). For each
tile of second keys `b` and each first key `a` it forms `x = q_tile ∘ k1[a]`, takes one matrix
product `x @ k2_tile^T` and updates an online softmax; the values enter as `acc += v1[a] ∘ (p @
v2_tile)`. Causal and window masks shrink the loop bounds (whole tiles and first keys are
skipped); key padding masks and lengths that are not tile multiples are handled by a per-key
validity vector. Scores are kept in base 2 (`tau·log2 e` is folded into `q`), and the forward
saves the base-2 log-sum-exp.

Backward (no atomics): kernels recompute scores from the log-sum-exp, each owning its
outputs: dQ (grid over query tiles), dK1/dV1 (grid over first-key tiles) and dK2/dV2 (grid
over second-key tiles). With a causal window on the first key set, dK1/dV1 are instead formed
inside the dQ kernel as per-query-tile partial sums, added afterwards (two kernels, 8 tile
products per step instead of 11).

The kernels use only portable Pallas (`pallas_call`, block specs, `jnp` ops, `dot_general`):
on GPU they lower through Pallas' Triton backend, on TPU through Mosaic, and with
`interpret=True` (or `TENSORATTN_PALLAS_INTERPRET=1`) they run anywhere in interpret mode.
On TPU (docs/pallas.md, "TPU") the tiles follow Mosaic's alignment, one-row loads go through
aligned blocks, and the dK/dV kernels take query tiles as a sequential grid axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tensorattn.kernels import spine
from tensorattn.kernels.configs import PallasConfig
from tensorattn.kernels.spine import AttentionSpec

# Interpret mode for calls whose PallasConfig.interpret is None.
INTERPRET_ENV = "TENSORATTN_PALLAS_INTERPRET"
_F32 = jnp.float32
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Config(spine.CallView):
    """Static (hashable) description of one pass (forward or backward) of one call: the
    call and the pass's tiles."""

    call: spine.Call
    bq: int
    bk1: int
    bk2: int
    num_warps: int
    num_stages: int
    interpret: bool
    fuse_k1: bool = False  # backward: dK1/dV1 as partial sums of the dQ kernel
    splits: int = 1  # row tiles per tile of positions (`spine.CallView`; backward only)
    tpu: bool = False  # compiled by Mosaic for a TPU (`row_align`, `grid_q`)

    @property
    def row_align(self) -> int:
        """One-row loads go through aligned blocks of this many rows (TPU: `TPU_ROWS`)."""
        return TPU_ROWS if self.tpu else 1

    @property
    def grid_q(self) -> bool:
        """dK/dV kernels take query tiles as a sequential grid axis, the output tile
        accumulating, so that only tiles of the query rows sit in VMEM (TPU), instead of a
        loop over all rows."""
        return self.tpu

    @property
    def span(self) -> int:
        """First keys a query tile can see with a causal window `w1`: `[p0 - w1 + 1, p0 + bq)`
        (the rows of its dK1/dV1 partial sums)."""
        return self.bq + self.w1 - 1

    @property
    def n1(self) -> int:
        return -(-self.s1 // self.bk1)

    @property
    def n2(self) -> int:
        return -(-self.s2 // self.bk2)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The forward and backward passes of one call: `bwd` the tiles of the backward kernels
    over query tiles (dQ, fused with dK1/dV1 or beside the dK1/dV1 kernel), `kv2` those of
    the dK2/dV2 kernel (by default a wider `block_k2`)."""

    fwd: _Config
    bwd: _Config
    kv2: _Config


# Default tiles (PallasConfig fields left at None).
DEFAULT_ROWS = 128
DEFAULT_BLOCK_K2 = 64
DEFAULT_BWD_BLOCK_K1 = 16
DEFAULT_NUM_STAGES = 2
# Backward tiles: 64 rows (one position's 64 of a larger group's heads, `_Config.splits`),
# 8 warps, 32 second keys (dK2/dV2: 64). The backward kernels carry [rows, H] float32
# accumulators beside their inputs: at H = 128, 128-row tiles (or 4 warps) spill registers,
# and 64-key tiles do in dQ/dK1/dV1 but not in dK2/dV2, whose products' rows are the keys
# (under 64 rows Triton falls back from wgmma to mma.sync). From ptxas reports for sm_90a
# (`experiments/kernel_registers.py`, docs/pallas.md "Registers"); not yet timed.
DEFAULT_BWD_ROWS = 64
DEFAULT_BWD_BLOCK_K2 = 32
KV2_BLOCK_K2 = 64
BWD_WARPS = 8
# With G = 64 query heads per key/value head (D = 128), forward tiles of 64 rows (one query
# position per tile) and 4 warps ran 1.3x faster than 128 rows (measured on an H100, issue 10).
LARGE_GROUP = 64
LARGE_GROUP_FWD_ROWS = 64
# The fused dQ/dK1/dV1 kernel runs by default when a query tile's partial sums have at most
# this many rows per tile row (partials at most ~4x dQ's f32 bytes). Its default tiles: it
# carries three [rows, H] float32 accumulators (dq, and per first key z and p @ v2); at 64
# rows on 8 warps and H = 128 ptxas spills 256 bytes per thread (32 rows: none, but
# mma.sync instead of wgmma). Not yet timed against the split kernels.
FUSE_MAX_SPAN_PER_ROW = 2
FUSED_ROWS = 64
# On TPU, Mosaic loads the second keys' validity in 128-lane slices: every `block_k2` is 128
# (the lane width, and v5e's matrix unit).
TPU_BLOCK_K2 = 128
# Mosaic loads and stores whole sublane tiles (8 rows of 32 bits, 16 of 16 bits): tiles of
# rows are multiples of 16, and one-row loads and stores use aligned blocks of 16 rows.
TPU_ROWS = 16


def _tpu_tiles(interpret: bool) -> bool:
    """Whether the call is compiled by Mosaic for a TPU (and takes the TPU tiles)."""
    return not interpret and jax.default_backend() == "tpu"


def _pass(
    call: spine.Call,
    rows: int,
    bk1: int,
    bk2: int,
    config: PallasConfig,
    interpret,
    warps=None,
    split_heads=False,
    tpu=False,
):
    """One pass's tiles: `rows // G` query positions (at least 1, at most T rounded up to a
    power of two), `bk2` at most S2 rounded up to a power of two (at least 16; on TPU as
    given); `warps`: the
    default number of warps (None: by tile size). `split_heads`: with `rows < G` (G a
    multiple of `rows`), tiles of one position and `rows` of its heads instead of `G` rows.
    `tpu`: `G·bq` rounded up to a multiple of `TPU_ROWS`, `bk2` kept, and the dK/dV kernels
    over a grid axis of query tiles (`_Config.grid_q`; the kernels that write one row at a
    time do not run)."""
    g = call.group
    bq = min(max(1, rows // g), _next_pow2(call.t))
    if tpu:  # `G·bq` a multiple of TPU_ROWS
        step = TPU_ROWS // math.gcd(g, TPU_ROWS)
        bq = -(-bq // step) * step
    splits = g // rows if split_heads and rows < g and g % rows == 0 else 1
    if not tpu:  # TPU: Mosaic slices the validity at multiples of 128 (`TPU_BLOCK_K2`)
        bk2 = min(bk2, max(16, _next_pow2(call.lengths[1])))
    num_warps = config.num_warps or warps or (4 if g * bq * bk2 // splits <= 64 * 64 else 8)
    return _Config(
        call=call,
        bq=bq,
        bk1=bk1,
        bk2=bk2,
        num_warps=num_warps,
        num_stages=config.num_stages or DEFAULT_NUM_STAGES,
        interpret=interpret,
        splits=splits,
        tpu=tpu,
    )


def plan(call: spine.Call, config: PallasConfig) -> Plan:
    """Tiles of both passes: `config`'s fields, None ones chosen here."""
    interpret = spine.env_flag(INTERPRET_ENV) if config.interpret is None else config.interpret
    tpu = _tpu_tiles(interpret)
    fwd_rows = LARGE_GROUP_FWD_ROWS if call.group >= LARGE_GROUP else DEFAULT_ROWS
    bk1 = config.bwd_block_k1 or DEFAULT_BWD_BLOCK_K1
    tiles = functools.partial(_pass, call, bk1=bk1, config=config, interpret=interpret, tpu=tpu)
    fwd = tiles(
        config.fwd_block_rows or fwd_rows,
        bk2=config.fwd_block_k2 or (TPU_BLOCK_K2 if tpu else DEFAULT_BLOCK_K2),
    )
    rows, bk2 = config.bwd_block_rows, config.bwd_block_k2
    bwd = functools.partial(tiles, warps=BWD_WARPS, split_heads=True)
    bwd_bk2 = bk2 or (TPU_BLOCK_K2 if tpu else DEFAULT_BWD_BLOCK_K2)
    fused = bwd(rows or FUSED_ROWS, bk2=bwd_bk2)
    split = bwd(rows or DEFAULT_BWD_ROWS, bk2=bwd_bk2)
    kv2 = bwd(rows or DEFAULT_BWD_ROWS, bk2=bk2 or (TPU_BLOCK_K2 if tpu else KV2_BLOCK_K2))
    fuse = config.bwd_fuse_k1
    if fuse is None and tpu:  # the partial sums' tiles (`span` rows) break Mosaic's alignment
        fuse = False
    if fuse is None:  # fused tiles as small as asked (larger ones would spill: split)
        small = fused.rows <= (rows or FUSED_ROWS)
        fuse = small and _can_fuse(fused) and fused.span <= FUSE_MAX_SPAN_PER_ROW * fused.rows
    if fuse:
        return Plan(fwd, dataclasses.replace(fused, fuse_k1=True), kv2)
    return Plan(fwd, split, kv2)


def _can_fuse(cfg: _Config) -> bool:
    """The fused dQ/dK1/dV1 kernel needs a causal window on the first key set (a query tile
    then sees a fixed number of first keys)."""
    return cfg.causal and cfg.w1 is not None


# ---------------------------------------------------------------------------------------------
# Loop bounds and masks (traced inside the kernels; all bounds are int32 scalars), from the
# spine's one mask rule.


def _k2_tiles(cfg: _Config, p0, p1):
    """Second-key tiles `[lo, hi)` that can hold an allowed key for positions `p0..p1`."""
    lo, hi = spine.tile_range(p0, p1, cfg.s2, cfg.bk2, cfg.causal, cfg.w2)
    return jnp.int32(lo), jnp.int32(hi)


def _k1_keys(cfg: _Config, p0, p1):
    """First keys `[lo, hi)` that can be allowed for positions `p0..p1`."""
    lo, hi = spine.key_range(p0, p1, cfg.s1, cfg.causal, cfg.w1)
    return jnp.int32(lo), jnp.int32(hi)


def _q_tiles(cfg: _Config, k0, k1, window):
    """Row tiles `[lo, hi)` whose positions can see a key in `k0..k1` (`window` of that set)."""
    lo, hi = spine.query_tile_range(k0, k1, cfg.nq_pos, cfg.bq, cfg.causal, window)
    return jnp.int32(lo) * cfg.splits, jnp.int32(hi) * cfg.splits


def _tile_positions(cfg: _Config, qi):
    """First and last query positions `(p0, p1)` of row tile `qi`."""
    p0 = (qi // cfg.splits if cfg.splits > 1 else qi) * cfg.bq
    return p0, p0 + cfg.bq - 1


def _positions(cfg: _Config, qi):
    """`[R, 1]` query position of each row (rows are (head in group, position))."""
    r = lax.broadcasted_iota(jnp.int32, (cfg.rows, 1), 0)
    return _tile_positions(cfg, qi)[0] + r % cfg.bq


def _col_ok(cfg: _Config, valid2, pos, b0):
    """`[R, bk2]` allowed second keys `b0..b0+bk2` for rows at `pos`."""
    b = b0 + lax.broadcasted_iota(jnp.int32, (1, cfg.bk2), 1)
    ok = (valid2 > 0) & spine.allowed(pos, b, cfg.causal, cfg.w2)
    return jnp.broadcast_to(ok, (cfg.rows, cfg.bk2))


def _row_ok(cfg: _Config, valid1, pos, a):
    """`[R, 1]` whether first key `a` is allowed for rows at `pos`."""
    ok = (valid1 > 0) & spine.allowed(pos, a, cfg.causal, cfg.w1)
    return jnp.broadcast_to(ok, (cfg.rows, 1))


_dot = spine.dot


def _row(cfg: _Config, ref, i):
    """Row `i` of `ref` as `[1, X]`. With `cfg.row_align = c > 1` (TPU: Mosaic loads whole
    sublane tiles) the aligned block of `c` rows holding it is loaded and the row picked out."""
    c = cfg.row_align
    if c == 1:
        return ref[pl.ds(i, 1), :]
    block = ref[pl.ds(pl.multiple_of(i // c * c, c), c), :]
    pick = lax.broadcasted_iota(jnp.int32, block.shape, 0) == i % c
    return jnp.sum(jnp.where(pick, block, 0), axis=0, keepdims=True).astype(block.dtype)


def _scores(cfg: _Config, q, k1a, k2, ok):
    """Masked base-2 scores `[R, bk2]` and the product `x = q ∘ k1[a]`."""
    x = (q * k1a).astype(k2.dtype)
    s = _dot(x, k2, (1, 1))
    return jnp.where(ok, s, -jnp.inf), x


# ---------------------------------------------------------------------------------------------
# Kernels. Refs: q/o/do [R, X] (one tile), lse/delta [R, 1]; k*/v* [S, X] (whole key set of
# this (batch, kv-head)) or [bk, X] (one tile); valid1 [S1, 1] and valid2 [1, S2] int32 (padding
# is invalid).


def _fwd_kernel(cfg: _Config, q_ref, k1_ref, v1_ref, k2_ref, v2_ref, m1_ref, m2_ref, o_ref, l_ref):
    qi = pl.program_id(1)
    q = q_ref[...]
    pos = _positions(cfg, qi)
    p0, p1 = _tile_positions(cfg, qi)
    j_lo, j_hi = _k2_tiles(cfg, p0, p1)
    a_lo, a_hi = _k1_keys(cfg, p0, p1)

    def j_step(j, carry):
        b0 = pl.multiple_of(j * cfg.bk2, cfg.bk2)
        k2 = k2_ref[pl.ds(b0, cfg.bk2), :]
        v2 = v2_ref[pl.ds(b0, cfg.bk2), :]
        col_ok = _col_ok(cfg, m2_ref[:, pl.ds(b0, cfg.bk2)], pos, b0)

        def a_step(a, carry):
            m, denom, acc = carry
            k1a = _row(cfg, k1_ref, a)
            v1a = _row(cfg, v1_ref, a).astype(_F32)
            ok = col_ok & _row_ok(cfg, _row(cfg, m1_ref, a), pos, a)
            s, _ = _scores(cfg, q, k1a, k2, ok)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - m_safe)
            alpha = jnp.exp2(m - m_safe)
            denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
            w = _dot(p.astype(v2.dtype), v2, (1, 0))
            return m_new, denom, alpha * acc + w * v1a

        return lax.fori_loop(a_lo, a_hi, a_step, carry)

    hv = o_ref.shape[-1]
    init = (
        jnp.full((cfg.rows, 1), -jnp.inf, _F32),
        jnp.zeros((cfg.rows, 1), _F32),
        jnp.zeros((cfg.rows, hv), _F32),
    )
    m, denom, acc = lax.fori_loop(j_lo, j_hi, j_step, init)
    nonempty = denom > 0
    l_safe = jnp.where(nonempty, denom, 1.0)
    o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
    l_ref[...] = jnp.where(nonempty, m + jnp.log2(l_safe), 0.0)


def _query_tile(cfg: _Config, q_ref, do_ref, l_ref, d_ref):
    """A backward program's query tile: `(q, do, lse, delta, pos)`, its first position `p0`,
    and the second-key tiles and first keys its positions can see."""
    qi = pl.program_id(1)
    p0, p1 = _tile_positions(cfg, qi)
    rows_in = (q_ref[...], do_ref[...], l_ref[...], d_ref[...], _positions(cfg, qi))
    return rows_in, p0, _k2_tiles(cfg, p0, p1), _k1_keys(cfg, p0, p1)


def _dq_kernel(cfg: _Config, q_ref, k1_ref, v1_ref, k2_ref, v2_ref, m1_ref, m2_ref, do_ref,
               l_ref, d_ref, dq_ref):  # fmt: skip
    rows_in, p0, (j_lo, j_hi), (a_lo, a_hi) = _query_tile(cfg, q_ref, do_ref, l_ref, d_ref)
    q, do, lse, delta, pos = rows_in

    def j_step(j, dq):
        b0 = pl.multiple_of(j * cfg.bk2, cfg.bk2)
        k2 = k2_ref[pl.ds(b0, cfg.bk2), :]
        v2 = v2_ref[pl.ds(b0, cfg.bk2), :]
        col_ok = _col_ok(cfg, m2_ref[:, pl.ds(b0, cfg.bk2)], pos, b0)

        def a_step(a, dq):
            k1a = _row(cfg, k1_ref, a)
            v1a = _row(cfg, v1_ref, a)
            ok = col_ok & _row_ok(cfg, _row(cfg, m1_ref, a), pos, a)
            s, _ = _scores(cfg, q, k1a, k2, ok)
            p = jnp.exp2(s - lse)
            dp = _dot((do * v1a).astype(v2.dtype), v2, (1, 1))
            ds = p * (dp - delta)
            z = _dot(ds.astype(k2.dtype), k2, (1, 0))
            return dq + z * k1a.astype(_F32)

        return lax.fori_loop(a_lo, a_hi, a_step, dq)

    dq = lax.fori_loop(j_lo, j_hi, j_step, jnp.zeros(q_ref.shape, _F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _first_key_sums(cfg: _Config, rows_in, k1a, v1a, row_ok, k2_ref, v2_ref, m2_ref, j_lo, j_hi):
    """For one query tile (`rows_in = (q, do, lse, delta, pos)`) and one first key `a`, summed
    over second-key tiles `[j_lo, j_hi)`: `zq = Σ_b dS @ k2` (dQ's and dK1's factor) and
    `wd = Σ_b p @ v2` (dV1's), both `[R, X]` float32. Four tile products per step."""
    q, do, lse, delta, pos = rows_in
    y = (do * v1a).astype(v2_ref.dtype)

    def j_step(j, carry):
        zq, wd = carry
        b0 = pl.multiple_of(j * cfg.bk2, cfg.bk2)
        k2 = k2_ref[pl.ds(b0, cfg.bk2), :]
        v2 = v2_ref[pl.ds(b0, cfg.bk2), :]
        ok = row_ok & _col_ok(cfg, m2_ref[:, pl.ds(b0, cfg.bk2)], pos, b0)
        s, _ = _scores(cfg, q, k1a, k2, ok)
        p = jnp.exp2(s - lse)
        ds = p * (_dot(y, v2, (1, 1)) - delta)
        zq = zq + _dot(ds.astype(k2.dtype), k2, (1, 0))
        wd = wd + _dot(p.astype(v2.dtype), v2, (1, 0))
        return zq, wd

    init = (jnp.zeros(q.shape, _F32), jnp.zeros(do.shape, _F32))
    return lax.fori_loop(j_lo, j_hi, j_step, init)


def _dkv1_kernel(cfg: _Config, q_ref, k1_ref, v1_ref, k2_ref, v2_ref, m1_ref, m2_ref, do_ref,
                 l_ref, d_ref, dk1_ref, dv1_ref):  # fmt: skip
    ai = pl.program_id(1)
    rows = cfg.rows
    dk1_ref[...] = jnp.zeros(dk1_ref.shape, dk1_ref.dtype)
    dv1_ref[...] = jnp.zeros(dv1_ref.shape, dv1_ref.dtype)

    def a_step(a_local, carry):
        a = ai * cfg.bk1 + a_local
        k1a = k1_ref[pl.ds(a_local, 1), :]
        v1a = v1_ref[pl.ds(a_local, 1), :]
        valid1 = m1_ref[pl.ds(a_local, 1), :]
        qi_lo, qi_hi = _q_tiles(cfg, a, a, cfg.w1)

        def q_step(qi, carry):
            r0 = pl.multiple_of(qi * rows, rows)
            q = q_ref[pl.ds(r0, rows), :]
            do = do_ref[pl.ds(r0, rows), :]
            lse = l_ref[pl.ds(r0, rows), :]
            delta = d_ref[pl.ds(r0, rows), :]
            pos = _positions(cfg, qi)
            row_ok = _row_ok(cfg, valid1, pos, a)
            j_lo, j_hi = _k2_tiles(cfg, *_tile_positions(cfg, qi))
            rows_in = (q, do, lse, delta, pos)
            zq, wd = _first_key_sums(
                cfg, rows_in, k1a, v1a, row_ok, k2_ref, v2_ref, m2_ref, j_lo, j_hi
            )
            dk, dv = carry
            dk = dk + jnp.sum(q.astype(_F32) * zq, axis=0, keepdims=True)
            dv = dv + jnp.sum(do.astype(_F32) * wd, axis=0, keepdims=True)
            return dk, dv

        init = (jnp.zeros((1, q_ref.shape[-1]), _F32), jnp.zeros((1, do_ref.shape[-1]), _F32))
        dk, dv = lax.fori_loop(qi_lo, qi_hi, q_step, init)
        dk1_ref[pl.ds(a_local, 1), :] = (dk * _LN2).astype(dk1_ref.dtype)
        dv1_ref[pl.ds(a_local, 1), :] = dv.astype(dv1_ref.dtype)
        return carry

    n_valid = jnp.minimum(cfg.bk1, cfg.s1 - ai * cfg.bk1)
    lax.fori_loop(0, n_valid, a_step, jnp.int32(0))


def _dqkv1_kernel(cfg: _Config, q_ref, k1_ref, v1_ref, k2_ref, v2_ref, m1_ref, m2_ref, do_ref,
                  l_ref, d_ref, dq_ref, dk1_ref, dv1_ref):  # fmt: skip
    """dQ of one query tile, and its partial sums of dK1/dV1: row `r` of `dk1_ref`/`dv1_ref`
    [span, X] is this tile's share of first key `a = p0 - w1 + 1 + r` (zero where not
    allowed). Every row is written once."""
    rows_in, p0, (j_lo, j_hi), (a_lo, a_hi) = _query_tile(cfg, q_ref, do_ref, l_ref, d_ref)
    q, do, lse, delta, pos = rows_in
    base = p0 - (cfg.w1 - 1)

    def a_step(r, dq):
        a = base + r
        live = (a >= a_lo) & (a < a_hi)
        a_in = jnp.clip(a, 0, cfg.s1 - 1)  # an in-bounds row to load when `a` is not live
        k1a = k1_ref[pl.ds(a_in, 1), :]
        v1a = v1_ref[pl.ds(a_in, 1), :]
        row_ok = _row_ok(cfg, m1_ref[pl.ds(a_in, 1), :], pos, a)
        j_end = jnp.where(live, j_hi, j_lo)
        zq, wd = _first_key_sums(
            cfg, rows_in, k1a, v1a, row_ok, k2_ref, v2_ref, m2_ref, j_lo, j_end
        )
        dk = jnp.sum(q.astype(_F32) * zq, axis=0, keepdims=True)
        dv = jnp.sum(do.astype(_F32) * wd, axis=0, keepdims=True)
        dk1_ref[pl.ds(r, 1), :] = (dk * _LN2).astype(dk1_ref.dtype)
        dv1_ref[pl.ds(r, 1), :] = dv.astype(dv1_ref.dtype)
        return dq + zq * k1a.astype(_F32)

    dq = lax.fori_loop(0, cfg.span, a_step, jnp.zeros(q_ref.shape, _F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _fold_partials(part, cfg: _Config):
    """Adds the row tiles' partial sums `[B·K, nq·span, X]` (row `r` of a tile whose first
    position is `p0` is first key `p0 - w1 + 1 + r`) into `[B·K, S1, X]`: the head chunks of a
    position tile summed (`splits`), then `span/bq` shifted block sums (overlap-add,
    deterministic)."""
    bk, _, d = part.shape
    m = -(-cfg.span // cfg.bq)
    part = part.reshape(bk, cfg.nq_pos, cfg.splits, cfg.span, d).sum(axis=2)  # head chunks
    part = jnp.pad(part, ((0, 0), (0, 0), (0, m * cfg.bq - cfg.span), (0, 0)))
    part = part.reshape(bk, cfg.nq_pos, m, cfg.bq, d)
    blocks = sum(jnp.pad(part[:, :, k], ((0, 0), (k, m - 1 - k), (0, 0), (0, 0))) for k in range(m))
    keys = blocks.reshape(bk, -1, d)[:, cfg.w1 - 1 :]  # row 0 is first key 0
    return jnp.pad(keys, ((0, 0), (0, max(0, cfg.s1 - keys.shape[1])), (0, 0)))[:, : cfg.s1]


def _second_key_sums(cfg: _Config, qi, rows_in, k1_ref, v1_ref, m1_ref, k2, v2, valid2, b0, carry):
    """Adds to `carry = (dk, dv)` (`[bk2, X]` float32; dK2 still in base 2) what query tile
    `qi` (`rows_in = (q, do, lse, delta, pos)`) gives second keys `b0..b0+bk2`, summed over its
    first keys."""
    q, do, lse, delta, pos = rows_in
    col_ok = _col_ok(cfg, valid2, pos, b0)
    a_lo, a_hi = _k1_keys(cfg, *_tile_positions(cfg, qi))

    def a_step(a, carry):
        dk, dv = carry
        k1a = _row(cfg, k1_ref, a)
        v1a = _row(cfg, v1_ref, a)
        ok = col_ok & _row_ok(cfg, _row(cfg, m1_ref, a), pos, a)
        s, x = _scores(cfg, q, k1a, k2, ok)
        p = jnp.exp2(s - lse)
        y = (do * v1a).astype(v2.dtype)
        dp = _dot(y, v2, (1, 1))
        ds = p * (dp - delta)
        dv = dv + _dot(p.astype(v2.dtype), y, (0, 0))
        dk = dk + _dot(ds.astype(x.dtype), x, (0, 0))
        return dk, dv

    return lax.fori_loop(a_lo, a_hi, a_step, carry)


def _dkv2_kernel(cfg: _Config, q_ref, k1_ref, v1_ref, k2_ref, v2_ref, m1_ref, m2_ref, do_ref,
                 l_ref, d_ref, dk2_ref, dv2_ref):  # fmt: skip
    bj = pl.program_id(1)
    rows = cfg.rows
    b0 = bj * cfg.bk2
    k2, v2 = k2_ref[...], v2_ref[...]
    valid2 = m2_ref[...]
    qi_lo, qi_hi = _q_tiles(cfg, b0, b0 + cfg.bk2 - 1, cfg.w2)

    def q_step(qi, carry):
        r0 = pl.multiple_of(qi * rows, rows)
        tiles = (ref[pl.ds(r0, rows), :] for ref in (q_ref, do_ref, l_ref, d_ref))
        rows_in = (*tiles, _positions(cfg, qi))
        args = (k1_ref, v1_ref, m1_ref, k2, v2, valid2, b0, carry)
        return _second_key_sums(cfg, qi, rows_in, *args)

    init = (jnp.zeros(k2_ref.shape, _F32), jnp.zeros(v2_ref.shape, _F32))
    dk, dv = lax.fori_loop(qi_lo, qi_hi, q_step, init)
    dk2_ref[...] = (dk * _LN2).astype(dk2_ref.dtype)
    dv2_ref[...] = dv.astype(dv2_ref.dtype)


# With `_Config.grid_q` (TPU) the dK/dV kernels run on the grid (b·k, key tile, step): step `s`
# is query tile `lo + s` of the key tile's range `[lo, hi)` (`_q_tiles`), steps past `hi` do
# nothing (and their block index stays at `hi - 1`, so nothing is fetched), and the key tile's
# outputs accumulate over the steps.


def _query_steps(cfg: _Config, length: int, block: int, window) -> int:
    """Grid steps over query tiles: the most row tiles that can see one key tile."""
    spans = [
        spine.query_tile_range(k0, k0 + block - 1, cfg.nq_pos, cfg.bq, cfg.causal, window)
        for k0 in range(0, length, block)
    ]
    return max(1, *(hi - lo for lo, hi in spans)) * cfg.splits


def _grid_tiles(cfg: _Config, block: int, window, q_ref, do_ref, l_ref, d_ref):
    """A `grid_q` program's first key `k0` of its key tile, its step, its query tile `qi`
    (`live`: within the tiles that can see the key tile) and `rows_in = (q, do, lse, delta,
    pos)` of that query tile."""
    k0, step = pl.program_id(1) * block, pl.program_id(2)
    lo, hi = _q_tiles(cfg, k0, k0 + block - 1, window)
    qi = lo + step
    rows_in = (q_ref[...], do_ref[...], l_ref[...], d_ref[...], _positions(cfg, qi))
    return k0, step, qi, qi < hi, rows_in


def _accumulate(step, outs, sums, scales):
    """Zeroes the output tiles at step 0, then adds `sums` (times `scales`)."""

    @pl.when(step == 0)
    def _():
        for ref in outs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    for ref, x, scale in zip(outs, sums, scales):
        ref[...] += (x * scale).astype(ref.dtype)


def _dkv1_grid_kernel(cfg: _Config, q_ref, k1_ref, v1_ref, k2_ref, v2_ref, m1_ref, m2_ref, do_ref,
                      l_ref, d_ref, dk1_ref, dv1_ref):  # fmt: skip
    """dK1/dV1 of one first-key tile from one query tile (`_Config.grid_q`)."""
    a0, step, qi, live, rows_in = _grid_tiles(cfg, cfg.bk1, cfg.w1, q_ref, do_ref, l_ref, d_ref)
    q, do = rows_in[:2]
    j_lo, j_hi = _k2_tiles(cfg, *_tile_positions(cfg, qi))
    which = lax.broadcasted_iota(jnp.int32, (cfg.bk1, 1), 0)

    def a_step(a_local, carry):
        dk, dv = carry
        a = a0 + a_local
        k1a, v1a = _row(cfg, k1_ref, a_local), _row(cfg, v1_ref, a_local)
        row_ok = _row_ok(cfg, _row(cfg, m1_ref, a_local), rows_in[4], a)
        zq, wd = _first_key_sums(cfg, rows_in, k1a, v1a, row_ok, k2_ref, v2_ref, m2_ref, j_lo, j_hi)
        here = which == a_local
        dk = jnp.where(here, dk + jnp.sum(q.astype(_F32) * zq, axis=0, keepdims=True), dk)
        dv = jnp.where(here, dv + jnp.sum(do.astype(_F32) * wd, axis=0, keepdims=True), dv)
        return dk, dv

    init = (jnp.zeros(dk1_ref.shape, _F32), jnp.zeros(dv1_ref.shape, _F32))
    n_valid = jnp.where(live, jnp.minimum(cfg.bk1, cfg.s1 - a0), 0)  # none past the range
    sums = lax.fori_loop(0, n_valid, a_step, init)
    _accumulate(step, (dk1_ref, dv1_ref), sums, (_LN2, 1.0))


def _dkv2_grid_kernel(cfg: _Config, q_ref, k1_ref, v1_ref, k2_ref, v2_ref, m1_ref, m2_ref, do_ref,
                      l_ref, d_ref, dk2_ref, dv2_ref):  # fmt: skip
    """dK2/dV2 of one second-key tile from one query tile (`_Config.grid_q`)."""
    b0, step, qi, live, rows_in = _grid_tiles(cfg, cfg.bk2, cfg.w2, q_ref, do_ref, l_ref, d_ref)
    init = (jnp.zeros(dk2_ref.shape, _F32), jnp.zeros(dv2_ref.shape, _F32))

    def sums():
        k2, v2, valid2 = k2_ref[...], v2_ref[...], m2_ref[...]
        args = (k1_ref, v1_ref, m1_ref, k2, v2, valid2, b0, init)
        return _second_key_sums(cfg, qi, rows_in, *args)

    _accumulate(step, (dk2_ref, dv2_ref), lax.cond(live, sums, lambda: init), (_LN2, 1.0))


# ---------------------------------------------------------------------------------------------
# Layout: [B,T,N,X] <-> [B·K, nq·R, X] row tiles, keys [B,S,K,X] <-> [B·K, S_pad, X].


def _rows_layout(x, cfg: _Config):
    b, _, _, d = x.shape
    return spine.row_tiles(x, cfg.kv_heads, cfg.bq).reshape(b * cfg.kv_heads, -1, d)


def _rows_merge(x, cfg: _Config, b: int):
    x = x.reshape(b, cfg.kv_heads, cfg.nq_pos, cfg.group * cfg.bq, x.shape[-1])
    return spine.merge_row_tiles(x, cfg.t, cfg.bq)


def _keys_layout(x, block: int):
    b, _, kv, d = x.shape
    return spine.key_tiles(x, block).reshape(b * kv, -1, d)


_keys_merge = spine.merge_key_tiles


def _valid_layout(valid, padded: int, column: bool = False):
    """`[B, 1, S_pad]` int32 (padding invalid), or `[B, S_pad, 1]` with `column`: the first
    keys' validity is read one key at a time, which Mosaic (TPU) allows along sublanes only."""
    b, s = valid.shape
    valid = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, padded - s)))
    return valid.reshape(b, padded, 1) if column else valid.reshape(b, 1, padded)


def _call(cfg: _Config, kernel, grid, in_specs, out_specs, out_shape):
    """`pallas_call` with the backend's launch settings (or interpret mode). A third grid axis
    is sequential (the `grid_q` kernels' steps over query tiles)."""
    kwargs = {}
    if cfg.interpret:
        kwargs["interpret"] = True
    elif jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as plt

        kwargs["compiler_params"] = plt.CompilerParams(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    elif jax.default_backend() == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        kwargs["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")[: len(grid)],
            vmem_limit_bytes=_tpu_vmem_limit(compiler=True),
        )
    else:
        raise spine.Unsupported(_no_backend())
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        **kwargs,
    )


class _Specs:
    """Block specs over the grid `(b·k, tile)` (or `(b·k, tile, step)`: `_over_query_tiles`)."""

    def __init__(self, cfg: _Config):
        self.cfg = cfg

    def tile(self, rows: int, d: int):
        return pl.BlockSpec((None, rows, d), lambda i, j, *_: (i, j, 0))

    def whole(self, shape):
        return pl.BlockSpec((None, *shape[1:]), lambda i, *_: (i, 0, 0))

    def valid_whole(self, valid):
        kv = self.cfg.kv_heads
        return pl.BlockSpec((None, *valid.shape[1:]), lambda i, *_: (i // kv, 0, 0))

    def valid_tile(self, block: int, column: bool = False):
        kv = self.cfg.kv_heads
        if column:
            return pl.BlockSpec((None, block, 1), lambda i, j, *_: (i // kv, j, 0))
        return pl.BlockSpec((None, 1, block), lambda i, j, *_: (i // kv, 0, j))


def _prepare(cfg: _Config, q, k1, k2, v1, v2, valid1, valid2):
    dtype = jnp.result_type(q, k1, k2, v1, v2)
    q_s = (q.astype(_F32) * (cfg.scale * _LOG2E)).astype(dtype)
    s1p, s2p = cfg.n1 * cfg.bk1, cfg.n2 * cfg.bk2
    return (
        _rows_layout(q_s, cfg),
        _keys_layout(k1.astype(dtype), cfg.bk1),
        _keys_layout(k2.astype(dtype), cfg.bk2),
        _keys_layout(v1.astype(dtype), cfg.bk1),
        _keys_layout(v2.astype(dtype), cfg.bk2),
        _valid_layout(valid1, s1p, column=True),
        _valid_layout(valid2, s2p),
    )


def _forward(cfg: _Config, q, k1, k2, v1, v2, valid1, valid2):
    q_t, k1_t, k2_t, v1_t, v2_t, m1, m2 = _prepare(cfg, q, k1, k2, v1, v2, valid1, valid2)
    bk, rows_total, h = q_t.shape
    hv = v1_t.shape[-1]
    sp = _Specs(cfg)
    out_t, lse_t = _call(
        cfg,
        _fwd_kernel,
        grid=(bk, cfg.nq),
        in_specs=[
            sp.tile(cfg.rows, h),
            sp.whole(k1_t.shape),
            sp.whole(v1_t.shape),
            sp.whole(k2_t.shape),
            sp.whole(v2_t.shape),
            sp.valid_whole(m1),
            sp.valid_whole(m2),
        ],
        out_specs=[sp.tile(cfg.rows, hv), sp.tile(cfg.rows, 1)],
        out_shape=[
            jax.ShapeDtypeStruct((bk, rows_total, hv), q.dtype),
            jax.ShapeDtypeStruct((bk, rows_total, 1), _F32),
        ],
    )(q_t, k1_t, v1_t, k2_t, v2_t, m1, m2)
    return _rows_merge(out_t, cfg, q.shape[0]), lse_t


def _query_grid_specs(cfg: _Config, sp: _Specs, h: int, keys_in, rows_in):
    """Input specs of a backward kernel over query tiles: its q tile, the whole key sets and
    validity vectors, its tiles of dO, lse and delta."""
    m1, m2 = keys_in[4:]
    return (
        [sp.tile(cfg.rows, h)]
        + [sp.whole(x.shape) for x in keys_in[:4]]
        + [sp.valid_whole(m1), sp.valid_whole(m2)]
        + [sp.tile(cfg.rows, x.shape[-1]) for x in rows_in]
    )


def _dq_dkv1_split(cfg: _Config, sp: _Specs, q_t, keys_in, rows_in):
    """dQ (grid over query tiles) and dK1/dV1 (grid over first-key tiles): two kernels."""
    k1_t, v1_t, k2_t, v2_t, m1, m2 = keys_in
    bk, rows_total, h = q_t.shape
    hv = v1_t.shape[-1]
    dq_t = _call(
        cfg,
        _dq_kernel,
        grid=(bk, cfg.nq),
        in_specs=_query_grid_specs(cfg, sp, h, keys_in, rows_in),
        out_specs=sp.tile(cfg.rows, h),
        out_shape=jax.ShapeDtypeStruct((bk, rows_total, h), _F32),
    )(q_t, *keys_in, *rows_in)

    if cfg.grid_q:
        dk1_t, dv1_t = _over_query_tiles(cfg, _dkv1_grid_kernel, 0, q_t, keys_in, rows_in)
        return dq_t, dk1_t, dv1_t
    dk1_t, dv1_t = _call(
        cfg,
        _dkv1_kernel,
        grid=(bk, cfg.n1),
        in_specs=[sp.whole(q_t.shape)]
        + [sp.tile(cfg.bk1, h), sp.tile(cfg.bk1, hv), sp.whole(k2_t.shape), sp.whole(v2_t.shape)]
        + [sp.valid_tile(cfg.bk1, column=True), sp.valid_whole(m2)]
        + [sp.whole(x.shape) for x in rows_in],
        out_specs=[sp.tile(cfg.bk1, h), sp.tile(cfg.bk1, hv)],
        out_shape=[
            jax.ShapeDtypeStruct(k1_t.shape, _F32),
            jax.ShapeDtypeStruct(v1_t.shape, _F32),
        ],
    )(q_t, *keys_in, *rows_in)

    return dq_t, dk1_t, dv1_t


def _dq_dkv1_fused(cfg: _Config, sp: _Specs, q_t, keys_in, rows_in):
    """dQ and per-query-tile partial sums of dK1/dV1 in one kernel (grid over query tiles),
    then the partials added (`_fold_partials`)."""
    v1_t = keys_in[1]
    bk, rows_total, h = q_t.shape
    hv = v1_t.shape[-1]
    parts = cfg.nq * cfg.span
    dq_t, dk1_p, dv1_p = _call(
        cfg,
        _dqkv1_kernel,
        grid=(bk, cfg.nq),
        in_specs=_query_grid_specs(cfg, sp, h, keys_in, rows_in),
        out_specs=[sp.tile(cfg.rows, h), sp.tile(cfg.span, h), sp.tile(cfg.span, hv)],
        out_shape=[
            jax.ShapeDtypeStruct((bk, rows_total, h), _F32),
            jax.ShapeDtypeStruct((bk, parts, h), _F32),
            jax.ShapeDtypeStruct((bk, parts, hv), _F32),
        ],
    )(q_t, *keys_in, *rows_in)
    return dq_t, _fold_partials(dk1_p, cfg), _fold_partials(dv1_p, cfg)


def _backward_inputs(cfg: _Config, res, d_out, delta):
    """The backward's inputs in `cfg`'s tiles: `q_t`, the key sets and validity vectors, and
    the row inputs `dO`, `lse`, `delta = Σ dO ∘ out`."""
    q, k1, k2, v1, v2, valid1, valid2, _, lse = res
    q_t, k1_t, k2_t, v1_t, v2_t, m1, m2 = _prepare(cfg, q, k1, k2, v1, v2, valid1, valid2)
    rows_in = [_rows_layout(d_out.astype(v1_t.dtype), cfg), _rows_layout(lse, cfg)]
    rows_in.append(_rows_layout(delta, cfg))
    return q_t, [k1_t, v1_t, k2_t, v2_t, m1, m2], rows_in


def _over_query_tiles(cfg: _Config, kernel, key_set: int, q_t, keys_in, rows_in):
    """dK/dV of key set `key_set` (0 or 1) by a `grid_q` kernel: grid (b·k, key tile, step
    over query tiles); query rows, dO, lse and delta come as tiles, the key set as tiles and
    the other set whole."""
    bk = q_t.shape[0]
    block, length, window = (cfg.bk1, cfg.s1, cfg.w1) if key_set == 0 else (cfg.bk2, cfg.s2, cfg.w2)
    sp = _Specs(cfg)

    def q_tile(i, j, step):
        lo, hi = _q_tiles(cfg, j * block, j * block + block - 1, window)
        return i, jnp.maximum(jnp.minimum(lo + step, hi - 1), 0), 0

    k1_t, v1_t, k2_t, v2_t, m1, m2 = keys_in
    tiled = [sp.tile(block, x.shape[-1]) for x in keys_in[2 * key_set : 2 * key_set + 2]]
    if key_set == 0:
        keys = tiled + [sp.whole(k2_t.shape), sp.whole(v2_t.shape)]
        valids = [sp.valid_tile(block, column=True), sp.valid_whole(m2)]
    else:
        keys = [sp.whole(k1_t.shape), sp.whole(v1_t.shape)] + tiled
        valids = [sp.valid_whole(m1), sp.valid_tile(block)]
    outs = keys_in[2 * key_set : 2 * key_set + 2]
    rows = [pl.BlockSpec((None, cfg.rows, x.shape[-1]), q_tile) for x in (q_t, *rows_in)]
    return _call(
        cfg,
        kernel,
        grid=(bk, -(-length // block), _query_steps(cfg, length, block, window)),
        in_specs=rows[:1] + keys + valids + rows[1:],
        out_specs=tiled,
        out_shape=[jax.ShapeDtypeStruct(x.shape, _F32) for x in outs],
    )(q_t, *keys_in, *rows_in)


def _dkv2(cfg: _Config, q_t, keys_in, rows_in):
    """dK2/dV2 (grid over second-key tiles)."""
    if cfg.grid_q:
        return _over_query_tiles(cfg, _dkv2_grid_kernel, 1, q_t, keys_in, rows_in)
    k1_t, v1_t, k2_t, v2_t, m1, _ = keys_in
    bk, _, h = q_t.shape
    hv = v1_t.shape[-1]
    sp = _Specs(cfg)
    return _call(
        cfg,
        _dkv2_kernel,
        grid=(bk, cfg.n2),
        in_specs=[sp.whole(q_t.shape)]
        + [sp.whole(k1_t.shape), sp.whole(v1_t.shape), sp.tile(cfg.bk2, h), sp.tile(cfg.bk2, hv)]
        + [sp.valid_whole(m1), sp.valid_tile(cfg.bk2)]
        + [sp.whole(x.shape) for x in rows_in],
        out_specs=[sp.tile(cfg.bk2, h), sp.tile(cfg.bk2, hv)],
        out_shape=[
            jax.ShapeDtypeStruct(k2_t.shape, _F32),
            jax.ShapeDtypeStruct(v2_t.shape, _F32),
        ],
    )(q_t, *keys_in, *rows_in)


def backward(plan: Plan, res, d_out):
    """The backward kernels (two or three: `plan.bwd.fuse_k1`). Residuals `(q, k1, k2, v1, v2,
    valid1, valid2, out, lse)` with the base-2 log-sum-exp `lse [B,T,N,1]`; the Mosaic GPU
    forward reuses it."""
    cfg = plan.bwd
    q, k1, k2, v1, v2 = res[:5]
    out = res[7]
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
    inputs = _backward_inputs(cfg, res, d_out, delta)
    layout = _dq_dkv1_fused if cfg.fuse_k1 else _dq_dkv1_split
    dq_t, dk1_t, dv1_t = layout(cfg, _Specs(cfg), *inputs)
    if plan.kv2 != cfg:  # dK2/dV2's tiles (block_k2) differ
        inputs = _backward_inputs(plan.kv2, res, d_out, delta)
    dk2_t, dv2_t = _dkv2(plan.kv2, *inputs)
    dq = _rows_merge(dq_t, cfg, q.shape[0]).astype(q.dtype)
    return (
        dq,
        _keys_merge(dk1_t, k1),
        _keys_merge(dk2_t, k2),
        _keys_merge(dv1_t, v1),
        _keys_merge(dv2_t, v2),
        None,
        None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: Plan, q, k1, k2, v1, v2, valid1, valid2):
    return _forward(plan.fwd, q, k1, k2, v1, v2, valid1, valid2)[0]


def _attend_fwd(plan: Plan, q, k1, k2, v1, v2, valid1, valid2):
    out, lse_t = _forward(plan.fwd, q, k1, k2, v1, v2, valid1, valid2)
    lse = _rows_merge(lse_t, plan.fwd, q.shape[0])  # [B,T,N,1]: the backward's tiles may differ
    return out, (q, k1, k2, v1, v2, valid1, valid2, out, lse)


_attend.defvjp(_attend_fwd, backward)
_attend_cached = spine.cached(_attend)


# ---------------------------------------------------------------------------------------------
# Public entry points (called by tensorattn.kernels.api after validation).


def _no_backend() -> str:
    return (
        f"the Pallas kernels need a GPU or TPU (default backend is {jax.default_backend()!r}); "
        f"pass PallasConfig(interpret=True) or set {INTERPRET_ENV}=1"
    )


def check(q, keys, values, plan: Plan) -> None:
    """Raises `Unsupported` saying why this call cannot run here."""
    for x in (q, *keys, *values):
        if jnp.dtype(jnp.result_type(x)) not in _DTYPES:
            raise spine.Unsupported(
                f"dtype {jnp.result_type(x)} (supported: bfloat16, float16, float32)"
            )
    if plan.bwd.fuse_k1 and not _can_fuse(plan.bwd):
        raise spine.Unsupported(
            "bwd_fuse_k1=True needs a causal window on the first key set (the smaller window "
            "once the sets are ordered)"
        )
    if plan.fwd.interpret:
        return
    backend = jax.default_backend()
    if backend == "gpu":
        h, hv = q.shape[-1], values[0].shape[-1]
        sizes = [("H", h), ("Hv", hv)]
        for name, cfg in (("fwd", plan.fwd), ("bwd", plan.bwd), ("bwd", plan.kv2)):
            sizes += [(f"{name} rows", cfg.rows), (f"{name}_block_k2", cfg.bk2)]
        for name, size in sizes:
            if not _is_pow2(size) or size < 16:
                raise spine.Unsupported(f"{name}={size} (the GPU kernels need powers of two >= 16)")
        if not _is_pow2(plan.bwd.bk1):
            raise spine.Unsupported(f"bwd_block_k1={plan.bwd.bk1} (must be a power of two on GPU)")
        return
    if backend == "tpu":
        _check_tpu(q, keys, values, plan)
        return
    raise spine.Unsupported(_no_backend())


def _check_tpu(q, keys, values, plan: Plan) -> None:
    """Raises `Unsupported` for calls Mosaic cannot compile for a TPU (docs/pallas.md, "TPU")."""
    dtype = jnp.dtype(jnp.result_type(q, *keys, *values))  # what the kernels compute in
    if dtype == jnp.float16:
        raise spine.Unsupported(
            "float16 on TPU (Mosaic compiles the kernels in bfloat16 and float32)"
        )
    if plan.bwd.fuse_k1:
        raise spine.Unsupported("bwd_fuse_k1=True on TPU (its partial sums' tiles are unaligned)")
    for name, cfg in (("fwd", plan.fwd), ("bwd", plan.bwd), ("bwd", plan.kv2)):
        if cfg.rows % TPU_ROWS or cfg.bk1 % TPU_ROWS:
            raise spine.Unsupported(
                f"{name} tiles of {cfg.rows} rows, bwd_block_k1={cfg.bk1} (on TPU multiples of "
                f"{TPU_ROWS}: G·block_q rows, G the query heads per key/value head)"
            )
        if cfg.bk2 % TPU_BLOCK_K2:
            raise spine.Unsupported(
                f"{name}_block_k2={cfg.bk2} (on TPU a multiple of {TPU_BLOCK_K2})"
            )
    need, limit = (
        tpu_vmem_bytes(plan, q.shape[-1], values[0].shape[-1], dtype.itemsize),
        _tpu_vmem_limit(),
    )
    if need > limit:
        raise spine.Unsupported(
            "out of memory on TPU: the kernels keep whole key sets in VMEM: "
            f"{need / 2**20:.0f} MiB for this call, over the {limit / 2**20:.0f} MiB allowed"
        )


def _tpu_vmem_limit(compiler: bool = False) -> int:
    """VMEM a call's `tpu_vmem_bytes` may ask for on this TPU: three quarters of a core's. The
    compiler is given seven eighths, as XLA places some operands in VMEM beside the blocks
    (measured by compiling for v5e: up to 12% more than `tpu_vmem_bytes`)."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.get_tpu_info().vmem_capacity_bytes * (7 if compiler else 6) // 8


def _tpu_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a `[rows, cols]` block: Mosaic pads it to whole tiles of 128 lanes and
    `8·4/itemsize` rows."""
    sub = 32 // itemsize
    return -(-rows // sub) * sub * (-(-cols // 128) * 128) * itemsize


def tpu_vmem_bytes(plan: Plan, h: int, hv: int, itemsize: int) -> int:
    """The most VMEM one of the call's kernels (forward, dQ, dK1/dV1, dK2/dV2) asks for on
    TPU (`grid_q`: the dK/dV kernels hold tiles of the query rows): blocks that cover a whole
    array once, tiles twice (double-buffered)."""

    def keys(cfg, tile1=False, tile2=False):  # k1, v1, valid1, k2, v2, valid2
        s1 = cfg.bk1 if tile1 else cfg.n1 * cfg.bk1
        s2 = cfg.bk2 if tile2 else cfg.n2 * cfg.bk2
        first = [(s1, h, itemsize, tile1), (s1, hv, itemsize, tile1), (s1, 1, 4, tile1)]
        return first + [(s2, h, itemsize, tile2), (s2, hv, itemsize, tile2), (1, s2, 4, tile2)]

    def rows(r):  # tiles of q, dO, lse, delta
        return [(r, h, itemsize, True), (r, hv, itemsize, True), (r, 1, 4, True), (r, 1, 4, True)]

    def outputs(r, x, size):  # tiles of `r` rows: [r, x] each
        return [(r, d, size, True) for d in x]

    fwd, bwd, kv2 = plan.fwd, plan.bwd, plan.kv2
    kernels = [
        keys(fwd)
        + rows(fwd.rows)[:1]
        + outputs(fwd.rows, (hv,), itemsize)
        + [(fwd.rows, 1, 4, True)],
        keys(bwd) + rows(bwd.rows) + outputs(bwd.rows, (h,), 4),
        keys(bwd, tile1=True) + rows(bwd.rows) + outputs(bwd.bk1, (h, hv), 4),
        keys(kv2, tile2=True) + rows(kv2.rows) + outputs(kv2.bk2, (h, hv), 4),
    ]
    return max(
        sum((2 if tile else 1) * _tpu_bytes(r, c, size) for r, c, size, tile in blocks)
        for blocks in kernels
    )


def _wider(w1, w2) -> bool:
    """Whether window `w1` is wider than `w2` (None: unbounded)."""
    return w1 != w2 and (w1 is None or (w2 is not None and w1 > w2))


def ordered_key_sets(q, keys, values, spec: AttentionSpec):
    """`(keys, values, valid, spec)` of an order-3 call with the smaller window first: with
    `w1 > w2` the two key/value sets (and masks, windows) are swapped, which leaves the
    attention unchanged (it is symmetric in them); `valid` are the `[B, S_j]` validity masks."""
    valid = spec.valid(q.shape[0], [k.shape[1] for k in keys])
    if _wider(*spec.windows):
        keys, values, valid = keys[::-1], values[::-1], valid[::-1]
        spec = dataclasses.replace(spec, windows=spec.windows[::-1])
    return tuple(keys), tuple(values), tuple(valid), spec


def attention(q, keys, values, spec: AttentionSpec, config: PallasConfig | None = None):
    """Exact order-3 attention with the Pallas kernels (custom_vjp: forward and backward).

    Raises `Unsupported` (before any work) when the call cannot run here: order other than 3,
    dtype, GPU or TPU tile constraints, TPU memory, no GPU/TPU without interpret mode.
    With `w1 > w2` the two key/value sets are swapped (the attention is symmetric in them) so
    that the per-key loop runs over the smaller window.
    """
    keys, values = tuple(keys), tuple(values)
    if len(keys) != 2:
        raise spine.Unsupported(
            f"order {len(keys) + 1} (the Pallas kernels implement order 3: two key sets)"
        )
    keys, values, valid, spec = ordered_key_sets(q, keys, values, spec)
    kernel_plan = plan(spec.call(q, keys), config or PallasConfig())
    check(q, keys, values, kernel_plan)
    return _attend_cached(kernel_plan, q, keys[0], keys[1], values[0], values[1], *valid)
