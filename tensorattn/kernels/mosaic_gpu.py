"""Exact order-3 tensor attention forward as a Pallas **Mosaic GPU** kernel (Hopper).

Design (after FBGEMM's 2-simplicial kernel; docs/pallas.md "Mosaic GPU forward"): a program
owns `R = G·block_q` rows (the `G` query heads of one key/value group times `block_q`
positions), split over `num_compute_wgs` consumer warpgroups of 64 or 128 rows. The key sets
are ordered so that the first one has the smaller window (`pallas.ordered_key_sets`). A
producer warpgroup streams *steps* through `max_concurrent_steps` shared-memory slots with TMA:
a step is (a tile of `block_k1` first keys, a tile of `block_k2` second keys) and loads
`k1, v1, bias1` (`block_k1` rows), `k2ᵀ [H, block_k2]`, `v2, bias2`. For each first key `a` of
the step, a consumer forms `x = q ∘ k1[a]`, `S = x @ k2ᵀ` (wgmma, float32), adds the masks
(causal / window from positions, key padding as a 0 / -inf bias), runs the base-2 online
softmax and accumulates `acc = α·acc + v1[a] ∘ (P @ v2)` (second wgmma); `q`, `x` and `P`
stay in registers (wgmma's register operand). `tau·log2 e` is folded into `q` and the kernel
saves the base-2 log-sum-exp (`m + log2 l`, 0 for rows with no allowed pair), the residual the
portable Pallas backward (`pallas.backward`) consumes, so the gradient is that of
`implementation="pallas"`.

The same kernel source runs compiled (CUDA, sm_90a) and in Mosaic GPU's interpret mode on
CPU (`MosaicGPUConfig(interpret=True)`). The interpreter reads wgmma operands from shared
memory only, so there `q`, `x` and `P` live in shared memory (stored, then fenced), the layout
`register_operands=False` also selects when compiled; accumulators are `run_scoped` wgmma refs
(jax 0.10's interpreter has no `run_state`); layout casts are hints that interpret mode skips.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tensorattn.kernels import mosaic_gpu_bwd, pallas, spine
from tensorattn.kernels.configs import MosaicGPUConfig, PallasConfig
from tensorattn.kernels.spine import AttentionSpec

_F32 = jnp.float32
_LOG2E = math.log2(math.e)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# wgmma tiles: 64 rows per warpgroup instruction; 128-byte swizzle needs 64 16-bit columns.
_WG_ROWS = 64
_MINOR = 64
_MAX_WG_ROWS = 128
_MAX_WGMMA_N = 256  # columns of one wgmma product (Hv for P @ v2, block_k2 for x @ k2ᵀ)
# Shared memory per block on an H100 (227 KiB), less a margin for barriers and alignment.
_SMEM_BYTES = 227 * 1024 - 1024

# Defaults (MosaicGPUConfig fields left at None); not yet tuned on a GPU. Rows: two compute
# warpgroups of 64 rows when compiled, so that one's softmax can overlap the other's wgmma
# (one program per SM: the register split assumes the whole register file); one in interpret
# mode (more simulated warpgroups than cores can hang the interpreter, docs/pallas.md).
DEFAULT_ROWS = 128
INTERPRET_ROWS = 64
DEFAULT_BLOCK_K1 = 32
DEFAULT_BLOCK_K2 = 64
DEFAULT_STEPS = 2


@dataclasses.dataclass(frozen=True)
class _Config(spine.CallView):
    """Static description of one forward call: the call and its tiles."""

    call: spine.Call
    bq: int
    bk1: int
    bk2: int
    wgs: int
    steps: int
    interpret: bool
    registers: bool  # wgmma's first operands (x, P) from registers, not shared memory
    schedule: bool  # the two compute warpgroups alternate (FA3 ping-pong)
    key_masks: bool = True  # the call has a key padding mask (see `needs_key_bias`)

    @property
    def wg_rows(self) -> int:
        return self.rows // self.wgs

    @property
    def s1_pad(self) -> int:
        # First-key tiles start at each program's first allowed key (not tile-aligned); TMA
        # needs GMEM row strides that are multiples of 16 bytes (the float32 bias rows).
        return -(-(self.s1 + self.bk1) // 64) * 64

    @property
    def s2_pad(self) -> int:
        return -(-self.s2 // self.bk2) * self.bk2

    @property
    def biased(self) -> bool:
        return needs_key_bias(self, self.bk2)


def needs_key_bias(cfg, block_k2: int) -> bool:
    """Whether a kernel's scores need the 0/-inf key biases, for `cfg` (a config with
    `key_masks`) and second-key tiles of `block_k2`: only with a key mask, or a second-key tile
    past the end of a non-causal call. First keys stay within `key_range`, and a causal call's
    padding keys come after every query position, so its causal mask covers them."""
    return cfg.key_masks or (not cfg.causal and cfg.s2 % block_k2 != 0)


# Interpret mode for calls whose MosaicGPUConfig.interpret is None.
INTERPRET_ENV = "TENSORATTN_MOSAIC_GPU_INTERPRET"


def positions_for_rows(group: int, target: int) -> int:
    """The fewest query positions whose `group·positions` rows fill whole 64-row warpgroup
    tiles and number at least `target`."""
    unit = _WG_ROWS // math.gcd(group, _WG_ROWS)
    return unit * -(-max(1, target // group) // unit)


def _plan(call: spine.Call, config: MosaicGPUConfig) -> _Config:
    """The forward's tiles: `config`'s fields, None ones chosen here. Rows: the smallest
    multiple of 64 that holds `block_q` whole positions of the group (`G·block_q`) and at
    least `DEFAULT_ROWS` rows (`INTERPRET_ROWS` in interpret mode)."""
    g = call.group
    interpret = spine.env_flag(INTERPRET_ENV) if config.interpret is None else config.interpret
    if config.block_q:
        bq = config.block_q
    else:
        bq = positions_for_rows(g, INTERPRET_ROWS if interpret else DEFAULT_ROWS)
    rows = g * bq
    if config.num_compute_wgs:
        wgs = config.num_compute_wgs
    elif rows <= 2 * _WG_ROWS:
        wgs = max(1, rows // _WG_ROWS)
    else:
        wgs = rows // _MAX_WG_ROWS if rows % _MAX_WG_ROWS == 0 else rows // _WG_ROWS
    bk2 = config.block_k2 or DEFAULT_BLOCK_K2
    bk1 = config.block_k1 or DEFAULT_BLOCK_K1
    registers = not interpret if config.register_operands is None else config.register_operands
    steps = config.max_concurrent_steps or DEFAULT_STEPS
    schedule = config.schedule_barrier
    if schedule is None:
        schedule = wgs == 2 and steps >= 2 and not interpret
    return _Config(
        call=call,
        bq=bq,
        bk1=bk1,
        bk2=bk2,
        wgs=wgs,
        steps=steps,
        interpret=interpret,
        registers=registers,
        schedule=schedule,
    )


# Registers per thread: the producer, which only issues TMA copies, gives its share to the
# consumers (64K per block). 24 and 240 with two consumer warpgroups, as FA3; against 40 and
# 232, ptxas spills less in the backward's loops (experiments.mosaic_registers, docs/pallas.md).
_PRODUCER_REGISTERS = 24
_MAX_CONSUMER_REGISTERS = 240


def _consumer_registers(wgs: int) -> int:
    """Per-thread registers of `wgs` consumer warpgroups beside the producer (a multiple of 8,
    at most 240; 65536 per block, 128 threads per warpgroup)."""
    return min(_MAX_CONSUMER_REGISTERS, (65536 // 128 - _PRODUCER_REGISTERS) // wgs // 8 * 8)


# ---------------------------------------------------------------------------------------------
# The kernel. Refs (GMEM): q/o [BK, nq·R, H|Hv], k1/v1 [BK, S1p, H|Hv], k2t [BK, H, S2p],
# v2 [BK, S2p, Hv], bias1/bias2 [B, S1p|S2p] float32 (0 valid, -inf padding), lse [BK, nq·R].


@functools.cache
def _load_needs_index(load) -> bool:
    """Whether `plgpu.load` requires its index argument (jax 0.10; 0.11 deprecates it, 0.12
    has none)."""
    idx = inspect.signature(load).parameters.get("idx")
    return idx is not None and idx.default is inspect.Parameter.empty


def _load_view(plgpu, view, layout):
    """`plgpu.load` of a whole (already indexed) ref view, on jax 0.10 to 0.12."""
    index = ((),) if _load_needs_index(plgpu.load) else ()
    return plgpu.load(view, *index, layout=layout)


def wait_for_slot(steps: int, step, free_bars):
    """Before loading pipeline step `step`: wait until the consumers released its slot
    (`step % steps`), unless it is one of the first `steps`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @pl.when(step >= steps)
    def _():
        plgpu.barrier_wait(free_bars.at[lax.rem(step, jnp.int32(steps))])


