"""Exact order-3 tensor attention backward as Pallas **Mosaic GPU** kernels (Hopper).

The gradient of `mosaic_gpu`'s forward when `MosaicGPUConfig(backward="mosaic_gpu")`
(docs/pallas.md, "Mosaic GPU backward"). Residuals are the forward's: q, the key and value
sets (ordered so that the first has the smaller window), the key validity, the output and the
base-2 log-sum-exp. With `x_a = q ∘ k1[a]`, `P = exp2(S - lse)` and `dS = P ∘ (dP - delta)`
(`dP = (dO ∘ v1[a]) @ v2ᵀ`, `delta = Σ dO ∘ out`), two kernels:

- **dQ** (one program per query tile, like the forward; rows split over compute warpgroups):
  per pipeline step (a tile of first keys, a tile of second keys) and first key `a`,
  `S = x_a @ k2ᵀ`, `dP`, and `dQ += (dS @ k2) ∘ k1[a]`: three wgmma products. Under a causal
  first window `w1` (fused, `MosaicGPUConfig.bwd_fuse_k1`) a query tile sees only
  `bq + w1 - 1` first keys, so the kernel also adds each warpgroup's sums over its rows
  `Σ_rows q ∘ (dS @ k2)` and `Σ_rows dO ∘ (P @ v2)` into shared-memory rows of dK1/dV1
  partial sums, which XLA folds per key (`pallas._fold_partials`): four products. It forms
  the last two transposed (`k2ᵀ @ dSᵀ`, `v2ᵀ @ Pᵀ`, and dQᵀ), so that those sums run along
  a tile's rows, within a warp, instead of across its warps.
- **dK/dV of one key set** (one program per tile of that set's keys, 64 per compute
  warpgroup, held in shared memory: the *stationary* set; the other set is *streamed* one key
  `a` at a time, with query tiles of 64 rows): the transposed scores
  `Sᵀ = (k_s ∘ k_t[a]) @ qᵀ` and `dPᵀ = (v_s ∘ v_t[a]) @ dOᵀ`, then
  `dK_s += (dSᵀ @ q) ∘ k_t[a]` and `dV_s += (Pᵀ @ dO) ∘ v_t[a]`: four products, accumulators
  in registers, no atomics. Tensor attention is symmetric in its two key/value sets, so the
  same kernel gives dK2/dV2 (stationary: the second set) and, unless fused, dK1/dV1.

Eight products per (query tile, first key, second-key tile) fused, eleven otherwise, as the
portable Pallas backward's two layouts. Producer warpgroups stream the steps through
shared-memory slots with TMA, as in the forward. Compiled, the transposed operands are
`ref.T` views and the products' first operands come from registers; in interpret mode (jax
0.10's interpreter has neither) the transposes are loaded from device memory laid out by XLA
and every operand is stored to shared memory first. Not yet measured on a GPU (issue 10), so
not the default.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tensorattn.kernels import mosaic_gpu as fwd
from tensorattn.kernels import pallas, spine

_F32 = jnp.float32
_LN2 = math.log(2.0)
_KEYS_PER_WG = 64  # stationary keys per compute warpgroup (the rows of its products)

# Defaults, chosen for shared memory (227 KiB) and registers, not yet timed on a GPU.
DQ_BLOCK_K1 = 16
# Fused, 8: the dS/P tile the transposed products read leaves no room for two 16-key tiles.
DQ_FUSED_BLOCK_K1 = 8
DQ_BLOCK_K2 = 64
DKV_BLOCK_K = 16  # streamed keys per pipeline step of the dK/dV kernel
# A TMA copy moves a multiple of 128 bytes: the float32 biases of a streamed tile are copied
# `_BIAS_COPY` at a time (the tile's own first).
_BIAS_COPY = 32
# Compute warpgroups of the dK/dV kernel: two compiled; one in interpret mode (more simulated
# warpgroups than cores can hang the interpreter, docs/pallas.md).
DKV_WGS = 2
STEPS = 2
KV_ROWS = 64
CHUNK = 64  # columns of the pieces the kernels split `[rows, H]` tiles into (registers)


@dataclasses.dataclass(frozen=True)
class _Config(spine.CallView):
    """Static description of one backward kernel's tiles: `bq` query positions per tile (over
    `splits` row tiles, each with `G / splits` of the group's heads), `wgs` compute warpgroups
    (dQ: they split the rows; dK/dV: 64 stationary keys each). The key sets keep their order:
    the dK/dV kernel gets a `side` (the stationary set: 0 first, 1 second)."""

    call: spine.Call
    bq: int
    wgs: int
    steps: int
    interpret: bool
    registers: bool
    splits: int = 1
    fuse: bool = False  # dQ kernel: also dK1/dV1's partial sums (a causal first window)
    key_masks: bool = True  # the call has a key padding mask

    @property
    def dq_biased(self) -> bool:
        """Whether the dQ kernel's scores need the key biases (its 64-key second tiles)."""
        return fwd.needs_key_bias(self, DQ_BLOCK_K2)

    @property
    def bk1(self) -> int:
        """First keys per pipeline step of the dQ kernel."""
        return DQ_FUSED_BLOCK_K1 if self.fuse else DQ_BLOCK_K1

    @property
    def wg_rows(self) -> int:
        return self.rows // self.wgs

    @property
    def span(self) -> int:
        """First keys a query tile may see under a causal window `w1`."""
        return self.bq + self.w1 - 1

    def window(self, side: int):
        return self.call.windows[side]

    def length(self, side: int) -> int:
        return self.call.lengths[side]


@dataclasses.dataclass(frozen=True)
class Plan:
    dq: _Config
    kv: _Config


