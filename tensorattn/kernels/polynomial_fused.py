"""The polynomial method (docs/math.md §4.3-§4.4) as fused Pallas kernels, order 3.

Same numerics as `polynomial.py`: the same coefficients `c_t` (`polynomial.coefficients`),
the same monomials in the same order and the same query-side weights
`w_α = c_|α| τ^|α| multinom(α)` (`features.monomials`, `features.feature_weights`), float32
sums. What changes is where the `[rows, r]` monomial features live: they are formed on chip,
one rank block at a time, and never written to device memory.

Features on chip. With `g` 0/1 selection matrices `S_j [Hp, r]` (`Hp = pow2(max(H, g, 16))`;
column `α` of `S_j` picks the `j`-th coordinate of the sorted multiset `α`) and 0/1 rows
`c_j [r]` (1 where `α` has fewer than `j+1` coordinates: the factor is the constant 1),
`φ(x)[:, blk] = Π_j (x @ S_j[:, blk] + c_j[blk])`: `g` thin tensor-core products (K = Hp)
and `g-1` elementwise products in the order of `features.features`, no gathers. The selection
is exact: `x` is split into bfloat16 pieces (1 for bfloat16 inputs, 2 for float16, 3 for
float32), each piece times a 0/1 matrix is exact with float32 accumulation (with
`precision="highest"`: one float32 product at `Precision.HIGHEST`).

Forward without causal mask (two `pallas_call`s):
1. key phase, grid `(B·K, r / block_rank)`: `M[blk] = (Σ_a φ(k1_a)ᵀ ṽ1_a) ∘ (Σ_b φ(k2_b)ᵀ ṽ2_b)`
   (`[block_rank, Vp]`, `ṽ = [v·valid, valid, 0..]`, `Vp = pow2(max(Hv+1, 16))`), looping
   over key tiles;
2. query phase, grid `(B·K, T / block_q)`: `y = Σ_blk (w ∘ φ(q))[:, blk] @ M[blk]` looping over
   rank blocks, then `out = y[:, :Hv] / y[:, Hv]` in the kernel (0 for rows whose denominator
   is not positive or whose sums are not finite, as `polynomial._normalise`); `1/den` is kept
   for the gradient.
Causal forward: the sequence in segments of `seg` positions (an XLA scan), one
`pallas_call` per segment with grid `(B·K, r / rank_group)`: each program owns `rank_group`
monomials (`rank_group / block_rank` sub-blocks), reads their prefix sums
`P_j [block_rank, Vp]` at the segment's start from the scan's carry, walks the segment chunk
by chunk (`causal_chunk` positions) with `P_j` on chip, and writes `P_j` back. Within a chunk
the per-row states `N_j(i) = P_j + cumsum_{a <= i} φ(k_j,a) ⊗ ṽ_j,a` (`[chunk, block_rank,
Vp]`) give `y_i += Σ_α (w φ(q_i))_α N_1(i)_α ∘ N_2(i)_α`; each program writes its partial `y`
for the segment and XLA sums the groups and normalises. `seg` (a power of two, <= 16384) is the
longest whose partials fit `SEGMENT_BYTES` (128 MiB; 4096 positions at issue 14's shape with
the previous tiles; 512 with today's, `CAUSAL_CHUNK`). Memory, in bytes (`s` the input dtype's
size, `r_pad` the padded rank): inputs laid out per segment `B·K·T·((G+2)·Hp + 2·Vp)·s`,
outputs and `1/den` `B·N·T·(Hv·s + 4)`, partials `<= SEGMENT_BYTES`, states `2·B·K·r_pad·Vp·4`
(twice: in and out of a step): linear in T, 2.0 KiB per position at issue 14's shape (B=1,
N=K=8, bfloat16), ~2.1 GiB at T = 2^20. Measured on CPU with the previous tiles
(`memory_analysis` of the interpret-mode program, where XLA holds the bfloat16 layouts in
float32): 232 MiB at T = 2^15, 584 MiB at 2^17, 3.79 GiB at 2^20 (3.8 KB per position); before
segments, the partials alone were `B·N·T·Vp·4·r/rank_group` (171 MiB at T = 2^13, ~21 GiB at
2^20).

Gradient: the closed form of docs/math.md §5 (the XLA kernel's default gradient), same
accuracy. Without causal mask, four kernels on the same on-chip features: the key sums
`N_j[y, α, x] = Σ_a φ(k_a)_α ṽ_a[x] k̃_a[y]` (grid over rank blocks), `dQ` (grid over query
tiles, reading `N_1 ∘ N_2`), `Γ[y, α, x] = Σ_i ψ_i[α] d̃_i[x] q̃_i[y]` (grid over rank blocks)
and `dK_j, dV_j` (grid over key tiles, reading `Γ ∘ N_other`); the `[H+1, r, Vp]` float32
states (10.5 MB per head at the shape below) and their products are the only rank-sized
arrays in device memory. With causal masks (§5.2), segments as in the forward and one kernel
per segment, grid `(B·K, r / rank_group, H+1)`: a program owns a rank group and one augmented
key coordinate `y`, carries `N_j(i)` (coordinate `y` of `k̃`) and `C_j(i) = Σ_{i'<=i} W_j(i')`,
`W_j(i) = Σ_heads ψ_i ⊗ d̃_i q̃_i[y] ∘ N_other(i)`, and writes its share of column `y` of dQ
and of `−φ(k_a)·C_j(a−1)` (dK_j; dV_j at `y = H`). After the scan, key `a` adds
`φ(k_a)·C_j(last)` (the dK/dV kernel on the totals), so it gets `φ(k_a)·Σ_{i>=a} W_j(i)`.
Its memory: states `2·4·B·K·(H+1)·r_pad·Vp·4` (646 MiB at issue 14's shape, independent of T),
partials `<= SEGMENT_BYTES` (1024 positions per segment with the previous tiles, 128 with
today's), and linear layouts and gradients (CPU-measured with the previous tiles: 1.30 GiB at T
= 2^15, 2.08 GiB at 2^17, 12.3 GiB at 2^20: 8.6 KB per position, against the XLA kernel's
causal gradient 26 KB per position).

Matmul precision (`PolynomialConfig.precision`, the key/query/gradient products; the
selection is always exact): "highest" (float32 dots at `Precision.HIGHEST`: the numerics of
`polynomial.py`, slow on a GPU), "bf16x3" (default: operands split into bfloat16 hi + lo,
three bfloat16 products with float32 accumulation, two when the right operand is
bfloat16-exact; ~2^-16 relative per product), "bf16" (one bfloat16 product). Tiles, launch
settings and interpret mode: `PolynomialConfig` (`block_q`, `block_k`, `block_rank`,
`rank_group`, `causal_chunk`, `num_warps`, `num_stages`, `interpret`); defaults: block_q
`max(16, 64 // G)`, block_k 64, block_rank 64 (32 causal), rank_group 1 block, causal_chunk
8, 8 warps, 2 stages; untuned guesses for a GPU session to sweep (the gradient
wants query/key tiles of >= 256 rows to stay compute-bound on its state reads), checked only
for register spills on sm_90a (`SUM_REGISTERS`, `CAUSAL_CHUNK`; docs/pallas.md "Registers").

Cost per (batch, kv head), order 3, `r = C(H+g, g)`, `G` query heads per kv head, `m`
products per matmul (precision), `n_x` input pieces (1 for bfloat16). Issue 14's shape:
H = Hv = 16, g = 4, r = 4845, Hp = 16, Vp = 32, bfloat16, bf16x3, n = T = S1 = S2.
- Forward FLOPs (tensor cores): selection `2·g·Hp·n_x·r` per key and query row (0.62 MFLOP);
  key products `2·r·Vp·m` per key row (m=2: 0.62 MFLOP); query products per query row (m=3:
  0.93 MFLOP). Elementwise (CUDA cores) ~`11·r` per row (constants, products, hi/lo split,
  weights: 53 kFLOP). At n = 2^20: 4.2 TFLOP on tensor cores + 0.17 TFLOP elementwise per
  head.
- Forward HBM traffic: the key phase reads the keys and values once per rank block
  (`(S1+S2)·(Hp+Vp)·2 B · r/block_rank`: 7.3 KB per key row at block_rank=64, mostly L2 hits);
  the query phase reads q once and `M` (`r·Vp·4 B` = 620 KB, L2-resident) per query tile and
  writes the output once. Nothing of size `[T, r]` is written (the XLA kernel writes and
  reads back `[chunk, r]` feature blocks: ~20 KB per row in float32).
- Causal forward: the same selections plus ~`7·Vp` float32 elementwise operations per row
  and monomial (two cumulative sums, the state product, the weighted row sum): 1.1 MFLOP per
  position on CUDA cores; traffic: the inputs once per rank group and the partial outputs.
- Causal gradient: per position, coordinate `y` and monomial ~`16·Vp` float32 elementwise
  operations (cumulative sums of `N_1, N_2, W_1, W_2`, the products and row sums): 42 MFLOP
  per position on CUDA cores (44 TFLOP per head at n = 2^20, ~0.7 s at 60 TFLOP/s), plus the
  feature builds, repeated for each `y`, on tensor cores (32 MFLOP per position).
- Gradient FLOPs: `H+1` products per key row and set for `N_j`, `H` per query row for `dQ`,
  `H+1` per query row for `Γ` and per key row and set for `dK/dV` (m=3 each: 0.93 MFLOP per
  product), plus four feature builds: ~100 TFLOP per head at n = 2^20 (33 with "bf16").
  Traffic: `dQ` and `dK/dV` read a `[H+1, block_rank, Vp]` state block per rank block and
  tile (arithmetic intensity ~0.75·rows FLOP/B: tiles of >= 256 rows keep it compute-bound).
Expected on an H100 (989 TFLOP/s dense bf16, ~60 TFLOP/s float32 non-tensor), taking the
issue's figures as the useful-FLOP rate `2·r·(Hv+1)·(T+S1+S2)` per head (0.52 TFLOP at
n = 2^20) at 0.7% of 989 TFLOP/s, i.e. ~75 ms per head today: the fused forward at ~50% of
the tensor-core rate needs ~8.5 ms + up to ~5 ms of elementwise work, ~10-14 ms per head
(a 5-7x speed-up; ~8x with precision="bf16"). The fused gradient, ~100 TFLOP per head,
~200 ms at 50% (the issue's 2.4% for forward+gradient is ~770 ms per head by the same
accounting, `(1 + 2(H+1))` times the forward's useful FLOPs): ~3.5x with bf16x3, ~10x with
"bf16". The causal forward: ~20 ms per head at 50% of the float32 rate. The biggest
remaining lever is the feature build (selection products: half of the forward's tensor-core
work). These are estimates from the counts above; the GPU measurement is still to do
(experiments/bench_polynomial_fused.py).

Not covered: orders other than 3, sliding windows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from tensorattn.kernels import causal_scan, features, pallas, spine
from tensorattn.kernels import polynomial as xla_polynomial
from tensorattn.kernels.configs import PolynomialConfig
from tensorattn.kernels.spine import AttentionSpec, Unsupported

_F32 = jnp.float32
_BF16 = jnp.bfloat16
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_PIECES = {jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2, jnp.dtype(jnp.float32): 3}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one call."""

    causal: bool
    scale: float
    t: int
    s1: int
    s2: int
    kv_heads: int
    group: int
    dim: int
    hv: int
    hp: int
    vp: int
    degree: int
    rank_padded: int
    pieces: int
    bq: int
    bk: int
    rb: int
    rg: int
    chunk: int
    seg: int
    bwd_seg: int
    precision: str
    num_warps: int
    num_stages: int
    interpret: bool
    y_group: int  # augmented coordinates per program of the key-sum and Γ kernels

    @property
    def n_yg(self) -> int:
        """Programs over the `H+1` augmented coordinates (the last group may be partial)."""
        return -(-(self.dim + 1) // self.y_group)

    @property
    def q_step(self) -> int:
        return self.chunk if self.causal else self.bq

    @property
    def t_pad(self) -> int:
        step = self.seg if self.causal else self.bq
        return -(-self.t // step) * step

    @property
    def nq(self) -> int:
        return self.t_pad // self.q_step

    @property
    def n_seg(self) -> int:
        return self.t_pad // self.seg

    def key_padded(self, s: int) -> int:
        if self.causal:
            return self.t_pad
        return -(-s // self.bk) * self.bk


# The key-sum and Γ kernels keep one `[block_rank, Vp]` float32 accumulator per augmented
# coordinate `y` (H+1 of them: 17 at H = 16, 136 KiB, more than a program's registers: ptxas
# spilled 5.7 KB per thread with 4 warps, 2.4 KB with 8). Each program takes a group of
# coordinates whose accumulators fit in this many registers per thread, recomputing the
# features per group (at issue 14's shape, 8 warps: 3 groups of 6, 0.1-0.2 KB spilled, the
# features built 3 times, ~+12% of the key sums' tensor-core work). 8 warps: no spills in the
# other non-causal kernels either (4 warps: 16 bytes in the key phase, 4 in dK/dV).
# From `experiments/kernel_registers.py` (sm_90a); not yet timed.
SUM_REGISTERS = 64
DEFAULT_WARPS = 8
# The causal kernels carry per-row prefix states `[causal_chunk, block_rank, Vp]` for every
# rank block of their group (unrolled). With chunks of 16 and 8 blocks of 32 per program the
# causal gradient compiled to 32 registers and 39 KB of spills per thread (in 443 s), the
# forward spilled 1.3 KB; chunks of 8 and one block per program: 16 and 0 bytes, compiled in
# seconds (at the price of 8x more programs re-reading the inputs and 8x more partial
# outputs per position, which the segments keep under SEGMENT_BYTES). Not yet timed.
CAUSAL_CHUNK = 8


def _y_group(dim: int, rb: int, vp: int, warps: int) -> int:
    """Augmented coordinates per program: the groups as even as `SUM_REGISTERS` allows."""
    most = max(1, SUM_REGISTERS * 32 * warps // (rb * vp))
    n_groups = -(-(dim + 1) // most)
    return -(-(dim + 1) // n_groups)


# ---------------------------------------------------------------------------------------------
# Monomial selection tables (host side, cached).


@functools.lru_cache(maxsize=32)
def _multisets(dim: int, degree: int) -> np.ndarray:
    """`[degree, r]` coordinates of each monomial (sorted multiset), `dim` = the constant 1;
    columns in the order of `features.features`."""
    mono = features.monomials(dim, degree)
    cols = [np.full((degree, 1), dim, np.int32)]
    prev = cols[0]
    for t, (parent, last) in enumerate(zip(mono.parents, mono.lasts), start=1):
        cur = prev[:, parent].copy()
        cur[t - 1] = last
        cols.append(cur)
        prev = cur
    return np.concatenate(cols, axis=1)


@functools.lru_cache(maxsize=32)
def _selection(dim: int, degree: int, hp: int, rank_padded: int) -> np.ndarray:
    """`[g+1, hp, rank_padded]` 0/1 tables, `g = max(degree, 1)`: slab `j < g` selects the
    `j`-th coordinate of each monomial (`x @ sel[j]`), row `j` of slab `g` marks the monomials
    whose `j`-th factor is the constant 1 (fewer than `j+1` coordinates). Padding columns are
    all zero (feature 0). Needs `hp >= max(dim, g)`."""
    g = max(degree, 1)
    sel = np.zeros((g + 1, hp, rank_padded), np.float32)
    if degree == 0:
        sel[g, 0, 0] = 1.0
        return sel
    idx = _multisets(dim, degree)
    cols = np.arange(idx.shape[1])
    for j in range(degree):
        real = idx[j] < dim
        sel[j, idx[j][real], cols[real]] = 1.0
        sel[g, j, cols[~real]] = 1.0
    return sel


def _query_weights(dim: int, coeffs: tuple, scale: float, rank_padded: int):
    """`[1, rank_padded]` float32 weights `c_t scale^t multinom(α)` (0 on padding)."""
    w = features.feature_weights(features.monomials(dim, len(coeffs) - 1), coeffs, scale)
    return jnp.asarray(np.pad(w, (0, rank_padded - len(w)))[None], _F32)


# ---------------------------------------------------------------------------------------------
# In-kernel helpers (portable Pallas: dots, elementwise ops, reductions).


def _dot(a, b, contract, precision=None):
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=precision,
        preferred_element_type=_F32,
    )


def _split(x, pieces: int):
    """float32 `x` -> `pieces` bfloat16 arrays summing to `x` (exactly for enough pieces)."""
    out = []
    rest = x.astype(_F32)
    for i in range(pieces):
        p = rest.astype(_BF16)
        out.append(p)
        if i + 1 < pieces:
            rest = rest - p.astype(_F32)
    return out


def _features(cfg: _Config, x, sel_ref, lo: int | None, size: int, base=None):
    """`[rows, size]` monomials of `x [rows, Hp]` for selection columns `lo..lo+size` (`lo`
    static) or `base..base+size` (`base` traced, `lo=None`): `Π_j (x @ S_j + c_j)`."""
    highest = cfg.precision == "highest"
    pieces = [x.astype(_F32)] if highest else _split(x, cfg.pieces)
    g = max(cfg.degree, 1)
    phi = None
    for j in range(g):
        if lo is None:
            s = sel_ref[j, :, pl.ds(base, size)]
            c = sel_ref[g, pl.ds(j, 1), pl.ds(base, size)]
        else:
            s = sel_ref[j, :, lo : lo + size]
            c = sel_ref[g, j : j + 1, lo : lo + size]
        s = s.astype(pieces[0].dtype)
        f = c.astype(_F32)
        for p in pieces:
            f = f + _dot(p, s, (1, 0), lax.Precision.HIGHEST if highest else None)
        phi = f if phi is None else phi * f
    return phi


def _matmul(cfg: _Config, a, b, contract, b_exact: bool):
    """float32 product by the precision mode; `b_exact`: `b` holds bfloat16 values."""
    if cfg.precision == "highest":
        return _dot(a.astype(_F32), b.astype(_F32), contract, lax.Precision.HIGHEST)
    if cfg.precision == "bf16":
        return _dot(a.astype(_BF16), b.astype(_BF16), contract)
    a_hi, a_lo = _split(a, 2)
    b_hi, b_lo = _split(b, 2)
    out = _dot(a_hi, b_hi, contract) + _dot(a_lo, b_hi, contract)
    if not b_exact:
        out = out + _dot(a_hi, b_lo, contract)
    return out


def _normalise(y, hv: int):
    """`y [rows, Vp]` -> `y / y[:, hv]` (0 where the denominator is not positive or the row is
    not finite), as `polynomial._normalise`."""
    col = lax.broadcasted_iota(jnp.int32, (1, y.shape[1]), 1)
    den = jnp.sum(jnp.where(col == hv, y, 0.0), axis=1, keepdims=True)
    finite = jnp.abs(y) <= jnp.finfo(_F32).max
    bad = jnp.max(jnp.where(finite, 0.0, 1.0), axis=1, keepdims=True)
    ok = (den >= jnp.finfo(_F32).tiny) & (bad == 0)
    inv = jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)
    return jnp.where(ok, y, 0.0) * inv, inv


def _column(x, j: int):
    """`[rows, 1]` column `j` of `x` (no static slicing of register tiles on GPU)."""
    col = lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
    return jnp.sum(jnp.where(col == j, x, 0.0), axis=1, keepdims=True)


def _column_at(x, y, dim: int):
    """`[rows, 1]` column `y` (traced) of `[x, 1]`, whose column `dim` is the constant 1
    (`x`'s padding columns are zero; past `dim`: zero)."""
    col = lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
    # The constant as a [1, 1] tile: Triton's lowering has no select of a scalar condition.
    one = jnp.where(lax.broadcasted_iota(jnp.int32, (1, 1), 0) + y == dim, 1.0, 0.0)
    return jnp.sum(jnp.where(col == y, x, 0.0), axis=1, keepdims=True) + one


def _place(x, j: int, width: int):
    """`[rows, width]` with column `j` set to `x [rows, 1]`, zeros elsewhere."""
    col = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    return jnp.where(col == j, x, 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels.


def _key_kernel(cfg: _Config, sel_ref, k1_ref, v1_ref, k2_ref, v2_ref, m_ref):
    """Non-causal key phase: `M[blk] = (φ(k1)ᵀ ṽ1) ∘ (φ(k2)ᵀ ṽ2)` for one rank block."""
    v_exact = cfg.pieces == 1

    def key_sum(k_ref, v_ref):
        n = k_ref.shape[0] // cfg.bk

        def step(i, acc):
            a0 = pl.multiple_of(i * cfg.bk, cfg.bk)
            phi = _features(cfg, k_ref[pl.ds(a0, cfg.bk), :], sel_ref, 0, cfg.rb)
            v = v_ref[pl.ds(a0, cfg.bk), :]
            return acc + _matmul(cfg, phi, v, (0, 0), v_exact)

        return lax.fori_loop(0, n, step, jnp.zeros((cfg.rb, cfg.vp), _F32))

    m_ref[...] = key_sum(k1_ref, v1_ref) * key_sum(k2_ref, v2_ref)


def _query_kernel(cfg: _Config, q_ref, sel_ref, w_ref, m_ref, o_ref, inv_ref):
    """Non-causal query phase: `y = Σ_blk (w ∘ φ(q))[:, blk] @ M[blk]`, normalised."""
    q = q_ref[...]

    def step(j, y):
        base = pl.multiple_of(j * cfg.rb, cfg.rb)
        phi = _features(cfg, q, sel_ref, None, cfg.rb, base) * w_ref[:, pl.ds(base, cfg.rb)]
        return y + _matmul(cfg, phi, m_ref[pl.ds(base, cfg.rb), :], (1, 0), False)

    rows = q.shape[0]
    y = lax.fori_loop(0, cfg.rank_padded // cfg.rb, step, jnp.zeros((rows, cfg.vp), _F32))
    out, inv = _normalise(y, cfg.hv)
    o_ref[...] = out.astype(o_ref.dtype)
    inv_ref[...] = inv


def _causal_kernel(
    cfg: _Config, q_ref, sel_ref, w_ref, k1_ref, v1_ref, k2_ref, v2_ref, p_ref, y_ref, p_out_ref
):
    """Causal: one rank group, one segment chunk by chunk with on-chip prefix states, read
    from `p_ref` (`[2, rank_group, Vp]`: the sums over the earlier segments) and written back."""
    c, g, rb = cfg.chunk, cfg.group, cfg.rb
    n_sub = cfg.rg // rb

    def step(i, carry):
        p0 = pl.multiple_of(i * c, c)
        r0 = pl.multiple_of(i * c * g, c * g)
        k1, k2 = k1_ref[pl.ds(p0, c), :], k2_ref[pl.ds(p0, c), :]
        v1 = v1_ref[pl.ds(p0, c), :].astype(_F32)
        v2 = v2_ref[pl.ds(p0, c), :].astype(_F32)
        qs = [q_ref[pl.ds(r0 + h * c, c), :] for h in range(g)]
        ys = [jnp.zeros((c, cfg.vp), _F32) for _ in range(g)]
        new_carry = []
        for s in range(n_sub):
            lo = s * rb
            p1, p2 = carry[s]
            u1 = _features(cfg, k1, sel_ref, lo, rb)[:, :, None] * v1[:, None, :]
            u2 = _features(cfg, k2, sel_ref, lo, rb)[:, :, None] * v2[:, None, :]
            n12 = (p1[None] + jnp.cumsum(u1, axis=0)) * (p2[None] + jnp.cumsum(u2, axis=0))
            new_carry.append((p1 + jnp.sum(u1, axis=0), p2 + jnp.sum(u2, axis=0)))
            w = w_ref[:, lo : lo + rb]
            for h in range(g):
                phi = _features(cfg, qs[h], sel_ref, lo, rb) * w  # [c, rb]
                ys[h] = ys[h] + jnp.sum(phi[:, :, None] * n12, axis=1)
        for h in range(g):
            y_ref[pl.ds(r0 + h * c, c), :] = ys[h]
        return tuple(new_carry)

    init = tuple(tuple(p_ref[m, s * rb : (s + 1) * rb, :] for m in (0, 1)) for s in range(n_sub))
    final = lax.fori_loop(0, cfg.seg // c, step, init)
    for s, (p1, p2) in enumerate(final):
        p_out_ref[0, s * rb : (s + 1) * rb, :] = p1
        p_out_ref[1, s * rb : (s + 1) * rb, :] = p2


# ---------------------------------------------------------------------------------------------
# Layout: q [B,T,N,H] <-> rows [B·K, nq·G·step, Hp] (within a tile: head in group, position);
# keys [B,S,K,H] -> [B·K, S_pad, Hp] with a ones column; values -> [B·K, S_pad, Vp] as
# [v·valid, valid, 0..].


def _pad_last(x, size: int, one_at: int | None = None, scale=None):
    parts = [x if scale is None else x * scale[..., None]]
    if one_at is not None:
        ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
        parts.append(ones if scale is None else scale[..., None].astype(x.dtype))
    x = jnp.concatenate(parts, axis=-1)
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, size - x.shape[-1]),))


def _rows_layout(cfg: _Config, x, segmented: bool = False):
    """`[B,T,N,d]` -> `[B·K, nq·G·step, d]`, or `[n_seg, B·K, rows per segment, d]`."""
    b, t, n, d = x.shape
    g, kv, nq, st = cfg.group, cfg.kv_heads, cfg.nq, cfg.q_step
    ns = cfg.n_seg if segmented else 1
    x = jnp.pad(x, ((0, 0), (0, nq * st - t), (0, 0), (0, 0)))
    x = x.reshape(b, ns, nq // ns, st, kv, g, d).transpose(1, 0, 4, 2, 5, 3, 6)
    x = x.reshape(ns, b * kv, nq // ns * g * st, d)
    return x if segmented else x[0]


def _rows_merge(cfg: _Config, x, b: int):
    """Inverse of `_rows_layout` (either form), cut to T positions."""
    x = x if x.ndim == 4 else x[None]
    ns, d = x.shape[0], x.shape[-1]
    g, kv, nq, st = cfg.group, cfg.kv_heads, cfg.nq, cfg.q_step
    x = x.reshape(ns, b, kv, nq // ns, g, st, d).transpose(1, 0, 3, 5, 2, 4, 6)
    return x.reshape(b, nq * st, kv * g, d)[:, : cfg.t]


def _keys_layout(x, padded: int, n_seg: int | None = None):
    """`[B,S,K,d]` -> `[B·K, padded, d]`, or `[n_seg, B·K, padded / n_seg, d]`."""
    b, s, kv, d = x.shape
    ns = n_seg or 1
    x = x[:, :padded]
    x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))
    x = x.reshape(b, ns, padded // ns, kv, d).transpose(1, 0, 3, 2, 4)
    x = x.reshape(ns, b * kv, padded // ns, d)
    return x if n_seg else x[0]


def _keys_merge(x, s: int, kv: int, width: int):
    """Inverse of `_keys_layout` (either form), cut to `s` positions and `width` columns."""
    x = x if x.ndim == 4 else x[None]
    ns, bkv, seg, _ = x.shape
    x = x.reshape(ns, bkv // kv, kv, seg, -1).transpose(1, 0, 3, 2, 4)
    return x.reshape(bkv // kv, ns * seg, kv, -1)[:, :s, :, :width]


def _prepare(cfg: _Config, q, keys, values, valid, segmented: bool = False):
    dtype = q.dtype
    ns = cfg.n_seg if segmented else None
    q_t = _rows_layout(cfg, _pad_last(q, cfg.hp), segmented)
    ks, vs = [], []
    for k, v, ok, s in zip(keys, values, valid, (cfg.s1, cfg.s2)):
        padded = cfg.key_padded(s)
        ks.append(_keys_layout(_pad_last(k.astype(dtype), cfg.hp), padded, ns))
        ok_kv = jnp.broadcast_to(ok[:, :, None], v.shape[:3]).astype(dtype)
        v_aug = _pad_last(v.astype(dtype), cfg.vp, one_at=cfg.hv, scale=ok_kv)
        vs.append(_keys_layout(v_aug, padded, ns))
    return q_t, ks, vs


def _call(cfg: _Config, kernel, grid, in_specs, out_specs, out_shape, aliases=None):
    kwargs = {"input_output_aliases": aliases} if aliases else {}
    if cfg.interpret:
        kwargs["interpret"] = True
    else:
        from jax.experimental.pallas import triton as plt

        kwargs["compiler_params"] = plt.CompilerParams(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        **kwargs,
    )


def _whole(shape):
    return pl.BlockSpec((None, *shape[1:]), lambda i, *_: (i, 0, 0))


def _forward(cfg: _Config, sel, w, q, keys, values, valid):
    """`[B,T,N,Hv]` output in q's dtype."""
    b = q.shape[0]
    q_t, (k1, k2), (v1, v2) = _prepare(cfg, q, keys, values, valid, segmented=cfg.causal)
    bkv = q_t.shape[-3]
    rows_total = q_t.shape[-2]
    g = sel.shape[0]
    n_rb = cfg.rank_padded // cfg.rb
    if not cfg.causal:
        m = _call(
            cfg,
            _key_kernel,
            grid=(bkv, n_rb),
            in_specs=[
                pl.BlockSpec((g, cfg.hp, cfg.rb), lambda i, j: (0, 0, j)),
                _whole(k1.shape),
                _whole(v1.shape),
                _whole(k2.shape),
                _whole(v2.shape),
            ],
            out_specs=pl.BlockSpec((None, cfg.rb, cfg.vp), lambda i, j: (i, j, 0)),
            out_shape=jax.ShapeDtypeStruct((bkv, cfg.rank_padded, cfg.vp), _F32),
        )(sel, k1, v1, k2, v2)
        rows = cfg.group * cfg.bq
        out, inv_t = _call(
            cfg,
            _query_kernel,
            grid=(bkv, cfg.nq),
            in_specs=[
                pl.BlockSpec((None, rows, cfg.hp), lambda i, j: (i, j, 0)),
                pl.BlockSpec(sel.shape, lambda i, j: (0, 0, 0)),
                pl.BlockSpec(w.shape, lambda i, j: (0, 0)),
                _whole(m.shape),
            ],
            out_specs=[
                pl.BlockSpec((None, rows, cfg.vp), lambda i, j: (i, j, 0)),
                pl.BlockSpec((None, rows, 1), lambda i, j: (i, j, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((bkv, rows_total, cfg.vp), q.dtype),
                jax.ShapeDtypeStruct((bkv, rows_total, 1), _F32),
            ],
        )(q_t, sel, w, m)
        return _rows_merge(cfg, out, b)[..., : cfg.hv], _rows_merge(cfg, inv_t, b)
    n_rg = cfg.rank_padded // cfg.rg
    rows = cfg.seg * cfg.group
    keys_ = (k1, v1, k2, v2)
    state = jax.ShapeDtypeStruct((bkv, 2, cfg.rank_padded, cfg.vp), _F32)
    call = _call(
        cfg,
        _causal_kernel,
        grid=(bkv, n_rg),
        in_specs=[
            pl.BlockSpec((None, rows, cfg.hp), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((g, cfg.hp, cfg.rg), lambda i, j: (0, 0, j)),
            pl.BlockSpec((1, cfg.rg), lambda i, j: (0, j)),
            *(pl.BlockSpec((None, cfg.seg, x.shape[-1]), lambda i, j: (i, 0, 0)) for x in keys_),
            pl.BlockSpec((None, 2, cfg.rg, cfg.vp), lambda i, j: (i, 0, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, cfg.vp), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, 2, cfg.rg, cfg.vp), lambda i, j: (i, 0, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((bkv, n_rg, rows, cfg.vp), _F32), state],
        aliases={7: 1},
    )

    def segment(p, xs):
        q, k1, v1, k2, v2 = xs
        partial, p = call(q, sel, w, k1, v1, k2, v2, p)
        out, inv = _normalise_xla(jnp.sum(partial, axis=1), cfg.hv)
        return p, (out.astype(q_dtype), inv)

    q_dtype = q.dtype
    _, (out, inv) = lax.scan(segment, jnp.zeros(state.shape, _F32), (q_t, *keys_))
    return _rows_merge(cfg, out, b), _rows_merge(cfg, inv, b)


def _normalise_xla(y, hv: int):
    """`polynomial._normalise` of `[.., Vp]` sums: (`[.., hv]` output, `[.., 1]` 1/den)."""
    den = y[..., hv : hv + 1]
    ok = (den >= jnp.finfo(y.dtype).tiny) & jnp.all(jnp.isfinite(y), axis=-1, keepdims=True)
    inv = jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)
    return jnp.where(ok, y[..., :hv], 0.0) * inv, inv


# ---------------------------------------------------------------------------------------------
# Gradient (docs/math.md §5.1), non-causal, fused: four kernels on the same on-chip features.
# Augmented: ṽ = [v·valid, valid], k̃ = [k, 1], q̃ = [q, 1], d̃ = [dO, -D]; ψ_i = w φ(q_i) / den_i.
# Sums with two augmented indices are stored y-major: `[H+1, r, Vp]`, entry `[y, α, x]`.


def _augmented_columns(cfg: _Config, x, y0):
    """Columns `y0 .. y0 + y_group - 1` of `[x, 1]` (this program's group of augmented
    coordinates) as `[rows, 1]` columns, zero past `H` (the last group's padding). `x`'s
    padding columns are zero."""
    return [_column_at(x, y0 + i, cfg.dim) for i in range(cfg.y_group)]


def _add_products(cfg: _Config, accs, feats, x, cols):
    """`accs[i] + featsᵀ (x ∘ cols[i])`, each right operand formed just before its product
    (not all at once: they are as large as the accumulators)."""
    return tuple(acc + _matmul(cfg, feats, x * col, (0, 0), False) for acc, col in zip(accs, cols))


def _key_grad_kernel(cfg: _Config, sel_ref, k_ref, v_ref, n_ref):
    """`N_j[y, α, x] = Σ_a φ(k_a)_α ṽ_a[x] k̃_a[y]` for one rank block (one key set) and one
    group of `y` (`y_group` accumulators, so that they stay in registers)."""
    n_tiles = k_ref.shape[0] // cfg.bk
    y0 = pl.program_id(2) * cfg.y_group

    def step(i, accs):
        a0 = pl.multiple_of(i * cfg.bk, cfg.bk)
        k = k_ref[pl.ds(a0, cfg.bk), :]
        v = v_ref[pl.ds(a0, cfg.bk), :].astype(_F32)
        phi = _features(cfg, k, sel_ref, 0, cfg.rb)
        cols = _augmented_columns(cfg, k.astype(_F32), y0)  # k̃ = [k, 1]
        return _add_products(cfg, accs, phi, v, cols)

    zero = jnp.zeros((cfg.rb, cfg.vp), _F32)
    accs = lax.fori_loop(0, n_tiles, step, (zero,) * cfg.y_group)
    for i in range(cfg.y_group):
        n_ref[i] = accs[i]


def _psi(cfg: _Config, q, sel_ref, w, inv, lo, base=None):
    return _features(cfg, q, sel_ref, lo, cfg.rb, base) * w * inv


def _dq_kernel(cfg: _Config, q_ref, d_ref, inv_ref, sel_ref, w_ref, n_ref, dq_ref):
    """`dQ[i, c] = τ Σ_x d̃_i[x] Σ_α ψ_i[α] N[c, α, x]` (`N = N_1 ∘ N_2`), one query tile."""
    q, d, inv = q_ref[...], d_ref[...], inv_ref[...]

    def step(j, dq):
        base = pl.multiple_of(j * cfg.rb, cfg.rb)
        psi = _psi(cfg, q, sel_ref, w_ref[:, pl.ds(base, cfg.rb)], inv, None, base)
        for y in range(cfg.dim):
            t = _matmul(cfg, psi, n_ref[y, pl.ds(base, cfg.rb), :], (1, 0), False)
            dq = dq + _place(jnp.sum(d * t, axis=1, keepdims=True), y, cfg.hp)
        return dq

    dq = lax.fori_loop(0, cfg.rank_padded // cfg.rb, step, jnp.zeros(q.shape, _F32))
    dq_ref[...] = jnp.where(inv > 0, dq * cfg.scale, 0.0)


def _gamma_kernel(cfg: _Config, sel_ref, w_ref, q_ref, d_ref, inv_ref, g_ref):
    """`Γ[y, α, x] = Σ_i ψ_i[α] d̃_i[x] q̃_i[y]` for one rank block and one group of `y`."""
    rows = cfg.group * cfg.bq
    w = w_ref[...]
    y0 = pl.program_id(2) * cfg.y_group

    def step(i, accs):
        r0 = pl.multiple_of(i * rows, rows)
        q = q_ref[pl.ds(r0, rows), :]
        d = d_ref[pl.ds(r0, rows), :]
        psi = _psi(cfg, q, sel_ref, w, inv_ref[pl.ds(r0, rows), :], 0)
        cols = _augmented_columns(cfg, q.astype(_F32), y0)  # q̃ = [q, 1]
        return _add_products(cfg, accs, psi, d, cols)

    zero = jnp.zeros((cfg.rb, cfg.vp), _F32)
    accs = lax.fori_loop(0, q_ref.shape[0] // rows, step, (zero,) * cfg.y_group)
    for i in range(cfg.y_group):
        g_ref[i] = accs[i]


def _dkv_kernel(cfg: _Config, k_ref, v_ref, sel_ref, w_ref, dk_ref, dv_ref):
    """One key tile of set `j`, `w = Γ ∘ N_other`: `X[a][x, y] = Σ_α φ(k_a)_α w[y, α, x]`,
    `dK[a, c] = τ Σ_x ṽ_a[x] X[a][x, c]`, `dV[a, l] = X[a][l, H]` (valid keys only)."""
    k = k_ref[...]
    v = v_ref[...].astype(_F32)

    def step(j, carry):
        dk, dv = carry
        base = pl.multiple_of(j * cfg.rb, cfg.rb)
        phi = _features(cfg, k, sel_ref, None, cfg.rb, base)
        for y in range(cfg.dim + 1):
            x = _matmul(cfg, phi, w_ref[y, pl.ds(base, cfg.rb), :], (1, 0), False)
            if y < cfg.dim:
                dk = dk + _place(jnp.sum(v * x, axis=1, keepdims=True), y, cfg.hp)
            else:
                dv = dv + x
        return dk, dv

    init = (jnp.zeros((cfg.bk, cfg.hp), _F32), jnp.zeros((cfg.bk, cfg.vp), _F32))
    dk, dv = lax.fori_loop(0, cfg.rank_padded // cfg.rb, step, init)
    ok = _column(v, cfg.hv)
    dk_ref[...] = dk * (cfg.scale * ok)
    dv_ref[...] = dv * ok


def _backward_fused(cfg: _Config, sel, w, res, d_out):
    q, keys, values, valid, out, inv = res
    b = q.shape[0]
    q_t, ks, vs = _prepare(cfg, q, keys, values, valid)
    inv_t = _rows_layout(cfg, inv)
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
    d_aug = jnp.concatenate([d_out.astype(_F32), -delta], axis=-1)
    d_t = _rows_layout(cfg, _pad_last(d_aug, cfg.vp))
    bkv, rows_total, _ = q_t.shape
    g = sel.shape[0]
    n_rb = cfg.rank_padded // cfg.rb
    rows = cfg.group * cfg.bq
    sel_all = pl.BlockSpec(sel.shape, lambda i, j: (0, 0, 0))
    # The key sums and Γ: grid (B·K, rank blocks, groups of y), `[H+1, r, Vp]` states.
    y_pad = cfg.n_yg * cfg.y_group
    grid_sums = (bkv, n_rb, cfg.n_yg)
    sel_block = pl.BlockSpec((g, cfg.hp, cfg.rb), lambda i, j, y: (0, 0, j))
    sums_shape = jax.ShapeDtypeStruct((bkv, y_pad, cfg.rank_padded, cfg.vp), _F32)
    sums_block = pl.BlockSpec((None, cfg.y_group, cfg.rb, cfg.vp), lambda i, j, y: (i, y, j, 0))
    state_shape = jax.ShapeDtypeStruct((bkv, cfg.dim + 1, cfg.rank_padded, cfg.vp), _F32)
    state_all = pl.BlockSpec((None, *state_shape.shape[1:]), lambda i, j: (i, 0, 0, 0))

    def states(x):  # [B·K, y_pad, r, Vp] -> [B·K, H+1, r, Vp]
        return x if y_pad == cfg.dim + 1 else x[:, : cfg.dim + 1]

    def tile(size, width):
        return pl.BlockSpec((None, size, width), lambda i, j: (i, j, 0))

    ns = [
        states(
            _call(
                cfg,
                _key_grad_kernel,
                grid=grid_sums,
                in_specs=[sel_block, _whole(k.shape), _whole(v.shape)],
                out_specs=sums_block,
                out_shape=sums_shape,
            )(sel, k, v)
        )
        for k, v in zip(ks, vs)
    ]
    # Key sums that overflowed contribute nothing (else inf · 0 = NaN in every gradient).
    ns, _ = xla_polynomial.guard_sums(ns, (1, 2, 3))
    dq_t = _call(
        cfg,
        _dq_kernel,
        grid=(bkv, rows_total // rows),
        in_specs=[
            tile(rows, cfg.hp),
            tile(rows, cfg.vp),
            tile(rows, 1),
            sel_all,
            pl.BlockSpec(w.shape, lambda i, j: (0, 0)),
            state_all,
        ],
        out_specs=tile(rows, cfg.hp),
        out_shape=jax.ShapeDtypeStruct((bkv, rows_total, cfg.hp), _F32),
    )(q_t, d_t, inv_t, sel, w, ns[0] * ns[1])
    gamma = _call(
        cfg,
        _gamma_kernel,
        grid=grid_sums,
        in_specs=[
            sel_block,
            pl.BlockSpec((1, cfg.rb), lambda i, j, y: (0, j)),
            _whole(q_t.shape),
            _whole(d_t.shape),
            _whole(inv_t.shape),
        ],
        out_specs=sums_block,
        out_shape=sums_shape,
    )(sel, w, q_t, d_t, inv_t)
    gamma = states(gamma)
    dks, dvs = [], []
    for j, (k, v, key) in enumerate(zip(ks, vs, keys)):
        dk_t, dv_t = _dkv(cfg, k, v, sel, gamma * ns[1 - j])
        dks.append(_finite(_keys_merge(dk_t, key.shape[1], cfg.kv_heads, cfg.dim), key.dtype))
        dvs.append(_finite(_keys_merge(dv_t, key.shape[1], cfg.kv_heads, cfg.hv), key.dtype))
    dq = _finite(_rows_merge(cfg, dq_t, b)[..., : cfg.dim], q.dtype)
    return dq, tuple(dks), tuple(dvs)


# Gradient with causal masks (docs/math.md §5.2), fused. Per rank group and augmented key
# coordinate y (grid `(B·K, r / rank_group, H+1)`), one segment chunk by chunk with on-chip
# prefix states: `N_j(i) = Σ_{a<=i} φ(k_a) ⊗ ṽ_a k̃_a[y]`, `W_j(i) = ψ_i ⊗ d̃_i q̃_i[y] ∘ N_other(i)`
# (summed over the query heads of the group) and `C_j(i) = Σ_{i'<=i} W_j(i')`. Key `a` gets
# `φ(k_a)·Σ_{i>=a} W_j(i) = φ(k_a)·C_j(last) − φ(k_a)·C_j(a−1)`: the second term here, the
# first after the scan (`_dkv_kernel` on the totals `C_j(last)`).


def _causal_grad_kernel(
    cfg: _Config,
    q_ref,
    d_ref,
    inv_ref,
    sel_ref,
    w_ref,
    k1_ref,
    v1_ref,
    k2_ref,
    v2_ref,
    s_ref,
    dq_ref,
    dk1_ref,
    dk2_ref,
    dv1_ref,
    dv2_ref,
    s_out_ref,
):
    """One rank group, one coordinate `y`, one segment. `s_ref [4, rank_group, Vp]`: the
    prefix states `N_1, N_2, C_1, C_2` at the segment's start (written back at its end).
    Writes column `y` of this group's share of dQ and of `dK_j` without the total term, and
    (`y = H`) `dV_j` without it."""
    c, g, rb = cfg.chunk, cfg.group, cfg.rb
    n_sub = cfg.rg // rb
    y = pl.program_id(2)
    dk_refs, dv_refs = (dk1_ref, dk2_ref), (dv1_ref, dv2_ref)

    def step(i, carry):
        p0 = pl.multiple_of(i * c, c)
        r0 = pl.multiple_of(i * c * g, c * g)
        ks = (k1_ref[pl.ds(p0, c), :], k2_ref[pl.ds(p0, c), :])
        vs = (v1_ref[pl.ds(p0, c), :].astype(_F32), v2_ref[pl.ds(p0, c), :].astype(_F32))
        kts = [v * _column_at(k.astype(_F32), y, cfg.dim) for k, v in zip(ks, vs)]  # ṽ k̃[y]
        qs = [q_ref[pl.ds(r0 + h * c, c), :] for h in range(g)]
        ds = [d_ref[pl.ds(r0 + h * c, c), :] for h in range(g)]
        invs = [inv_ref[pl.ds(r0 + h * c, c), :] for h in range(g)]
        dqts = [d * _column_at(q.astype(_F32), y, cfg.dim) for q, d in zip(qs, ds)]  # d̃ q̃[y]
        dq = [jnp.zeros((c, 1), _F32) for _ in range(g)]
        dk = [jnp.zeros((c, 1), _F32) for _ in range(2)]
        dv = [jnp.zeros((c, cfg.vp), _F32) for _ in range(2)]
        new_carry = []
        for s in range(n_sub):
            lo = s * rb
            p1, p2, c1, c2 = carry[s]
            phis = [_features(cfg, k, sel_ref, lo, rb) for k in ks]
            us = [phi[:, :, None] * kt[:, None, :] for phi, kt in zip(phis, kts)]
            n1 = p1[None] + jnp.cumsum(us[0], axis=0)
            n2 = p2[None] + jnp.cumsum(us[1], axis=0)
            n12 = n1 * n2
            w = w_ref[:, lo : lo + rb]
            coef = None
            for h in range(g):
                psi = _features(cfg, qs[h], sel_ref, lo, rb) * w * invs[h]  # [c, rb]
                t = jnp.sum(psi[:, :, None] * n12, axis=1)  # [c, Vp]
                dq[h] = dq[h] + jnp.sum(ds[h] * t, axis=1, keepdims=True)
                term = psi[:, :, None] * dqts[h][:, None, :]
                coef = term if coef is None else coef + term
            new_c = []
            for j, (wj, cj) in enumerate(((coef * n2, c1), (coef * n1, c2))):
                before = cj[None] + jnp.cumsum(wj, axis=0) - wj  # C_j(a - 1)
                x = -jnp.sum(phis[j][:, :, None] * before, axis=1)  # [c, Vp]
                dk[j] = dk[j] + jnp.sum(vs[j] * x, axis=1, keepdims=True)
                dv[j] = dv[j] + x
                new_c.append(cj + jnp.sum(wj, axis=0))
            new_carry.append(
                (p1 + jnp.sum(us[0], axis=0), p2 + jnp.sum(us[1], axis=0), new_c[0], new_c[1])
            )
        for h in range(g):
            dq_ref[pl.ds(r0 + h * c, c), :] = jnp.where(invs[h] > 0, dq[h] * cfg.scale, 0.0)
        for j in range(2):
            ok = _column(vs[j], cfg.hv)
            dk_refs[j][pl.ds(p0, c), :] = dk[j] * (cfg.scale * ok)

            @pl.when(y == cfg.dim)
            def _(ref=dv_refs[j], value=dv[j] * ok):
                ref[pl.ds(p0, c), :] = value

        return tuple(new_carry)

    def block(m, s):
        return s_ref[m, s * rb : (s + 1) * rb, :]

    init = tuple(tuple(block(m, s) for m in range(4)) for s in range(n_sub))
    final = lax.fori_loop(0, cfg.seg // c, step, init)
    for s, states in enumerate(final):
        for m, x in enumerate(states):
            s_out_ref[m, s * rb : (s + 1) * rb, :] = x


def _dkv(cfg: _Config, k, v, sel, state):
    """`_dkv_kernel` over all key tiles: `(dK [B·K, S_pad, Hp], dV [B·K, S_pad, Vp])`."""
    padded = k.shape[1]

    def tile(size, width):
        return pl.BlockSpec((None, size, width), lambda i, j: (i, j, 0))

    return _call(
        cfg,
        _dkv_kernel,
        grid=(k.shape[0], padded // cfg.bk),
        in_specs=[
            tile(cfg.bk, cfg.hp),
            tile(cfg.bk, cfg.vp),
            pl.BlockSpec(sel.shape, lambda i, j: (0, 0, 0)),
            pl.BlockSpec((None, *state.shape[1:]), lambda i, j: (i, 0, 0, 0)),
        ],
        out_specs=[tile(cfg.bk, cfg.hp), tile(cfg.bk, cfg.vp)],
        out_shape=[
            jax.ShapeDtypeStruct((k.shape[0], padded, cfg.hp), _F32),
            jax.ShapeDtypeStruct((k.shape[0], padded, cfg.vp), _F32),
        ],
    )(k, v, sel, state)


def _backward_causal(cfg: _Config, sel, w, res, d_out):
    q, keys, values, valid, out, inv = res
    cfg = dataclasses.replace(cfg, seg=cfg.bwd_seg)
    b = q.shape[0]
    q_t, ks, vs = _prepare(cfg, q, keys, values, valid, segmented=True)
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
    d_aug = _pad_last(jnp.concatenate([d_out.astype(_F32), -delta], -1), cfg.vp)
    d_t = _rows_layout(cfg, d_aug, segmented=True)
    inv_t = _rows_layout(cfg, inv, segmented=True)
    bkv = q_t.shape[1]
    n_rg, ys = cfg.rank_padded // cfg.rg, cfg.dim + 1
    rows, seg = cfg.seg * cfg.group, cfg.seg
    state = jax.ShapeDtypeStruct((bkv, ys, 4, cfg.rank_padded, cfg.vp), _F32)
    state_block = pl.BlockSpec((None, None, 4, cfg.rg, cfg.vp), lambda i, j, y: (i, y, 0, j, 0))

    def whole(size, width):
        return pl.BlockSpec((None, size, width), lambda i, j, y: (i, 0, 0))

    def column(size):
        return pl.BlockSpec((None, None, None, size, 1), lambda i, j, y: (i, j, y, 0, 0))

    def columns(size):
        return jax.ShapeDtypeStruct((bkv, n_rg, ys, size, 1), _F32)

    dv_block = pl.BlockSpec((None, None, seg, cfg.vp), lambda i, j, y: (i, j, 0, 0))
    dv_shape = jax.ShapeDtypeStruct((bkv, n_rg, seg, cfg.vp), _F32)
    call = _call(
        cfg,
        _causal_grad_kernel,
        grid=(bkv, n_rg, ys),
        in_specs=[
            whole(rows, cfg.hp),
            whole(rows, cfg.vp),
            whole(rows, 1),
            pl.BlockSpec((sel.shape[0], cfg.hp, cfg.rg), lambda i, j, y: (0, 0, j)),
            pl.BlockSpec((1, cfg.rg), lambda i, j, y: (0, j)),
            whole(seg, cfg.hp),
            whole(seg, cfg.vp),
            whole(seg, cfg.hp),
            whole(seg, cfg.vp),
            state_block,
        ],
        out_specs=[column(rows), column(seg), column(seg), dv_block, dv_block, state_block],
        out_shape=[columns(rows), columns(seg), columns(seg), dv_shape, dv_shape, state],
        aliases={9: 5},
    )

    def segment(st, xs):
        dq, dk1, dk2, dv1, dv2, st = call(*xs[:3], sel, w, *xs[3:], st)

        def col(x):  # [B·K, n_rg, H+1, n, 1] -> [B·K, n, H]
            return jnp.sum(x[..., 0], axis=1).transpose(0, 2, 1)[..., : cfg.dim]

        dv1, dv2 = (jnp.sum(x, axis=1)[..., : cfg.hv] for x in (dv1, dv2))
        return st, (col(dq), col(dk1), col(dk2), dv1, dv2)

    xs = (q_t, d_t, inv_t, ks[0], vs[0], ks[1], vs[1])
    st, (dq, dk1, dk2, dv1, dv2) = lax.scan(segment, jnp.zeros(state.shape, _F32), xs)
    tail_cfg = dataclasses.replace(cfg, bk=min(cfg.bk, seg))
    # Keys seen by no row with an output get nothing: not `φ(k_a)` times the rounding of a
    # difference of prefix sums (huge when the key's features are).
    rows_live = jnp.any((inv[..., 0] > 0).reshape(b, cfg.t, cfg.kv_heads, cfg.group), axis=-1)
    live = causal_scan.seen_by(rows_live, None)[..., None]  # [B, S, K, 1]
    dks, dvs = [], []
    for j, (k, v, key, dk, dv) in enumerate(zip(ks, vs, keys, (dk1, dk2), (dv1, dv2))):

        def tail(_, xs, total=st[:, :, 2 + j]):  # + φ(k_a)·C_j(last), segment by segment
            k, v, dk, dv = xs
            dk_t, dv_t = _dkv(tail_cfg, k, v, sel, total)
            return None, (dk + dk_t[..., : cfg.dim], dv + dv_t[..., : cfg.hv])

        _, (dk, dv) = lax.scan(tail, None, (k, v, dk, dv))
        dk = _keys_merge(dk, key.shape[1], cfg.kv_heads, cfg.dim)
        dv = _keys_merge(dv, key.shape[1], cfg.kv_heads, cfg.hv)
        dks.append(_finite(jnp.where(live, dk, 0.0), key.dtype))
        dvs.append(_finite(jnp.where(live, dv, 0.0), key.dtype))
    dq = _finite(_rows_merge(cfg, dq, b), q.dtype)
    return dq, tuple(dks), tuple(dvs)


def _finite(x, dtype):
    """`polynomial.zero_overflow` (the inputs are finite: `polynomial.attention` guards
    them), cast to `dtype`."""
    return xla_polynomial.zero_overflow(x).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: _Config, sel, w, q, keys, values, valid):
    return _forward(cfg, sel, w, q, keys, values, valid)[0]


def _attend_fwd(cfg, sel, w, q, keys, values, valid):
    out, inv = _forward(cfg, sel, w, q, keys, values, valid)
    return out, (sel, w, (q, keys, values, valid, out, inv))


def _attend_bwd(cfg, res, d_out):
    sel, w, res = res
    backward = _backward_causal if cfg.causal else _backward_fused
    dq, dks, dvs = backward(cfg, sel, w, res, d_out)
    dq, dks, dvs = xla_polynomial.upstream_nan(d_out, (dq, dks, dvs))
    valid = res[3]
    return None, None, dq, dks, dvs, tuple(None for _ in valid)


_attend.defvjp(_attend_fwd, _attend_bwd)
_attend_cached = spine.cached(_attend)


# ---------------------------------------------------------------------------------------------
# Entry point.


def _default_interpret() -> bool:
    """Interpret mode on CPU (and with the environment variable); compiled on a GPU."""
    return spine.env_flag(pallas.INTERPRET_ENV) or jax.default_backend() == "cpu"


def unsupported(q, keys, values, spec: AttentionSpec) -> str | None:
    """Why the fused kernels cannot run this call, or None."""
    if not getattr(spec, "static_scale", True) or not isinstance(spec.scale, (int, float)):
        return "an array scale (the feature weights hold scale^|α|: give a Python float)"
    if len(keys) != 2:
        return f"order {len(keys) + 1} (the fused polynomial kernels implement order 3)"
    if any(w is not None for w in spec.windows):
        return f"window={spec.windows} (sliding windows are not implemented in the fused kernels)"
    for x in (q, *keys, *values):
        if jnp.dtype(jnp.result_type(x)) not in _DTYPES:
            return f"dtype {jnp.result_type(x)} (supported: bfloat16, float16, float32)"
    return None


def _segment(chunk: int, t: int, per_position: int, budget: int) -> int:
    """Positions per causal segment: the largest power of two `>= chunk`, at most 16384 and
    not above `t`'s, whose partial outputs (`per_position` bytes each) fit `budget`."""
    seg = chunk
    while seg < 16384 and seg < t and 2 * seg * per_position <= budget:
        seg *= 2
    return seg


# Largest bytes of per-segment partial outputs of the causal kernels (all batch rows and
# heads): the segment length follows from it (`_segment`).
SEGMENT_BYTES = 1 << 27


def attention(
    q,
    keys,
    values,
    spec: AttentionSpec,
    config: PolynomialConfig,
    *,
    degree: int,
    score_range: float | None = None,
):
    """Order-3 polynomial-method attention with the fused Pallas kernels.

    q `[B,T,N,H]`, keys `(k1, k2)` `[B,S_j,K,H]`, values `(v1, v2)` `[B,S_j,K,Hv]` (N % K == 0),
    `spec` from `validate` (float scale, causal, key masks; no windows). `config`: the
    `PolynomialConfig` (polynomial, precision, tiles, interpret); `degree` and `score_range`
    (`R`, needed by Chebyshev) as `polynomial.attention` resolved them, which also runs the
    accuracy check. The gradient is the closed form of docs/math.md §5 (as the XLA kernel's
    default). Computes in the inputs' promoted dtype; returns `[B,T,N,Hv]` in q's dtype (as
    every kernel); `Unsupported` names a call it cannot run.
    """
    keys, values = tuple(keys), tuple(values)
    coeffs = xla_polynomial.coefficients(config.polynomial, degree, score_range)
    coeffs = tuple(float(c) for c in coeffs)
    interpret = _default_interpret() if config.interpret is None else config.interpret
    why = unsupported(q, keys, values, spec)
    if why is None and not interpret and jax.default_backend() != "gpu":
        why = (
            f"the kernels compile for a GPU only (backend {jax.default_backend()!r}): "
            "fused=False runs the XLA kernel, interpret=True the Pallas interpreter"
        )
    if why is not None:
        raise Unsupported(f"the fused polynomial kernels do not support this call: {why}")
    b, t, n, h = q.shape
    kv = keys[0].shape[2]
    hv = values[0].shape[-1]
    rank = math.comb(h + degree, degree)
    group = n // kv
    vp = max(16, _next_pow2(hv + 1))
    chunk = config.causal_chunk or CAUSAL_CHUNK
    warps = config.num_warps or DEFAULT_WARPS
    rb = config.block_rank or min(32 if spec.causal else 64, max(16, _next_pow2(rank)))
    rg = config.rank_group or rb  # causal: one rank block per program (see CAUSAL_CHUNK)
    if rg % rb:
        raise ValueError(f"PolynomialConfig.rank_group={rg} must be a multiple of block_rank={rb}")
    rank_padded = -(-rank // rg) * rg
    dtype = jnp.result_type(q, *keys, *values)
    out_dtype = jnp.result_type(q)
    seg = bwd_seg = 0
    if spec.causal:  # partial outputs per position: y; dQ, dK_j columns per y and dV_j
        per = (rank_padded // rg) * 4 * b * kv
        seg = _segment(chunk, t, per * group * vp, SEGMENT_BYTES)
        bwd_seg = _segment(chunk, t, per * ((h + 1) * (group + 2) + 2 * vp), SEGMENT_BYTES)
    cfg = _Config(
        causal=spec.causal,
        scale=spec.scale,
        t=t,
        s1=keys[0].shape[1],
        s2=keys[1].shape[1],
        kv_heads=kv,
        group=group,
        dim=h,
        hv=hv,
        hp=max(16, _next_pow2(h), _next_pow2(max(degree, 1))),
        vp=vp,
        degree=degree,
        rank_padded=rank_padded,
        pieces=_PIECES[jnp.dtype(dtype)],
        bq=config.block_q or min(max(16, 64 // group), max(16, _next_pow2(t))),
        bk=config.block_k or min(64, max(16, _next_pow2(max(k.shape[1] for k in keys)))),
        rb=rb,
        rg=rg,
        chunk=chunk,
        seg=seg,
        bwd_seg=bwd_seg,
        precision=config.precision or "bf16x3",
        num_warps=warps,
        num_stages=config.num_stages or 2,
        interpret=interpret,
        y_group=_y_group(h, rb, vp, warps),
    )
    q = q.astype(dtype)
    keys = tuple(k.astype(dtype) for k in keys)
    values = tuple(v.astype(dtype) for v in values)
    valid = tuple(
        jnp.ones((b, k.shape[1]), bool) if m is None else m for k, m in zip(keys, spec.key_masks)
    )
    sel = jnp.asarray(_selection(h, degree, cfg.hp, cfg.rank_padded), _BF16)
    w = _query_weights(h, coeffs, spec.scale, cfg.rank_padded)
    return _attend_cached(cfg, sel, w, q, keys, values, valid).astype(out_dtype)