def drain(steps: int, n_steps, free_bars):
    """After the last load: wait for the consumers to release the last slots too, so that
    every phase of each barrier is observed (the interpreter checks it; no step is left in
    flight)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(step, carry):
        plgpu.barrier_wait(free_bars.at[lax.rem(step, jnp.int32(steps))])
        return carry

    lax.fori_loop(jnp.maximum(n_steps - steps, 0), n_steps, body, jnp.int32(0))


def produce(steps: int, n_steps, load_step, free_bars):
    """A producer's loop: `load_step(step, slot)` for each of `n_steps` steps into slot
    `step % steps` once it is free, then `drain`."""

    def body(step, carry):
        wait_for_slot(steps, step, free_bars)
        load_step(step, lax.rem(step, jnp.int32(steps)))
        return carry

    lax.fori_loop(jnp.int32(0), n_steps, body, jnp.int32(0))
    drain(steps, n_steps, free_bars)


def _masked(ok, s):
    """`s` where `ok`, else -inf. `ok` is the Python bool True when nothing constrains the pair
    (`spine.allowed`): then `s` as is (Mosaic GPU's warpgroup lowering has no implicit broadcast
    in `select`, jax 0.11)."""
    if ok is True:
        return s
    return jnp.where(ok, s, jnp.full(s.shape, -jnp.inf, s.dtype))


def unmasked_pairs(cfg, p0, p1, bk2: int):
    """The pairs every row of positions `p0..p1` may see, which need no position mask: first
    keys `[af_lo, af_hi)` with second-key tiles (of `bk2` keys) `[jf_lo, jf_hi)`; None
    without a causal mask (windows imply one), where every pair is unmasked."""
    if not cfg.causal:
        return None
    af_lo, af_hi = spine.full_range(p0, p1, True, cfg.w1)
    bf_lo, bf_hi = spine.full_range(p0, p1, True, cfg.w2)
    jf_lo = lax.div(jnp.int32(bf_lo) + bk2 - 1, jnp.int32(bk2))
    return af_lo, af_hi, jf_lo, lax.div(bf_hi, jnp.int32(bk2))


def masked_and_unmasked(full, a0, a_end, b0, bk2: int, run, carry):
    """A pipeline step's first keys `[a0, a_end)` against its second-key tile at `b0`: the
    unmasked ones `[lo, hi)` (`full`, from `unmasked_pairs`; none unless the tile is full) in
    one loop of `run(False)`, the masked ones before and after them in one loop of
    `run(True)` (`run(masked)`: a loop body `(a, carry) -> carry`)."""
    if full is None:
        return lax.fori_loop(a0, a_end, run(False), carry)
    af_lo, af_hi, jf_lo, jf_hi = full
    j = lax.div(b0, jnp.int32(bk2))
    inside = (j >= jf_lo) & (j < jf_hi)
    lo = jnp.where(inside, jnp.clip(af_lo, a0, a_end), a_end)
    hi = jnp.where(inside, jnp.clip(af_hi, lo, a_end), a_end)
    front = lo - a0

    def edge(k, carry):
        return run(True)(jnp.where(k < front, a0 + k, hi + k - front), carry)

    carry = lax.fori_loop(jnp.int32(0), front + a_end - hi, edge, carry)
    return lax.fori_loop(lo, hi, run(False), carry)


def _kernel(cfg: _Config, q_ref, k1_ref, v1_ref, b1_ref, k2t_ref, v2_ref, b2_ref, o_ref, l_ref,
            q_smem, o_smem, x_smem, p_smem, lse_smem, k1_smem, v1_smem, b1_smem, k2_smem, v2_smem,
            b2_smem, q_bar, load_bars, free_bars, sched_bar):  # fmt: skip
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layout = (lambda x, _: x) if cfg.interpret else plgpu.layout_cast

    def load(ref, idx, layout_):
        """`ref[idx]` as an array in `layout_` (interpret mode: a plain read)."""
        return ref[idx] if cfg.interpret else _load_view(plgpu, ref.at[idx], layout_)

    wgmma_layout = plgpu.Layout.WGMMA
    row_layout, col_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)

    bk = lax.axis_index("bk")
    qi = lax.axis_index("q")
    wg = lax.axis_index("wg")
    batch = lax.div(bk, jnp.int32(cfg.kv_heads))
    p0 = qi * cfg.bq
    p1 = p0 + cfg.bq - 1
    a_lo, a_hi = spine.key_range(p0, p1, cfg.s1, cfg.causal, cfg.w1)
    j_lo, j_hi = spine.tile_range(p0, p1, cfg.s2, cfg.bk2, cfg.causal, cfg.w2)
    a_lo, a_hi, j_lo, j_hi = (jnp.asarray(x, jnp.int32) for x in (a_lo, a_hi, j_lo, j_hi))
    n_j = jnp.maximum(j_hi - j_lo, 0)
    n_a = lax.div(jnp.maximum(a_hi - a_lo, 0) + cfg.bk1 - 1, jnp.int32(cfg.bk1))
    n_steps = n_a * n_j

    def step_tiles(step):
        """(first key of the step's k1 tile, first key of its k2 tile)."""
        ta = lax.div(step, n_j)
        j = j_lo + lax.rem(step, n_j)
        return a_lo + ta * cfg.bk1, j * cfg.bk2

    @pl.when(wg == cfg.wgs)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

        def load(step, slot):
            a0, b0 = step_tiles(step)
            bar = load_bars.at[slot]
            plgpu.copy_gmem_to_smem(k1_ref.at[bk, pl.ds(a0, cfg.bk1)], k1_smem.at[slot], bar)
            plgpu.copy_gmem_to_smem(v1_ref.at[bk, pl.ds(a0, cfg.bk1)], v1_smem.at[slot], bar)
            plgpu.copy_gmem_to_smem(b1_ref.at[batch, pl.ds(a0, cfg.bk1)], b1_smem.at[slot], bar)
            plgpu.copy_gmem_to_smem(k2t_ref.at[bk, :, pl.ds(b0, cfg.bk2)], k2_smem.at[slot], bar)
            plgpu.copy_gmem_to_smem(v2_ref.at[bk, pl.ds(b0, cfg.bk2)], v2_smem.at[slot], bar)
            plgpu.copy_gmem_to_smem(b2_ref.at[batch, pl.ds(b0, cfg.bk2)], b2_smem.at[slot], bar)

        produce(cfg.steps, n_steps, load, free_bars)

    @pl.when(wg < cfg.wgs)
    def _consumer():
        plgpu.set_max_registers(_consumer_registers(cfg.wgs), action="increase")
        rows, hv = cfg.wg_rows, o_ref.shape[-1]
        r0 = qi * cfg.rows + wg * rows
        o_smem_ = q_smem if o_smem is None else o_smem  # q's slot holds the output if it fits
        q_wg, o_wg, lse_wg = (s.at[wg] for s in (q_smem, o_smem_, lse_smem))
        x_wg, p_wg = (None, None) if cfg.registers else (x_smem.at[wg], p_smem.at[wg])
        plgpu.copy_gmem_to_smem(q_ref.at[bk, pl.ds(r0, rows)], q_wg, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        if cfg.registers:  # q stays in registers; x and P are wgmma's register operands
            q_reg = load(q_wg, (), wgmma_layout)

            def q_rows():
                return q_reg

            def operand(x, ref):
                del ref
                return x.astype(q_ref.dtype)
        else:  # q, x and P in shared memory (the interpreter has no register operands)

            def q_rows():
                return q_wg[...]

            def operand(x, ref):
                ref[...] = x.astype(ref.dtype)
                plgpu.commit_smem()
                return ref

        def iota(dim):
            return layout(lax.broadcasted_iota(jnp.int32, (rows, cfg.bk2), dim), wgmma_layout)

        def positions():
            """[rows, bk2] query position of each row (rows are (head in group, position)),
            formed where it is used rather than held across the loops (32 registers)."""
            return p0 + lax.rem(iota(0) + wg * rows, jnp.int32(cfg.bq))

        def schedule():
            """FA3's ping-pong: the two compute warpgroups meet here, so that one's softmax
            runs while the other's products hold the tensor cores (no-op when off)."""
            if cfg.schedule:
                plgpu.barrier_arrive(sched_bar)
                plgpu.barrier_wait(sched_bar)

        def attend(slot, a, i, b0, masked, carry):
            """One first key `a` (row `i` of the step's k1 tile) against the step's second-key
            tile at `b0`; `masked`: apply the causal/window masks (edge pairs only)."""
            m, denom, acc = carry
            # In the input dtype: the product of two 16-bit floats is exact in float32, so
            # one rounding either way (and half the registers of a float32 x).
            k1a = load(k1_smem, (slot, i), col_layout)
            x = q_rows() * lax.broadcast_in_dim(k1a, (rows, q_wg.shape[-1]), [1])
            x_op = operand(x, x_wg)

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, x_op, k2_smem.at[slot])
                schedule()
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((rows, cfg.bk2), _F32))
            if cfg.biased:  # key masks and padding: 0 / -inf biases (b2 a column vector,
                # b1 one scalar per first key)
                bias = load(b2_smem, slot, col_layout) + b1_smem[slot, i]
                s = s + lax.broadcast_in_dim(bias, s.shape, [1])
            if masked:
                pos = positions()
                ok = spine.allowed(pos, b0 + iota(1), cfg.causal, cfg.w2)
                s = _masked(ok & spine.allowed(pos, a, cfg.causal, cfg.w1), s)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
            alpha = jnp.exp2(m - m_safe)
            denom = alpha * denom + p.sum(axis=1)
            p_op = operand(p, p_wg)
            schedule()

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p_op, v2_smem.at[slot])
                return acc_ref[...]

            w = pl.run_scoped(values, plgpu.ACC((rows, hv), _F32))
            v1a = load(v1_smem, (slot, i), col_layout).astype(_F32)
            acc = lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc + w * (
                lax.broadcast_in_dim(v1a, acc.shape, [1])
            )
            return m_new, denom, acc

        full = unmasked_pairs(cfg, p0, p1, cfg.bk2)

        def step_body(step, carry):
            slot = lax.rem(step, jnp.int32(cfg.steps))
            a0, b0 = step_tiles(step)
            a_end = jnp.minimum(a0 + cfg.bk1, a_hi)
            plgpu.barrier_wait(load_bars.at[slot])

            def run(masked):
                return lambda a, carry: attend(slot, a, a - a0, b0, masked, carry)

            carry = masked_and_unmasked(full, a0, a_end, b0, cfg.bk2, run, carry)
            plgpu.barrier_arrive(free_bars.at[slot])
            return carry

        init = (
            layout(jnp.full((rows,), -jnp.inf, _F32), row_layout),
            layout(jnp.zeros((rows,), _F32), row_layout),
            layout(jnp.zeros((rows, hv), _F32), wgmma_layout),
        )
        if cfg.schedule:  # offset the two warpgroups by one meeting (then alternate)
            pl.when(wg == 1)(schedule)
        m, denom, acc = lax.fori_loop(jnp.int32(0), n_steps, step_body, init)
        if cfg.schedule:
            pl.when(wg == 0)(schedule)
        nonempty = denom > 0
        l_safe = jnp.where(nonempty, denom, 1.0)
        out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        o_wg[...] = out.astype(o_wg.dtype)
        lse_wg[...] = jnp.where(nonempty, m + jnp.log2(l_safe), 0.0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_wg, o_ref.at[bk, pl.ds(r0, rows)])
        plgpu.copy_smem_to_gmem(lse_wg, l_ref.at[bk, pl.ds(r0, rows)])
        plgpu.wait_smem_to_gmem(0)