def _kv_tiles(group: int) -> tuple[int, int]:
    """`(bq, splits)` of the dK/dV kernel's query tiles: `KV_ROWS` rows (the columns of its
    score products) where the group allows, so that its two float32 accumulators, one product
    and the two score tiles fit a thread's registers (`[64, 64]` float32 tiles are 32 registers
    each; at 128 rows they would be 64)."""
    bq = fwd.positions_for_rows(group, KV_ROWS)
    splits = group * bq // KV_ROWS
    return (bq, splits) if group % splits == 0 else (bq, 1)


def plan(forward: fwd._Config, h: int, hv: int, dtype, fuse: bool | None = None) -> Plan:
    """The backward's tiles: dQ on the forward's query tiles (rows and warpgroups), dK/dV on
    query tiles of `KV_ROWS` rows (a position's heads split in tiles when G > 64). dK1/dV1
    come from the dQ kernel's partial sums when the first key set has a causal window and
    they fit in shared memory (a query tile sees `span = bq + w1 - 1` first keys), else from
    the dK/dV kernel (whose 64-key tiles would see about `w1 / (w1 + 63)` of their pairs).
    `fuse` (`MosaicGPUConfig.bwd_fuse_k1`): True or False forces the choice (`check` refuses
    a fused plan that cannot run)."""
    common = dict(call=forward.call, steps=STEPS, interpret=forward.interpret)
    common["key_masks"] = forward.key_masks
    common["registers"] = forward.registers
    kv_bq, splits = _kv_tiles(forward.call.group)
    kv = _Config(bq=kv_bq, splits=splits, wgs=1 if forward.interpret else DKV_WGS, **common)
    dq = _Config(bq=forward.bq, wgs=forward.wgs, **common)
    fused = Plan(dataclasses.replace(dq, fuse=True), kv)
    if fuse or (
        fuse is None
        and forward.causal
        and forward.w1 is not None
        and max(smem_bytes(fused, h, hv, dtype).values()) <= fwd._SMEM_BYTES
    ):
        return fused
    return Plan(dq, kv)


def chunks(width: int, size: int = CHUNK) -> list[tuple]:
    """Indices of the `size`-column pieces of a `[rows, width]` tile."""
    return [(slice(None), pl.ds(c, size)) for c in range(0, width, size)]


