"""Exact streaming tensor attention in plain JAX (docs/math.md §3), any order 2-4.

Tiles: a query tile (all query heads of a key/value group packed into its rows), a small
tile of each *outer* key set (all but the last) and a tile of the *inner* (last) key set.
For outer key tuple `A`, the scores are one matrix product `(q_tile * k_outer[A]) @ k_inner^T`
and the values one product `P @ v_inner` followed by an elementwise `v_outer[A]` product.
A `lax.scan` runs over the statically enumerated list of *live* tiles (causal and window
masks drop whole tiles, so work follows the allowed tuples) with an online softmax.
`jax.custom_vjp` saves only the output and the log-sum-exp; the backward pass recomputes
each tile. No array ever has more than `O(T·(H+Hv) + tile)` elements.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tensorattn.kernels import spine
from tensorattn.kernels.configs import BlockedConfig
from tensorattn.kernels.spine import AttentionSpec


def _acc(*arrays):
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return spine.accumulation_dtype(*(x.dtype for x in arrays))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one blocked call: the call and its fitted tiles."""

    call: spine.Call
    block_q: int
    block_outer: int
    block_inner: int

    @classmethod
    def fitted(cls, call: spine.Call, config: BlockedConfig) -> _Config:
        """Tiles of `config` (None: the defaults) clamped to the (8-rounded) lengths and to
        the windows, keeping work minimal."""
        # Under a causal mask narrower inner tiles follow the diagonal more closely
        # (T=512, H=64 on 2 CPU cores: 0.41 of the full time instead of 0.43).
        block_q = config.block_q or 64
        block_outer = config.block_outer or 32
        block_inner = config.block_inner or (64 if call.causal else 128)

        def clamp(block, n, window=None):
            limit = _round_up(n, 8)
            if window is not None:
                limit = min(limit, _round_up(window, 8))
            return max(1, min(block, limit))

        windows, lengths = call.windows, call.lengths
        w_inner = windows[-1]
        w_outer = min((w for w in windows[:-1] if w is not None), default=None)
        return cls(
            call=call,
            block_q=clamp(block_q, call.t, w_inner),
            block_outer=clamp(block_outer, min(lengths[:-1], default=1), w_outer),
            block_inner=clamp(block_inner, lengths[-1], w_inner),
        )

    @property
    def key_blocks(self) -> tuple[int, ...]:
        m = len(self.call.lengths)
        return (self.block_outer,) * (m - 1) + (self.block_inner,)

    @property
    def num_q_tiles(self) -> int:
        return -(-self.call.t // self.block_q)

    def live_tiles(self) -> np.ndarray:
        """`[num_live, 1 + m]` int32 tile indices (query tile, one per key set) with any
        allowed tuple under the causal/window masks."""
        bq, c = self.block_q, self.call
        rows = []
        for qi in range(self.num_q_tiles):
            first, last = qi * bq, min(c.t, (qi + 1) * bq) - 1
            ranges = [
                range(*spine.tile_range(first, last, s, bk, c.causal, w))
                for s, bk, w in zip(c.lengths, self.key_blocks, c.windows)
            ]
            rows.extend((qi, *combo) for combo in itertools.product(*ranges))
        return np.asarray(rows, np.int32).reshape(-1, 1 + len(c.lengths))


_dot = spine.dot


def _outer_product(rows_list):
    """Products over tuples: `[n_j, X]` each -> `[prod n_j, X]`."""
    out = rows_list[0]
    for r in rows_list[1:]:
        out = (out[:, None] * r[None, :]).reshape((-1,) + r.shape[1:])
    return out


class _Tile:
    """One live tile: slices of the inputs and its allowed-tuple mask."""

    def __init__(self, cfg: _Config, idx, q_tiles, qpos_tiles, keys, values, valid):
        m = len(keys)
        self.q = q_tiles[idx[0]]  # [rows, H]
        qpos = qpos_tiles[idx[0]]  # [rows]
        self.k = [k[idx[j + 1]] for j, k in enumerate(keys)]  # [bk_j, H]
        self.v = [v[idx[j + 1]] for j, v in enumerate(values)]  # [bk_j, Hv]
        oks = []
        for j in range(m):
            bk = cfg.key_blocks[j]
            kpos = idx[j + 1] * bk + jnp.arange(bk)
            ok = valid[j][idx[j + 1]][None, :] & spine.allowed(
                qpos[:, None], kpos[None, :], cfg.call.causal, cfg.call.windows[j]
            )
            oks.append(jnp.broadcast_to(ok, (qpos.shape[0], bk)))  # [rows, bk_j]
        if m > 1:
            self.k_outer = _outer_product(self.k[:-1])  # [A, H]
            self.v_outer = _outer_product(self.v[:-1])  # [A, Hv]
            ok_outer = _outer_product([o.T for o in oks[:-1]])  # [A, rows]
            self.x = self.k_outer[:, None, :] * self.q[None]  # [A, rows, H]
        else:
            self.k_outer = self.v_outer = None
            ok_outer = jnp.ones((1, qpos.shape[0]), bool)
            self.x = self.q[None]
        self.allowed = ok_outer[:, :, None] & oks[-1][None]  # [A, rows, bk]

    def scores(self):
        a, rows, h = self.x.shape
        s = _dot(self.x.reshape(a * rows, h), self.k[-1], (1, 1)).reshape(a, rows, -1)
        return jnp.where(self.allowed, s, -jnp.inf)

    def mix_values(self, p):
        """`sum_A v_outer[A] * (p[A] @ v_inner)` -> `[rows, Hv]` (float32)."""
        a, rows, bk = p.shape
        w = _dot(p.reshape(a * rows, bk).astype(self.v[-1].dtype), self.v[-1], (1, 0))
        w = w.reshape(a, rows, -1)
        if self.v_outer is None:
            return w[0]
        return spine.einsum("arv,av->rv", w, self.v_outer.astype(w.dtype))


def _split_heads(q, keys, values, valid, cfg: _Config):
    """Pads to tile multiples and lays out per-(batch, kv-head) tiles."""
    kv = keys[0].shape[2]
    g = q.shape[2] // kv
    bq, nq = cfg.block_q, cfg.num_q_tiles
    qpos = jnp.tile(jnp.arange(nq * bq).reshape(nq, 1, bq), (1, g, 1)).reshape(nq, g * bq)
    k_t = [spine.key_tiles(k, bk) for k, bk in zip(keys, cfg.key_blocks)]
    v_t = [spine.key_tiles(v, bk) for v, bk in zip(values, cfg.key_blocks)]
    valid_t = [_valid_tiles(m, kv, bk) for m, bk in zip(valid, cfg.key_blocks)]
    return spine.row_tiles(q, kv, bq), qpos, k_t, v_t, valid_t


def _valid_tiles(valid, kv: int, bk: int):
    """Pads a validity `[B,S]` -> `[B,K,nt,bk]`."""
    b, s = valid.shape
    nt = -(-s // bk)
    x = jnp.pad(valid, ((0, 0), (0, nt * bk - s)))
    return jnp.broadcast_to(x.reshape(b, 1, nt, bk), (b, kv, nt, bk))


def _forward_one_head(cfg: _Config, q_tiles, qpos, keys, values, valid):
    """Online softmax over the live tiles of one (batch, kv-head)."""
    nq, rows, _ = q_tiles.shape
    hv = values[0].shape[-1]
    live = jnp.asarray(cfg.live_tiles())

    def step(carry, idx):
        m_all, l_all, acc_all = carry
        tile = _Tile(cfg, idx, q_tiles, qpos, keys, values, valid)
        s = tile.scores()  # [A, rows, bk]
        m_old, l_old, acc_old = m_all[idx[0]], l_all[idx[0]], acc_all[idx[0]]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=(0, 2)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[None, :, None])
        alpha = jnp.exp(m_old - m_safe)
        l_new = alpha * l_old + jnp.sum(p, axis=(0, 2))
        acc_new = alpha[:, None] * acc_old + tile.mix_values(p)
        put = functools.partial(jax.lax.dynamic_update_index_in_dim, index=idx[0], axis=0)
        return (put(m_all, m_new), put(l_all, l_new), put(acc_all, acc_new)), None

    init = (
        jnp.full((nq, rows), -jnp.inf, _acc(q_tiles)),
        jnp.zeros((nq, rows), _acc(q_tiles)),
        jnp.zeros((nq, rows, hv), _acc(q_tiles)),
    )
    (m_all, l_all, acc_all), _ = jax.lax.scan(step, init, live)
    nonempty = l_all > 0
    out = acc_all / jnp.where(nonempty, l_all, 1.0)[..., None]
    lse = jnp.where(nonempty, m_all + jnp.log(jnp.where(nonempty, l_all, 1.0)), 0.0)
    return out, lse


def _backward_one_head(cfg: _Config, q_tiles, qpos, keys, values, valid, lse, do_tiles, delta):
    """Gradients by recomputing each live tile from the saved log-sum-exp (docs/math.md §3)."""
    live = jnp.asarray(cfg.live_tiles())

    def step(carry, idx):
        dq_all, dk_all, dv_all = carry
        tile = _Tile(cfg, idx, q_tiles, qpos, keys, values, valid)
        a, rows, h = tile.x.shape
        do = do_tiles[idx[0]]  # [rows, Hv]
        p = jnp.exp(tile.scores() - lse[idx[0]][None, :, None])  # [A, rows, bk]; masked -> 0
        y = do[None] if tile.v_outer is None else tile.v_outer[:, None, :] * do[None]  # [A,rows,Hv]
        y = y.astype(tile.v[-1].dtype)
        dp = _dot(y.reshape(a * rows, -1), tile.v[-1], (1, 1)).reshape(a, rows, -1)
        # Masked tuples: 0, not p · dp (dp of a masked tuple may overflow: 0 · inf is NaN).
        ds = jnp.where(tile.allowed, p * (dp - delta[idx[0]][None, :, None]), 0.0)
        p2 = p.reshape(a * rows, -1).astype(tile.v[-1].dtype)
        ds2 = ds.reshape(a * rows, -1).astype(tile.k[-1].dtype)
        dv_inner = _dot(p2, y.reshape(a * rows, -1), (0, 0))  # [bk, Hv]
        dk_inner = _dot(ds2, tile.x.reshape(a * rows, h), (0, 0))  # [bk, H]
        z = _dot(ds2, tile.k[-1], (1, 0)).reshape(a, rows, h)  # d(x)
        if tile.k_outer is None:
            dq = z[0]
            dk_outer_grads, dv_outer_grads = [], []
        else:
            dq = jnp.einsum("arh,ah->rh", z, tile.k_outer.astype(z.dtype))
            u = jnp.einsum("arh,rh->ah", z, tile.q.astype(z.dtype))  # d(k_outer) [A, H]
            w = _dot(p2, tile.v[-1], (1, 0)).reshape(a, rows, -1)
            tv = jnp.einsum("arv,rv->av", w, do.astype(w.dtype))  # d(v_outer) [A, Hv]
            dk_outer_grads = _outer_factor_grads(u, tile.k[:-1])
            dv_outer_grads = _outer_factor_grads(tv, tile.v[:-1])
        qi = idx[0]
        dq_all = jax.lax.dynamic_update_index_in_dim(dq_all, dq_all[qi] + dq, qi, 0)
        grads_k = dk_outer_grads + [dk_inner]
        grads_v = dv_outer_grads + [dv_inner]
        dk_all = tuple(
            jax.lax.dynamic_update_index_in_dim(d, d[idx[j + 1]] + g, idx[j + 1], 0)
            for j, (d, g) in enumerate(zip(dk_all, grads_k))
        )
        dv_all = tuple(
            jax.lax.dynamic_update_index_in_dim(d, d[idx[j + 1]] + g, idx[j + 1], 0)
            for j, (d, g) in enumerate(zip(dv_all, grads_v))
        )
        return (dq_all, dk_all, dv_all), None

    init = (
        jnp.zeros(q_tiles.shape, _acc(q_tiles)),
        tuple(jnp.zeros(k.shape, _acc(k)) for k in keys),
        tuple(jnp.zeros(v.shape, _acc(v)) for v in values),
    )
    (dq, dk, dv), _ = jax.lax.scan(step, init, live)
    return dq, dk, dv


def _outer_factor_grads(d_prod, factors):
    """Given the cotangent `[A, X]` of an outer product of `factors[j] [n_j, X]`, returns the
    cotangent `[n_j, X]` of each factor."""
    sizes = [f.shape[0] for f in factors]
    d = d_prod.reshape(*sizes, -1)
    grads = []
    for j in range(len(factors)):
        others = d
        for jj, f in enumerate(factors):
            if jj != j:
                shape = [1] * len(factors) + [f.shape[-1]]
                shape[jj] = f.shape[0]
                others = others * f.astype(d.dtype).reshape(shape)
        axes = tuple(jj for jj in range(len(factors)) if jj != j)
        grads.append(others.sum(axis=axes))
    return grads


def _per_head(fn):
    """vmaps a per-(batch, kv-head) function over both axes."""
    return jax.vmap(jax.vmap(fn))


def _prepare(cfg: _Config, q, keys, values, valid):
    q_scaled = (q.astype(_acc(q)) * cfg.call.scale).astype(q.dtype)
    return _split_heads(q_scaled, keys, values, valid, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(cfg: _Config, q, keys, values, valid):
    out, _ = _blocked_fwd(cfg, q, keys, values, valid)
    return out


def _blocked_fwd(cfg: _Config, q, keys, values, valid):
    q_t, qpos, k_t, v_t, valid_t = _prepare(cfg, q, keys, values, valid)
    fwd = _per_head(lambda qq, kk, vv, ok: _forward_one_head(cfg, qq, qpos, kk, vv, ok))
    out_t, lse_t = fwd(q_t, k_t, v_t, valid_t)
    out = spine.merge_row_tiles(out_t, cfg.call.t, cfg.block_q).astype(q.dtype)
    return out, (q, keys, values, valid, out, lse_t)


def _blocked_bwd(cfg: _Config, res, d_out):
    q, keys, values, valid, out, lse_t = res
    q_t, qpos, k_t, v_t, valid_t = _prepare(cfg, q, keys, values, valid)
    f32 = _acc(d_out, out)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    # Lay dO and Delta out like q's tiles.
    kv = keys[0].shape[2]
    d_out_t = spine.row_tiles(d_out, kv, cfg.block_q)
    delta_t = spine.row_tiles(delta, kv, cfg.block_q)[..., 0]
    bwd = _per_head(
        lambda qq, kk, vv, ok, ll, dd, de: _backward_one_head(cfg, qq, qpos, kk, vv, ok, ll, dd, de)
    )
    dq_t, dk_t, dv_t = bwd(q_t, k_t, v_t, valid_t, lse_t, d_out_t, delta_t)
    dq = spine.merge_row_tiles(dq_t, cfg.call.t, cfg.block_q) * cfg.call.scale
    dq = dq.astype(q.dtype)
    dk = tuple(spine.merge_key_tiles(d, k) for d, k in zip(dk_t, keys))
    dv = tuple(spine.merge_key_tiles(d, v) for d, v in zip(dv_t, values))
    return dq, dk, dv, tuple(None for _ in valid)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
_blocked_cached = spine.cached(_blocked)


def attention(q, keys, values, spec: AttentionSpec, config: BlockedConfig | None = None):
    """Exact blocked attention (docs/math.md §3) with `config`'s tiles fitted to the call."""
    cfg = _Config.fitted(spec.call(q, keys), config or BlockedConfig())
    valid = spec.valid(q.shape[0], cfg.call.lengths)
    return _blocked_cached(cfg, q, tuple(keys), tuple(values), valid)


def flops(t: int, lengths, heads: int, head_dim: int, value_dim: int | None = None) -> float:
    """Forward FLOPs without masks: `2·T·prod(S)·N·(H + Hv)` (= `4·T·S1·S2·N·H` at order 3)."""
    value_dim = head_dim if value_dim is None else value_dim
    return 2.0 * t * math.prod(lengths) * heads * (head_dim + value_dim)