def swizzled(shape, dtype):
    """A shared-memory buffer of 16-bit tiles with the 128-byte swizzle wgmma reads."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiles = (plgpu.TilingTransform((8, _MINOR)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=tiles)


# Pallas Mosaic GPU aligns each scratch buffer to 1 KiB, and a kernel with any reduction gets
# 2 KiB of reduction scratch (`CompilerParams.reduction_scratch_bytes`' default).
_SMEM_ALIGN = 1024
REDUCTION_SCRATCH = 2048


def scratch_bytes(scratch, reductions: bool = True) -> int:
    """Shared memory of a kernel's scratch list as Pallas lays it out: each buffer rounded up
    to `_SMEM_ALIGN` bytes, 8 bytes per barrier, and the reduction scratch if `reductions`
    (an upper bound: checked against the lowering at 14 shapes, 2-4 KB above)."""
    total = REDUCTION_SCRATCH if reductions else 0
    for entry in scratch:
        if entry is None:
            continue
        if hasattr(entry, "shape"):
            size = math.prod(entry.shape) * jnp.dtype(entry.dtype).itemsize
            total += -(-size // _SMEM_ALIGN) * _SMEM_ALIGN
        else:  # a barrier group
            total += 8 * math.prod(entry.num_barriers)
    return total


def _scratch(cfg: _Config, h: int, hv: int, dtype) -> list:
    """The forward kernel's shared memory and barriers."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, wgs, steps = cfg.wg_rows, cfg.wgs, cfg.steps
    return [
        swizzled((wgs, rows, h), dtype),  # q, then the output if h == hv
        None if h == hv else swizzled((wgs, rows, hv), dtype),  # the output
        None if cfg.registers else swizzled((wgs, rows, h), dtype),  # x = q ∘ k1[a]
        None if cfg.registers else swizzled((wgs, rows, cfg.bk2), dtype),  # p
        plgpu.SMEM((wgs, rows), _F32),  # lse
        plgpu.SMEM((steps, cfg.bk1, h), dtype),  # k1 tile (rows read one at a time)
        plgpu.SMEM((steps, cfg.bk1, hv), dtype),  # v1 tile
        plgpu.SMEM((steps, cfg.bk1), _F32),  # bias1
        swizzled((steps, h, cfg.bk2), dtype),  # k2ᵀ tile
        swizzled((steps, cfg.bk2, hv), dtype),  # v2 tile
        plgpu.SMEM((steps, cfg.bk2), _F32),  # bias2
        plgpu.Barrier(num_barriers=wgs),
        plgpu.Barrier(num_arrivals=6, num_barriers=steps),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=steps),
        plgpu.Barrier(num_arrivals=2) if cfg.schedule else None,  # ping-pong of 2 warpgroups
    ]