def _streamed_pad(length: int, block: int) -> int:
    """Padded length of a streamed key set: tiles start at any key (the first one a query
    tile may see) and TMA needs 16-byte row strides (the float32 bias rows)."""
    return -(-(length + block) // 64) * 64


def _stationary_pad(cfg: _Config, length: int) -> int:
    block = cfg.wgs * _KEYS_PER_WG
    return -(-length // block) * block


class _Ops:
    """The operations that differ between compiled and interpret mode."""

    def __init__(self, cfg: _Config, dtype):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        self.plgpu, self.cfg, self.dtype = plgpu, cfg, dtype
        self.wgmma = plgpu.Layout.WGMMA
        self.rows_vec, self.cols_vec = self.wgmma.reduce(1), self.wgmma.reduce(0)

    def layout(self, x, layout):
        return x if self.cfg.interpret else self.plgpu.layout_cast(x, layout)

    def load(self, ref, idx, layout):
        """`ref[idx]` as an array in `layout` (interpret mode: a plain read)."""
        if self.cfg.interpret:
            return ref[...] if isinstance(idx, tuple) and not idx else ref[idx]
        return fwd._load_view(self.plgpu, ref.at[idx], layout)

    def operand(self, x, ref):
        """`x` as a wgmma first operand: itself (registers) or stored to `ref`."""
        if self.cfg.registers:
            return x.astype(self.dtype)
        ref[...] = x.astype(ref.dtype)
        self.plgpu.commit_smem()
        return ref

    def store_row(self, ref, r, v):
        """`ref[r] = v` (a row of a float32 shared-memory buffer)."""
        if self.cfg.interpret:
            ref[r] = v
        else:
            ref.at[r][...] = v

    def add_row(self, ref, idx, v):
        """`ref[idx] += v` (part of a row; `v` in `rows_vec`, the layout of a row sum of a
        wgmma tile, each element in the four lanes of one warp). A warpgroup barrier between
        the load and the store, and one after it, order the update against the next.
        (jax 0.10's lowering also puts barriers around each store unless
        `unsafe_no_auto_barriers`; these keep the update safe without them.)"""
        old = self.load(ref, idx, self.rows_vec)
        self.plgpu.commit_smem()
        self.store_row(ref, idx, old + v)
        self.plgpu.commit_smem()

    def load_t(self, ref, cols):
        """`ref[cols]ᵀ` (`ref [rows, N]` in shared memory, 16-bit) as a float32 `[64, rows]`
        tile in the wgmma layout: loaded through a transposed view in the layout whose 2x2
        blocks are transposed, then one shuffle per register (compiled)."""
        if self.cfg.interpret:
            return ref[cols].T.astype(_F32)
        x = fwd._load_view(self.plgpu, ref.at[cols].T, self.plgpu.Layout.WGMMA_TRANSPOSED)
        return self.plgpu.layout_cast(x, self.wgmma).astype(_F32)

    def store_t(self, ref, cols, x):
        """`ref[cols] = xᵀ` (`x [64, rows]` in the wgmma layout)."""
        x = x.astype(ref.dtype)
        if self.cfg.interpret:
            ref[cols] = x.T
        else:
            ref.at[cols].T[...] = self.plgpu.layout_cast(x, self.plgpu.Layout.WGMMA_TRANSPOSED)

    def operand_t(self, x, ref):
        """`xᵀ` as a wgmma second operand: `x` stored to `ref` and read through a transposed
        view (interpret mode: `ref` is `[cols, rows]` and holds `xᵀ`). The products that read
        `ref` before were awaited, and the store's own warpgroup barrier (Pallas puts one
        before each store unless `unsafe_no_auto_barriers`) keeps it behind every warp."""
        if self.cfg.interpret:
            ref[...] = x.T.astype(ref.dtype)
            self.plgpu.commit_smem()
            return ref
        ref[...] = x.astype(ref.dtype)
        self.plgpu.commit_smem()
        return ref.T

    def transposed(self, ref, ref_t, cols=None):
        """`refᵀ` (or `ref[cols]ᵀ`) as a wgmma operand from shared memory: a transposed view
        (compiled) or XLA's transpose `ref_t` (its rows `cols`)."""
        if ref_t is not None:
            return ref_t if cols is None else ref_t.at[cols[1]]
        return (ref if cols is None else ref.at[cols]).T

    def product(self, a, b, shape):
        """`a @ b` (float32, one wgmma)."""

        def run(acc_ref):
            self.plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return pl.run_scoped(run, self.plgpu.ACC(shape, _F32))

    def scaled_rows(self, src, scale_ref, dst, src_t=None, dst_t=None):
        """`dst = src ∘ scale` (`src [rows, N]` in shared memory, `scale [N]` a column scale) as
        wgmma operands `(dst, dstᵀ)`: the transpose a view, or in interpret mode `dst_t`,
        formed from XLA's transpose `src_t`."""
        for cols in chunks(src.shape[-1]):  # (a chunk at a time: fewer registers)
            scale = self.load(scale_ref, cols[1], self.cols_vec)
            x = self.load(src, cols, self.wgmma)
            dst.at[cols][...] = x * self.col_bcast(scale, x.shape)
        if dst_t is not None:
            dst_t[...] = src_t[...] * self.row_bcast(scale_ref[...], dst_t.shape)
        self.plgpu.commit_smem()
        return dst, (dst_t if dst_t is not None else dst.T)

    def accumulate(self, acc, a, b):
        """`acc + a @ b`: wgmma accumulating into `acc`'s registers (interpret mode, which
        has no `run_state`: a product, then a sum)."""
        if self.cfg.interpret:
            return acc + self.product(a, b, acc.shape)

        def run(acc_ref):
            self.plgpu.wgmma(acc_ref, a, b)

        return pl.run_state(run)(self.plgpu.ACC.init(acc))

    def accumulate_and_product(self, acc, a, b, c, d, shape):
        """`(acc + a @ b, c @ d)`, the two wgmmas awaited together."""
        if self.cfg.interpret:
            return self.accumulate(acc, a, b), self.product(c, d, shape)

        def run(refs):
            self.plgpu.wgmma(refs[0], a, b)
            self.plgpu.wgmma(refs[1], c, d)

        zeros = self.layout(jnp.zeros(shape, _F32), self.wgmma)
        return pl.run_state(run)((self.plgpu.ACC.init(acc), self.plgpu.ACC.init(zeros)))

    def row_bcast(self, v, shape):
        """A vector per row, broadcast along the columns."""
        return lax.broadcast_in_dim(v, shape, [0])

    def col_bcast(self, v, shape):
        """A vector per column, broadcast along the rows."""
        return lax.broadcast_in_dim(v, shape, [1])


# ---------------------------------------------------------------------------------------------
# dQ. Refs (GMEM): q/do/dq [BK, nq·R, H|Hv], lse/delta [BK, nq·R], k1/v1 [BK, S1p, H|Hv],
# k2/v2 [BK, S2p, H|Hv], k2t/v2t [BK, H|Hv, S2p] (interpret mode; else None), bias1/bias2
# [B, S1p|S2p].


def _dq_kernel(cfg: _Config, q_ref, do_ref, l_ref, d_ref, k1_ref, v1_ref, b1_ref, k2_ref, v2_ref,
               b2_ref, k2t_ref, v2t_ref, dq_ref, pk_ref, pv_ref, q_smem, do_smem, l_smem, d_smem,
               x_smem, y_smem, ds_smem, pk_smem, pv_smem, k1_smem, v1_smem, b1_smem, k2_smem,
               v2_smem, b2_smem, k2t_smem, v2t_smem, row_bar, load_bars, free_bars):  # fmt: skip
    ops = _Ops(cfg, q_ref.dtype)
    plgpu = ops.plgpu
    bk1, bk2 = cfg.bk1, DQ_BLOCK_K2
    bk = lax.axis_index("bk")
    qi = lax.axis_index("q")
    wg = lax.axis_index("wg")
    batch = lax.div(bk, jnp.int32(cfg.kv_heads))
    p0 = qi * cfg.bq
    p1 = p0 + cfg.bq - 1
    a_lo, a_hi = spine.key_range(p0, p1, cfg.s1, cfg.causal, cfg.w1)
    j_lo, j_hi = spine.tile_range(p0, p1, cfg.s2, bk2, cfg.causal, cfg.w2)
    a_lo, a_hi, j_lo, j_hi = (jnp.asarray(x, jnp.int32) for x in (a_lo, a_hi, j_lo, j_hi))
    n_j = jnp.maximum(j_hi - j_lo, 0)
    n_a = lax.div(jnp.maximum(a_hi - a_lo, 0) + bk1 - 1, jnp.int32(bk1))
    n_steps = n_a * n_j
    interpret_t = k2t_ref is not None

    def step_tiles(step):
        return a_lo + lax.div(step, n_j) * bk1, (j_lo + lax.rem(step, n_j)) * bk2

    def load_step(step, slot):
        a0, b0 = step_tiles(step)
        bar = load_bars.at[slot]
        copies = [
            (k1_ref.at[bk, pl.ds(a0, bk1)], k1_smem),
            (v1_ref.at[bk, pl.ds(a0, bk1)], v1_smem),
            (b1_ref.at[batch, pl.ds(a0, _BIAS_COPY)], b1_smem),
            (k2_ref.at[bk, pl.ds(b0, bk2)], k2_smem),
            (v2_ref.at[bk, pl.ds(b0, bk2)], v2_smem),
            (b2_ref.at[batch, pl.ds(b0, bk2)], b2_smem),
        ]
        if interpret_t:
            copies += [
                (k2t_ref.at[bk, :, pl.ds(b0, bk2)], k2t_smem),
                (v2t_ref.at[bk, :, pl.ds(b0, bk2)], v2t_smem),
            ]
        for src, dst in copies:
            plgpu.copy_gmem_to_smem(src, dst.at[slot], bar)

    @pl.when(wg == cfg.wgs)
    def _producer():
        plgpu.set_max_registers(fwd._PRODUCER_REGISTERS, action="decrease")
        fwd.produce(cfg.steps, n_steps, load_step, free_bars)

    @pl.when(wg < cfg.wgs)
    def _consumer():
        plgpu.set_max_registers(fwd._consumer_registers(cfg.wgs), action="increase")
        rows, h, hv = cfg.wg_rows, q_ref.shape[-1], do_ref.shape[-1]
        r0 = qi * cfg.rows + wg * rows
        q_wg, do_wg, l_wg, d_wg = (s.at[wg] for s in (q_smem, do_smem, l_smem, d_smem))
        for src, dst in ((q_ref, q_wg), (do_ref, do_wg), (l_ref, l_wg), (d_ref, d_wg)):
            plgpu.copy_gmem_to_smem(src.at[bk, pl.ds(r0, rows)], dst, row_bar.at[wg])
        plgpu.barrier_wait(row_bar.at[wg])
        lse = ops.load(l_wg, (), ops.rows_vec)
        delta = ops.load(d_wg, (), ops.rows_vec)
        x_wg, y_wg = (None,) * 2 if cfg.registers else (x_smem.at[wg], y_smem.at[wg])
        ds_wg = None if ds_smem is None else ds_smem.at[wg]
        shape = (rows, bk2)
        if cfg.fuse:  # dK1/dV1 partial sums of first keys base .. base + span - 1
            base = p0 - (cfg.w1 - 1)
            pk_wg, pv_wg = pk_smem.at[wg], pv_smem.at[wg]

            def zero_row(r, carry):
                for ref, d in ((pk_wg, h), (pv_wg, hv)):
                    ops.store_row(ref, r, ops.layout(jnp.zeros((d,), _F32), ops.cols_vec))
                return carry

            lax.fori_loop(jnp.int32(0), jnp.int32(cfg.span), zero_row, jnp.int32(0))
            plgpu.commit_smem()

        def iota(dim):
            return ops.layout(lax.broadcasted_iota(jnp.int32, shape, dim), ops.wgmma)

        def scores(slot, a, i, b0, masked):
            """`(P, dS)` `[rows, bk2]` (float32) of first key `a` (row `i` of the step's k1
            tile) against the step's k2 tile; `masked`: apply the causal/window masks (edge
            pairs only, as in the forward). Rows of q and dO are read again where used."""
            k1a = ops.load(k1_smem, (slot, i), ops.cols_vec)
            x = ops.operand(ops.load(q_wg, (), ops.wgmma) * ops.col_bcast(k1a, (rows, h)), x_wg)
            k2t = ops.transposed(k2_smem.at[slot], k2t_smem.at[slot] if interpret_t else None)
            s = ops.product(x, k2t, shape)
            if cfg.dq_biased:
                bias = ops.load(b2_smem, slot, ops.cols_vec) + b1_smem[slot, i]
                s = s + ops.col_bcast(bias, shape)
            if masked:
                pos = p0 + lax.rem(iota(0) + wg * rows, jnp.int32(cfg.bq))
                ok = spine.allowed(pos, b0 + iota(1), cfg.causal, cfg.w2)
                s = fwd._masked(ok & spine.allowed(pos, a, cfg.causal, cfg.w1), s)
            p = jnp.exp2(s - ops.row_bcast(lse, shape))
            v1a = ops.load(v1_smem, (slot, i), ops.cols_vec)
            y = ops.operand(ops.load(do_wg, (), ops.wgmma) * ops.col_bcast(v1a, (rows, hv)), y_wg)
            v2t = ops.transposed(v2_smem.at[slot], v2t_smem.at[slot] if interpret_t else None)
            dp = ops.product(y, v2t, shape)
            return p, p * (dp - ops.row_bcast(delta, shape))

        def first_key(slot, a, i, b0, masked, dq):
            """dq `[rows, H]` += (dS @ k2) ∘ k1[a]: one whole-width product."""
            _, ds = scores(slot, a, i, b0, masked)
            z = ops.product(ops.operand(ds, ds_wg), k2_smem.at[slot], (rows, h))
            k1a = ops.load(k1_smem, (slot, i), ops.cols_vec).astype(_F32)
            return (dq[0] + z * ops.col_bcast(k1a, z.shape),)

        def first_key_fused(slot, a, i, b0, masked, dq_t):
            """(fused) Transposed, so that the partial sums over the rows are sums along a
            tile's rows, within a warp: per `CHUNK` columns `c`, `Zᵀ = k2[:, c]ᵀ @ dSᵀ`
            `[c, rows]`, `dQᵀ[c] += Zᵀ ∘ k1[a, c]`, `dK1[a, c] += Σ_rows Zᵀ ∘ q[:, c]ᵀ`, and
            `dV1[a, c] += Σ_rows (v2[:, c]ᵀ @ Pᵀ) ∘ dO[:, c]ᵀ`. dSᵀ and Pᵀ are wgmma second
            operands, so they go through one shared-memory tile, in turn."""
            p, ds = scores(slot, a, i, b0, masked)
            p = p.astype(ops.dtype)  # (it is stored in that dtype; half the registers)
            k2_t, v2_t = (r.at[slot] if interpret_t else None for r in (k2t_smem, v2t_smem))
            ds_t = ops.operand_t(ds, ds_wg)
            out = []
            for acc, cols in zip(dq_t, chunks(h)):
                z_t = ops.product(ops.transposed(k2_smem.at[slot], k2_t, cols), ds_t, (CHUNK, rows))
                k1c = ops.load(k1_smem, (slot, i, cols[1]), ops.rows_vec).astype(_F32)
                out.append(acc + z_t * ops.row_bcast(k1c, z_t.shape))
                z_t = z_t * ops.load_t(q_wg, cols)
                ops.add_row(pk_wg, (a - base, cols[1]), z_t.sum(axis=1))
            p_t = ops.operand_t(p, ds_wg)  # (the products reading dSᵀ are done)
            for cols in chunks(hv):
                w_t = ops.product(ops.transposed(v2_smem.at[slot], v2_t, cols), p_t, (CHUNK, rows))
                w_t = w_t * ops.load_t(do_wg, cols)
                ops.add_row(pv_wg, (a - base, cols[1]), w_t.sum(axis=1))
            return tuple(out)

        full = fwd.unmasked_pairs(cfg, p0, p1, bk2)

        def step_body(step, dq):
            slot = lax.rem(step, jnp.int32(cfg.steps))
            a0, b0 = step_tiles(step)
            plgpu.barrier_wait(load_bars.at[slot])
            body = first_key_fused if cfg.fuse else first_key

            def run(masked):
                return lambda a, dq: body(slot, a, a - a0, b0, masked, dq)

            a_end = jnp.minimum(a0 + bk1, a_hi)
            dq = fwd.masked_and_unmasked(full, a0, a_end, b0, bk2, run, dq)
            plgpu.barrier_arrive(free_bars.at[slot])
            return dq

        # dQ (fused: dQᵀ in `CHUNK`-row pieces), scaled into q's shared-memory rows
        dq_shape, pieces = ((CHUNK, rows), h // CHUNK) if cfg.fuse else ((rows, h), 1)
        zero = ops.layout(jnp.zeros(dq_shape, _F32), ops.wgmma)
        dq = lax.fori_loop(jnp.int32(0), n_steps, step_body, (zero,) * pieces)
        if cfg.fuse:
            for acc, cols in zip(dq, chunks(h)):
                ops.store_t(q_wg, cols, acc * cfg.scale)
        else:
            q_wg[...] = (dq[0] * cfg.scale).astype(q_wg.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_wg, dq_ref.at[bk, pl.ds(r0, rows)])
        if cfg.fuse:
            part = pl.ds((qi * cfg.wgs + wg) * cfg.span, cfg.span)
            plgpu.copy_smem_to_gmem(pk_wg, pk_ref.at[bk, part])
            plgpu.copy_smem_to_gmem(pv_wg, pv_ref.at[bk, part])
        plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------------------------
# dK/dV of the stationary set `side`. Refs: q/do [BK, nq·R, H|Hv], lse/delta [BK, nq·R],
# qt/dot [BK, H|Hv, nq·R] (interpret mode; else None), ks/vs [BK, Ssp, H|Hv], bias_s
# [B, Ssp], kt/vt [BK, Stp, H|Hv], bias_t [B, Stp]; out dks/dvs [BK, Ssp, H|Hv].


def _dkv_kernel(cfg: _Config, side: int, q_ref, do_ref, l_ref, d_ref, qt_ref, dot_ref, ks_ref,
                vs_ref, bs_ref, kt_ref, vt_ref, bt_ref, dks_ref, dvs_ref, ks_smem, vs_smem,
                bs_smem, xq_smem, xd_smem, xqt_smem, xdt_smem, p_smem, ds_smem, q_smem, do_smem,
                l_smem, d_smem, qt_smem, dot_smem, kt_smem, vt_smem, bt_smem, key_bar, load_bars,
                free_bars):  # fmt: skip
    ops = _Ops(cfg, q_ref.dtype)
    plgpu = ops.plgpu
    bkt, kw, rows = DKV_BLOCK_K, _KEYS_PER_WG, cfg.rows
    ws, wt = cfg.window(side), cfg.window(1 - side)
    st = cfg.length(1 - side)
    bk = lax.axis_index("bk")
    kj = lax.axis_index("k")
    wg = lax.axis_index("wg")
    batch = lax.div(bk, jnp.int32(cfg.kv_heads))
    c0 = kj * (cfg.wgs * kw)
    qi_lo, qi_hi = spine.query_tile_range(
        c0, c0 + cfg.wgs * kw - 1, cfg.nq_pos, cfg.bq, cfg.causal, ws
    )
    qi_lo, qi_hi = (jnp.asarray(x, jnp.int32) * cfg.splits for x in (qi_lo, qi_hi))
    interpret_t = qt_ref is not None

    def first_position(qi):
        return (lax.div(qi, jnp.int32(cfg.splits)) if cfg.splits > 1 else qi) * cfg.bq

    def streamed(qi):
        """The streamed keys `[lo, hi)` row tile `qi` may see, and their tiles."""
        p0 = first_position(qi)
        lo, hi = spine.key_range(p0, p0 + cfg.bq - 1, st, cfg.causal, wt)
        lo, hi = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
        return lo, hi, lax.div(jnp.maximum(hi - lo, 0) + bkt - 1, jnp.int32(bkt))

    def steps_of(body, carry):
        """`body(step, qi, a0, a_hi, carry)` over the steps (query tile, streamed tile) in
        order; the carry's first element counts the steps."""

        def q_body(qi, carry):
            lo, hi, n = streamed(qi)
            return lax.fori_loop(
                jnp.int32(0), n, lambda t, c: body(c[0], qi, lo + t * bkt, hi, c), carry
            )

        return lax.fori_loop(qi_lo, qi_hi, q_body, carry)

    @pl.when(wg == cfg.wgs)
    def _producer():
        plgpu.set_max_registers(fwd._PRODUCER_REGISTERS, action="decrease")

        def load(step, qi, a0, a_hi, carry):
            del a_hi
            slot = lax.rem(step, jnp.int32(cfg.steps))
            fwd.wait_for_slot(cfg.steps, step, free_bars)

            r0 = qi * rows
            copies = [
                (q_ref.at[bk, pl.ds(r0, rows)], q_smem),
                (do_ref.at[bk, pl.ds(r0, rows)], do_smem),
                (l_ref.at[bk, pl.ds(r0, rows)], l_smem),
                (d_ref.at[bk, pl.ds(r0, rows)], d_smem),
                (kt_ref.at[bk, pl.ds(a0, bkt)], kt_smem),
                (vt_ref.at[bk, pl.ds(a0, bkt)], vt_smem),
                (bt_ref.at[batch, pl.ds(a0, _BIAS_COPY)], bt_smem),
            ]
            if interpret_t:
                copies += [
                    (qt_ref.at[bk, :, pl.ds(r0, rows)], qt_smem),
                    (dot_ref.at[bk, :, pl.ds(r0, rows)], dot_smem),
                ]
            for src, dst in copies:
                plgpu.copy_gmem_to_smem(src, dst.at[slot], load_bars.at[slot])
            return (step + 1,) + carry[1:]

        (n_steps,) = steps_of(load, (jnp.int32(0),))
        fwd.drain(cfg.steps, n_steps, free_bars)

    @pl.when(wg < cfg.wgs)
    def _consumer():
        plgpu.set_max_registers(fwd._consumer_registers(cfg.wgs), action="increase")
        h, hv = q_ref.shape[-1], do_ref.shape[-1]
        k0 = c0 + wg * kw
        ks_wg, vs_wg, bs_wg = (s.at[wg] for s in (ks_smem, vs_smem, bs_smem))
        for src, dst in ((ks_ref.at[bk], ks_wg), (vs_ref.at[bk], vs_wg)):
            plgpu.copy_gmem_to_smem(src.at[pl.ds(k0, kw)], dst, key_bar.at[wg])
        plgpu.copy_gmem_to_smem(bs_ref.at[batch, pl.ds(k0, kw)], bs_wg, key_bar.at[wg])
        plgpu.barrier_wait(key_bar.at[wg])
        bias_s = ops.load(bs_wg, (), ops.rows_vec)
        xq_wg, xd_wg = xq_smem.at[wg], xd_smem.at[wg]
        xqt_wg, xdt_wg = (None if x is None else x.at[wg] for x in (xqt_smem, xdt_smem))
        p_wg, ds_wg = (None,) * 2 if cfg.registers else (p_smem.at[wg], ds_smem.at[wg])
        shape = (kw, rows)

        def iota(dim):
            return ops.layout(lax.broadcasted_iota(jnp.int32, shape, dim), ops.wgmma)

        def streamed_key(slot, qi, a, i, carry):
            """Streamed key `a` (row `i` of the step's tile) against the stationary keys and
            the step's query rows. The row tiles scaled by `a`'s key and value, `xq = q ∘
            k_t[a]` and `xd = dO ∘ v_t[a]`, serve two products each from shared memory:
            `Sᵀ = k_s @ xqᵀ`, `dK_s += dSᵀ @ xq`, `dPᵀ = v_s @ xdᵀ`, `dV_s += Pᵀ @ xd`, so
            the gradients accumulate in wgmma's own registers."""
            dk, dv = carry
            q_t, do_t = (None,) * 2
            if interpret_t:
                q_t, do_t = qt_smem.at[slot], dot_smem.at[slot]
            xq, xq_t = ops.scaled_rows(q_smem.at[slot], kt_smem.at[slot, i], xq_wg, q_t, xqt_wg)
            xd, xd_t = ops.scaled_rows(do_smem.at[slot], vt_smem.at[slot, i], xd_wg, do_t, xdt_wg)
            s_t = ops.product(ks_wg, xq_t, shape)  # Sᵀ [keys, rows]
            if cfg.key_masks:  # (padded stationary keys' rows are dropped; streamed keys
                # stay within `key_range`)
                s_t = s_t + ops.row_bcast(bias_s + bt_smem[slot, i], shape)
            if cfg.causal:
                pos = first_position(qi) + lax.rem(iota(1), jnp.int32(cfg.bq))
                ok = spine.allowed(pos, k0 + iota(0), cfg.causal, ws)
                s_t = fwd._masked(ok & spine.allowed(pos, a, cfg.causal, wt), s_t)
            lse = ops.load(l_smem, slot, ops.cols_vec)
            # P in the input dtype (half the registers; it is a wgmma operand in that dtype)
            p_t = jnp.exp2(s_t - ops.col_bcast(lse, shape)).astype(ops.dtype)
            p_op = ops.operand(p_t, p_wg)
            dv, dp_t = ops.accumulate_and_product(dv, p_op, xd, vs_wg, xd_t, shape)
            delta = ops.load(d_smem, slot, ops.cols_vec)
            ds_t = p_t.astype(_F32) * (dp_t - ops.col_bcast(delta, shape))
            dk = ops.accumulate(dk, ops.operand(ds_t, ds_wg), xq)
            return dk, dv

        def step(step, qi, a0, a_hi, carry):
            slot = lax.rem(step, jnp.int32(cfg.steps))
            plgpu.barrier_wait(load_bars.at[slot])
            acc = lax.fori_loop(
                a0, jnp.minimum(a0 + bkt, a_hi),
                lambda a, acc: streamed_key(slot, qi, a, a - a0, acc), carry[1:],
            )  # fmt: skip
            plgpu.barrier_arrive(free_bars.at[slot])
            return (step + 1, *acc)

        zeros = [ops.layout(jnp.zeros((kw, d), _F32), ops.wgmma) for d in (h, hv)]
        _, dk, dv = steps_of(step, (jnp.int32(0), *zeros))
        ks_wg[...] = (dk * _LN2).astype(ks_wg.dtype)
        vs_wg[...] = dv.astype(vs_wg.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ks_wg, dks_ref.at[bk, pl.ds(k0, kw)])
        plgpu.copy_smem_to_gmem(vs_wg, dvs_ref.at[bk, pl.ds(k0, kw)])
        plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------------------------
# The kernels' calls, shared memory, and the layout.


def _kwargs(cfg: _Config) -> dict:
    """Interpret mode, or the compiler's parameters. No reduction scratch: the backward's
    sums run along a tile's rows, within a warp."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if cfg.interpret:
        return {"interpret": fwd._interpret_params()}
    return {"compiler_params": plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0)}


def _dq_scratch(cfg: _Config, h: int, hv: int, dtype) -> list:
    """The dQ kernel's shared memory and barriers."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, wgs, steps, bk1, bk2 = cfg.wg_rows, cfg.wgs, cfg.steps, cfg.bk1, DQ_BLOCK_K2

    def smem(shape, when=True):
        return fwd.swizzled(shape, dtype) if when else None

    stored = not cfg.registers  # wgmma first operands stored by the consumers
    ds = (wgs, bk2, rows) if cfg.interpret and cfg.fuse else (wgs, rows, bk2)
    return [
        smem((wgs, rows, h)),  # q, then dQ
        smem((wgs, rows, hv)),  # dO
        plgpu.SMEM((wgs, rows), _F32),  # lse
        plgpu.SMEM((wgs, rows), _F32),  # delta
        smem((wgs, rows, h), stored),  # x = q ∘ k1[a]
        smem((wgs, rows, hv), stored),  # y = dO ∘ v1[a]
        # dS (fused: dS, then P; in interpret mode their transposes)
        smem(ds, stored or cfg.fuse),
        plgpu.SMEM((wgs, cfg.span, h), _F32) if cfg.fuse else None,  # dK1 partial sums
        plgpu.SMEM((wgs, cfg.span, hv), _F32) if cfg.fuse else None,  # dV1 partial sums
        plgpu.SMEM((steps, bk1, h), dtype),  # k1 tile (rows read one at a time)
        plgpu.SMEM((steps, bk1, hv), dtype),  # v1 tile
        plgpu.SMEM((steps, max(bk1, _BIAS_COPY)), _F32),  # bias1
        smem((steps, bk2, h)),  # k2 tile
        smem((steps, bk2, hv)),  # v2 tile
        plgpu.SMEM((steps, bk2), _F32),  # bias2
        smem((steps, h, bk2), cfg.interpret),  # k2ᵀ (interpret mode)
        smem((steps, hv, bk2), cfg.interpret),  # v2ᵀ
        plgpu.Barrier(num_arrivals=4, num_barriers=wgs),
        plgpu.Barrier(num_arrivals=8 if cfg.interpret else 6, num_barriers=steps),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=steps),
    ]


def _dq_call(cfg: _Config, bk: int, h: int, hv: int, dtype):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    parts = (bk, cfg.nq * cfg.wgs * cfg.span) if cfg.fuse else None
    return plgpu.kernel(
        fwd.named("tensor_attention_dq" + ("_dk1_dv1" if cfg.fuse else ""), _dq_kernel, cfg),
        out_type=[
            jax.ShapeDtypeStruct((bk, cfg.nq * cfg.rows, h), dtype),
            jax.ShapeDtypeStruct((*parts, h), _F32) if cfg.fuse else None,
            jax.ShapeDtypeStruct((*parts, hv), _F32) if cfg.fuse else None,
        ],
        grid=(bk, cfg.nq),
        grid_names=("bk", "q"),
        num_threads=cfg.wgs + 1,
        thread_name="wg",
        scratch_types=_dq_scratch(cfg, h, hv, dtype),
        **_kwargs(cfg),
    )


def _dkv_scratch(cfg: _Config, h: int, hv: int, dtype) -> list:
    """The dK/dV kernel's shared memory and barriers."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, kw, steps, bkt, wgs = cfg.rows, _KEYS_PER_WG, cfg.steps, DKV_BLOCK_K, cfg.wgs

    def smem(shape, when=True):
        return fwd.swizzled(shape, dtype) if when else None

    stored = not cfg.registers
    return [
        smem((wgs, kw, h)),  # stationary keys, then dK
        smem((wgs, kw, hv)),  # stationary values, then dV
        plgpu.SMEM((wgs, kw), _F32),  # their bias
        smem((wgs, rows, h)),  # xq = q ∘ k_t[a]
        smem((wgs, rows, hv)),  # xd = dO ∘ v_t[a]
        smem((wgs, h, rows), cfg.interpret),  # xqᵀ (interpret mode)
        smem((wgs, hv, rows), cfg.interpret),  # xdᵀ
        smem((wgs, kw, rows), stored),  # Pᵀ
        smem((wgs, kw, rows), stored),  # dSᵀ
        smem((steps, rows, h)),  # q tile
        smem((steps, rows, hv)),  # dO tile
        plgpu.SMEM((steps, rows), _F32),  # lse
        plgpu.SMEM((steps, rows), _F32),  # delta
        smem((steps, h, rows), cfg.interpret),  # qᵀ (interpret mode)
        smem((steps, hv, rows), cfg.interpret),  # dOᵀ
        plgpu.SMEM((steps, bkt, h), dtype),  # streamed keys (rows read one at a time)
        plgpu.SMEM((steps, bkt, hv), dtype),  # streamed values
        plgpu.SMEM((steps, max(bkt, _BIAS_COPY)), _F32),  # their bias
        plgpu.Barrier(num_arrivals=3, num_barriers=wgs),
        plgpu.Barrier(num_arrivals=9 if cfg.interpret else 7, num_barriers=steps),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=steps),
    ]


def _dkv_call(cfg: _Config, side: int, bk: int, padded: int, h: int, hv: int, dtype):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.kernel(
        fwd.named(f"tensor_attention_dk{side + 1}_dv{side + 1}", _dkv_kernel, cfg, side),
        out_type=[
            jax.ShapeDtypeStruct((bk, padded, h), dtype),
            jax.ShapeDtypeStruct((bk, padded, hv), dtype),
        ],
        grid=(bk, padded // (cfg.wgs * _KEYS_PER_WG)),
        grid_names=("bk", "k"),
        num_threads=cfg.wgs + 1,
        thread_name="wg",
        scratch_types=_dkv_scratch(cfg, h, hv, dtype),
        **_kwargs(cfg),
    )


def smem_bytes(plan_: Plan, h: int, hv: int, dtype) -> dict[str, int]:
    """Shared memory of each kernel (bytes), from its scratch list as Pallas lays it out."""
    dq = fwd.scratch_bytes(_dq_scratch(plan_.dq, h, hv, dtype), reductions=False)
    dkv = fwd.scratch_bytes(_dkv_scratch(plan_.kv, h, hv, dtype), reductions=False)
    return {"dq": dq, "dkv": dkv}


def check(plan_: Plan, h: int, hv: int, dtype) -> None:
    """Raises `Unsupported` for tiles the backward kernels cannot take."""
    if plan_.dq.fuse and not (plan_.dq.causal and plan_.dq.w1 is not None):
        raise spine.Unsupported(
            "bwd_fuse_k1=True needs a causal window on the first key set (the smaller window "
            "once the sets are ordered)"
        )
    rows = plan_.kv.rows
    if rows % 64 or rows > fwd._MAX_WGMMA_N:
        raise spine.Unsupported(
            f"the Mosaic GPU backward's dK/dV kernel needs query tiles of 64 to "
            f"{fwd._MAX_WGMMA_N} rows in multiples of 64; G={plan_.kv.group} gives {rows}"
        )
    for name, need in smem_bytes(plan_, h, hv, dtype).items():
        if need > fwd._SMEM_BYTES:
            raise spine.Unsupported(
                f"the Mosaic GPU backward's {name} kernel needs {need} bytes of shared memory "
                f"(> {fwd._SMEM_BYTES}) at H={h}, Hv={hv} with {plan_.dq.rows}-row query tiles"
            )


def backward(plan_: Plan, res, d_out):
    """The five gradients `(dq, dk1, dk2, dv1, dv2, None, None)` from the forward's residuals
    `(q, k1, k2, v1, v2, valid1, valid2, out, lse)` (base-2 `lse [B,T,N,1]`)."""
    q, k1, k2, v1, v2, valid1, valid2, out, lse = res
    cfg = plan_.dq
    dtype = jnp.result_type(q, k1, k2, v1, v2)
    b, _, _, h = q.shape
    hv = v1.shape[-1]
    bk = b * cfg.kv_heads
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
    q_s = (q.astype(_F32) * (cfg.scale * fwd._LOG2E)).astype(dtype)

    def rows_in(cfg):
        """q (scaled), dO, lse and delta in `cfg`'s row tiles."""
        rows = functools.partial(pallas._rows_layout, cfg=cfg)
        return rows(q_s), rows(d_out.astype(dtype)), rows(lse)[..., 0], rows(delta)[..., 0]

    def keys(k, v, valid, padded):
        return (
            fwd._key_rows(k.astype(dtype), padded),
            fwd._key_rows(v.astype(dtype), padded),
            fwd._bias(valid, padded),
        )

    s1p = _streamed_pad(cfg.s1, max(cfg.bk1, _BIAS_COPY))
    s2p = -(-cfg.s2 // DQ_BLOCK_K2) * DQ_BLOCK_K2
    set1, set2 = keys(k1, v1, valid1, s1p), keys(k2, v2, valid2, s2p)
    t2 = (set2[0].transpose(0, 2, 1), set2[1].transpose(0, 2, 1)) if cfg.interpret else (None,) * 2
    dq_t, pk, pv = _dq_call(cfg, bk, h, hv, dtype)(*rows_in(cfg), *set1, *set2, *t2)
    dq = dq_t.reshape(b, cfg.kv_heads, cfg.nq, cfg.rows, h)
    dq = spine.merge_row_tiles(dq, cfg.t, cfg.bq).astype(q.dtype)
    grads = {}
    if cfg.fuse:  # partial sums per (query tile, warpgroup): folded as head chunks
        chunks = dataclasses.replace(cfg, splits=cfg.wgs)
        fold = functools.partial(pallas._fold_partials, cfg=chunks)
        grads[0] = (spine.merge_key_tiles(fold(pk) * _LN2, k1), spine.merge_key_tiles(fold(pv), v1))

    cfg = plan_.kv
    kv_rows = rows_in(cfg)
    transposes = (None, None)
    if cfg.interpret:
        transposes = (kv_rows[0].transpose(0, 2, 1), kv_rows[1].transpose(0, 2, 1))
    sets = ((k1, v1, valid1), (k2, v2, valid2))
    for side in (0, 1):
        if side in grads:
            continue
        stationary, streamed = sets[side], sets[1 - side]
        ssp = _stationary_pad(cfg, cfg.length(side))
        stp = _streamed_pad(cfg.length(1 - side), max(DKV_BLOCK_K, _BIAS_COPY))
        dks, dvs = _dkv_call(cfg, side, bk, ssp, h, hv, dtype)(
            *kv_rows, *transposes, *keys(*stationary, ssp), *keys(*streamed, stp)
        )
        grads[side] = (
            spine.merge_key_tiles(dks, stationary[0]),
            spine.merge_key_tiles(dvs, stationary[1]),
        )
    (dk1, dv1), (dk2, dv2) = grads[0], grads[1]
    return dq, dk1, dk2, dv1, dv2, None, None