def _call(cfg: _Config, bk: int, h: int, hv: int, dtype):
    """The `plgpu.kernel` of one call (grid `(B·K, nq)`, `wgs + 1` warpgroups)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    scratch = _scratch(cfg, h, hv, dtype)
    kwargs = {}
    if cfg.interpret:
        kwargs["interpret"] = _interpret_params()
    else:
        kwargs["compiler_params"] = plgpu.CompilerParams(approx_math=True)
    return plgpu.kernel(
        named("tensor_attention_forward", _kernel, cfg),
        out_type=[
            jax.ShapeDtypeStruct((bk, cfg.nq * cfg.rows, hv), dtype),
            jax.ShapeDtypeStruct((bk, cfg.nq * cfg.rows), _F32),
        ],
        grid=(bk, cfg.nq),
        grid_names=("bk", "q"),
        num_threads=cfg.wgs + 1,
        thread_name="wg",
        scratch_types=scratch,
        **kwargs,
    )


def named(name: str, body, *args):
    """`body(*args, *refs)` as a kernel body called `name` (the kernel's name in profiles and
    in ptxas' reports)."""

    def kernel(*refs):
        return body(*args, *refs)

    kernel.__name__ = name
    return kernel


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


# ---------------------------------------------------------------------------------------------
# Layout and the custom_vjp.


def _key_rows(x, padded: int):
    """`[B,S,K,X]` -> `[B·K, padded, X]` (zero padding)."""
    b, s, kv, d = x.shape
    x = jnp.pad(spine.split_keys(x), ((0, 0), (0, 0), (0, padded - s), (0, 0)))
    return x.reshape(b * kv, padded, d)


def _bias(valid, padded: int):
    """`[B,S]` validity -> `[B, padded]` float32 bias: 0 valid, -inf padding or masked."""
    bias = jnp.where(valid, 0.0, -jnp.inf).astype(_F32)
    return jnp.pad(bias, ((0, 0), (0, padded - valid.shape[1])), constant_values=-jnp.inf)


def _forward(cfg: _Config, q, k1, k2, v1, v2, valid1, valid2):
    """`(out [B,T,N,Hv], lse [B,T,N,1])` (base-2 log-sum-exp, 0 for empty rows)."""
    dtype = jnp.result_type(q, k1, k2, v1, v2)
    b, _, _, h = q.shape
    hv = v1.shape[-1]
    q_s = (q.astype(_F32) * (cfg.scale * _LOG2E)).astype(dtype)
    q_t = spine.row_tiles(q_s, cfg.kv_heads, cfg.bq).reshape(b * cfg.kv_heads, -1, h)
    k2t = _key_rows(k2.astype(dtype), cfg.s2_pad).transpose(0, 2, 1)
    out_t, lse_t = _call(cfg, b * cfg.kv_heads, h, hv, dtype)(
        q_t,
        _key_rows(k1.astype(dtype), cfg.s1_pad),
        _key_rows(v1.astype(dtype), cfg.s1_pad),
        _bias(valid1, cfg.s1_pad),
        k2t,
        _key_rows(v2.astype(dtype), cfg.s2_pad),
        _bias(valid2, cfg.s2_pad),
    )

    def merge(x):
        x = x.reshape(b, cfg.kv_heads, cfg.nq, cfg.rows, x.shape[-1])
        return spine.merge_row_tiles(x, cfg.t, cfg.bq)

    return merge(out_t).astype(q.dtype), merge(lse_t[..., None])


@dataclasses.dataclass(frozen=True)
class _Plan:
    fwd: _Config
    bwd: pallas.Plan | mosaic_gpu_bwd.Plan  # the Pallas backward or the Mosaic GPU one


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: _Plan, q, k1, k2, v1, v2, valid1, valid2):
    return _forward(plan.fwd, q, k1, k2, v1, v2, valid1, valid2)[0]


def _attend_fwd(plan: _Plan, q, k1, k2, v1, v2, valid1, valid2):
    out, lse = _forward(plan.fwd, q, k1, k2, v1, v2, valid1, valid2)
    return out, (q, k1, k2, v1, v2, valid1, valid2, out, lse)


def _attend_bwd(plan: _Plan, res, d_out):
    if isinstance(plan.bwd, pallas.Plan):
        return pallas.backward(plan.bwd, res, d_out)
    return mosaic_gpu_bwd.backward(plan.bwd, res, d_out)


_attend.defvjp(_attend_fwd, _attend_bwd)
_attend_cached = spine.cached(_attend)


# ---------------------------------------------------------------------------------------------
# Entry point.


def _check_shapes(q, keys, values, cfg: _Config) -> None:
    """Raises `Unsupported` for dtypes, head dims or tiles the kernel cannot take."""
    for x in (q, *keys, *values):
        if jnp.dtype(jnp.result_type(x)) not in _DTYPES:
            raise spine.Unsupported(
                f"dtype {jnp.result_type(x)} (the Mosaic GPU kernel takes bfloat16 or float16)"
            )
    h, hv = q.shape[-1], values[0].shape[-1]
    for name, size in (("H", h), ("Hv", hv), ("block_k2", cfg.bk2)):
        if size % _MINOR:
            raise spine.Unsupported(f"{name}={size} (the Mosaic GPU kernel needs multiples of 64)")
    for name, size in (("Hv", hv), ("block_k2", cfg.bk2)):
        if size > _MAX_WGMMA_N:
            raise spine.Unsupported(f"{name}={size} (a wgmma's N is at most {_MAX_WGMMA_N})")
    if cfg.rows % cfg.wgs or cfg.wg_rows % _WG_ROWS or cfg.wg_rows > _MAX_WG_ROWS:
        raise spine.Unsupported(
            f"{cfg.rows} rows per program (G={cfg.group} query heads x block_q={cfg.bq}) over "
            f"{cfg.wgs} compute warpgroups: each needs 64 or 128 rows"
        )
    if cfg.schedule and cfg.wgs != 2:
        raise spine.Unsupported(
            f"schedule_barrier=True with {cfg.wgs} compute warpgroups (it alternates two)"
        )
    if cfg.schedule and cfg.steps < 2:
        # The second warpgroup's last meeting of a step pairs with the first warpgroup's first
        # of the next step, which waits for that step's load, which waits for the one slot's
        # release by the second warpgroup: a deadlock.
        raise spine.Unsupported("schedule_barrier=True with max_concurrent_steps=1 (needs >= 2)")
    if cfg.bk1 % 8:
        raise spine.Unsupported(f"block_k1={cfg.bk1} (must be a multiple of 8)")
    if cfg.registers and cfg.interpret:
        raise spine.Unsupported(
            "register_operands=True in interpret mode (the Mosaic GPU interpreter reads wgmma "
            "operands from shared memory only)"
        )
    if (need := scratch_bytes(_scratch(cfg, h, hv, q.dtype))) > _SMEM_BYTES:
        raise spine.Unsupported(
            f"tiles need {need} bytes of shared memory (> {_SMEM_BYTES}): lower "
            f"max_concurrent_steps={cfg.steps}, block_k1={cfg.bk1} or block_k2={cfg.bk2}"
        )


def _check_device(cfg: _Config) -> None:
    """Raises `Unsupported` unless a Hopper GPU (or interpret mode) runs the kernel."""
    if cfg.interpret:
        return
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if jax.default_backend() != "gpu" or cc is None:
        raise spine.Unsupported(
            f"the Mosaic GPU kernel needs a CUDA GPU (default backend is "
            f"{jax.default_backend()!r}); pass MosaicGPUConfig(interpret=True) or set "
            "TENSORATTN_MOSAIC_GPU_INTERPRET=1 for the CPU interpreter"
        )
    if str(cc) != "9.0":
        raise spine.Unsupported(f"compute capability {cc}: wgmma needs a Hopper GPU (sm_90a)")


def _prepare(q, keys, values, spec: AttentionSpec, config: MosaicGPUConfig | None):
    keys, values = tuple(keys), tuple(values)
    if len(keys) != 2:
        raise spine.Unsupported(
            f"order {len(keys) + 1} (the Mosaic GPU kernel implements order 3: two key sets)"
        )
    keys, values, valid, spec = pallas.ordered_key_sets(q, keys, values, spec)
    call = spec.call(q, keys)
    cfg = _plan(call, config or MosaicGPUConfig())
    cfg = dataclasses.replace(cfg, key_masks=any(m is not None for m in spec.key_masks))
    _check_shapes(q, keys, values, cfg)
    return cfg, call, keys, values, valid


def forward(q, keys, values, spec: AttentionSpec, config: MosaicGPUConfig | None = None):
    """The forward kernel alone: `(out [B,T,N,Hv], lse [B,T,N,1])`, without the device check,
    so that it can be lowered for CUDA on any machine
    (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`)."""
    cfg, _, keys, values, valid = _prepare(q, keys, values, spec, config)
    return _forward(cfg, q, keys[0], keys[1], values[0], values[1], *valid)


def _mosaic_backward(cfg: _Config, q, values, config: MosaicGPUConfig):
    """The Mosaic GPU backward's plan for this call; raises `Unsupported` if it cannot run."""
    sizes = (q.shape[-1], values[0].shape[-1], q.dtype)
    bwd = mosaic_gpu_bwd.plan(cfg, *sizes, fuse=config.bwd_fuse_k1)
    mosaic_gpu_bwd.check(bwd, *sizes)
    return bwd


def gradients(q, keys, values, d_out, spec: AttentionSpec, config: MosaicGPUConfig | None = None):
    """The Mosaic GPU backward alone (forward, then `mosaic_gpu_bwd.backward`): `(dq, dk1, dk2,
    dv1, dv2)` of the ordered key sets, without the device check, so that it can be lowered
    for CUDA on any machine."""
    cfg, _, keys, values, valid = _prepare(q, keys, values, spec, config)
    bwd = _mosaic_backward(cfg, q, values, config or MosaicGPUConfig())
    out, lse = _forward(cfg, q, keys[0], keys[1], values[0], values[1], *valid)
    res = (q, keys[0], keys[1], values[0], values[1], *valid, out, lse)
    return mosaic_gpu_bwd.backward(bwd, res, d_out)[:5]


def attention(q, keys, values, spec: AttentionSpec, config: MosaicGPUConfig | None = None):
    """Exact order-3 attention: Mosaic GPU forward; the portable Pallas backward, or the Mosaic
    GPU one (`config.backward`) (custom_vjp).

    Raises `Unsupported` (before any work) when the call cannot run here: order other than 3,
    dtype other than bfloat16/float16, head dims not multiples of 64, tiles, no Hopper GPU
    without interpret mode, or what the chosen backward refuses.
    """
    config = config or MosaicGPUConfig()
    cfg, call, keys, values, valid = _prepare(q, keys, values, spec, config)
    _check_device(cfg)
    if config.backward == "mosaic_gpu":
        bwd = _mosaic_backward(cfg, q, values, config)
    else:
        bwd = pallas.plan(call, PallasConfig(interpret=cfg.interpret or None))
        pallas.check(q, keys, values, bwd)
    # Compiled, eager calls reuse one compilation (`spine.cached`); the interpreter hangs under
    # an outer jit (docs/pallas.md), so interpret mode calls the kernel as it is.
    attend = _attend if cfg.interpret else _attend_cached
    return attend(_Plan(cfg, bwd), q, keys[0], keys[1], values[0], values[1], *valid)
