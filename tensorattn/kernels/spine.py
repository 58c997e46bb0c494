"""The normalised attention call shared by every implementation (docs/math.md §1-§3).

One place for what the kernels have in common:
- `prepare`: checks shapes and arguments (ValueError naming the argument) and returns the
  `AttentionSpec`; an array `scale` is folded into `q` here.
- The one mask predicate `allowed` (causal / window; padding masks are `valid` vectors) and
  its range arithmetic (`key_range`, `tile_range`, `query_range`) used by the reference's
  masks, the blocked kernel's tile masks and live-tile table, the Pallas loop bounds.
- The head layouts: grouped query heads `[B,T,N,X]` <-> per key/value head rows.
- The dot/accumulation policy `dot`/`einsum`: float32 accumulation (float64 for float64
  inputs) at full precision for float32/float64 operands.
- `Call`: the static (hashable) part of a call that the kernels' own configs extend.
- `Unsupported`: an implementation raises it from the code that runs it when it cannot run
  a call; `implementation=None` then tries the next one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Unsupported(ValueError):
    """An implementation cannot run this call (order, dtype, backend, tile constraints...);
    the message says why. `implementation=None` falls back to the next implementation."""


# ---------------------------------------------------------------------------------------------
# The call.


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Validated, normalised arguments of one attention call.

    `scale` is the score scale (1.0 when an array scale was folded into `q`: then
    `static_scale` is False); `windows[j]` is the causal sliding window of key set `j` (None:
    unbounded; a window covering the whole sequence is None); `key_masks[j]` is a `[B, S_j]`
    boolean array or None.
    """

    scale: float
    causal: bool
    windows: tuple[int | None, ...]
    key_masks: tuple[Array | None, ...]
    static_scale: bool = True

    @property
    def order(self) -> int:
        return len(self.windows) + 1

    def call(self, q, keys) -> Call:
        """The static description of this call for inputs `q [B,T,N,H]`, `keys[j]`."""
        return Call(
            scale=self.scale,
            causal=self.causal,
            windows=self.windows,
            t=q.shape[1],
            lengths=tuple(k.shape[1] for k in keys),
            heads=q.shape[2],
            kv_heads=keys[0].shape[2],
        )

    def valid(self, batch: int, lengths) -> tuple[Array, ...]:
        """Per key set, the `[B, S_j]` boolean validity (all True without a padding mask)."""
        return tuple(
            jnp.ones((batch, s), bool) if m is None else m for s, m in zip(lengths, self.key_masks)
        )


@dataclasses.dataclass(frozen=True)
class Call:
    """Static (hashable) part of one call; the kernels' configs hold one."""

    scale: float
    causal: bool
    windows: tuple
    t: int
    lengths: tuple
    heads: int
    kv_heads: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to 1, true or yes (any case)."""
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


class CallView:
    """Mixin of a kernel's static tile config that holds `call: Call` and `bq` (query
    positions per program): the call's fields as attributes, and the row tiling. A config may
    set `splits` > 1: each tile of `bq` positions is then `splits` row tiles, each with
    `G / splits` of the group's heads (rows are ordered (head, position), so a row tile is
    still a contiguous block of rows)."""

    splits = 1

    scale = property(lambda self: self.call.scale)
    causal = property(lambda self: self.call.causal)
    w1 = property(lambda self: self.call.windows[0])
    w2 = property(lambda self: self.call.windows[1])
    t = property(lambda self: self.call.t)
    s1 = property(lambda self: self.call.lengths[0])
    s2 = property(lambda self: self.call.lengths[1])
    kv_heads = property(lambda self: self.call.kv_heads)
    group = property(lambda self: self.call.group)

    @property
    def rows(self) -> int:
        """Rows of a program tile: the group's query heads times `bq` positions (over
        `splits`)."""
        return self.group * self.bq // self.splits

    @property
    def nq(self) -> int:
        """Row tiles (programs over query tiles)."""
        return self.nq_pos * self.splits

    @property
    def nq_pos(self) -> int:
        """Tiles of `bq` query positions."""
        return -(-self.t // self.bq)


def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def prepare(
    q,
    keys: Sequence,
    values: Sequence,
    *,
    causal: bool,
    windows: Sequence[int | None] | None,
    key_masks: Sequence | None,
    scale,
    key_names: Sequence[str],
    value_names: Sequence[str],
    mask_names: Sequence[str],
):
    """Checks shapes and arguments (ValueError naming the argument and the shapes) and returns
    `(q, spec)`: an array `scale` (shape `()` or `[N]`) is folded into `q` (per query head;
    gradients flow into it) and the spec's scale is then 1.0."""
    spec = validate(
        q,
        keys,
        values,
        causal=causal,
        windows=windows,
        key_masks=key_masks,
        scale=scale,
        key_names=key_names,
        value_names=value_names,
        mask_names=mask_names,
    )
    if _is_array(scale):
        q = scaled_queries(q, scale)
    return q, spec


def prepare_tuples(q, keys: Sequence, values: Sequence, *, causal: bool, key_masks, scale):
    """`prepare` for `higher_order_attention`-style calls: any number of key sets, no windows,
    arguments named `keys[j]`, `values[j]`, `key_masks[j]`."""
    m = len(keys)
    return prepare(
        q,
        tuple(keys),
        tuple(values),
        causal=causal,
        windows=None,
        key_masks=None if key_masks is None else tuple(key_masks),
        scale=scale,
        key_names=tuple(f"keys[{j}]" for j in range(m)),
        value_names=tuple(f"values[{j}]" for j in range(m)),
        mask_names=tuple(f"key_masks[{j}]" for j in range(m)),
    )


def scaled_queries(q, scale):
    """`q [B,T,N,H]` times `scale` (`()` or `[N]`), in `q`'s dtype."""
    f32 = jnp.promote_types(jnp.result_type(q), jnp.float32)
    s = jnp.asarray(scale).astype(f32)
    if s.ndim == 1:
        s = s[:, None]
    return (jnp.asarray(q).astype(f32) * s).astype(jnp.result_type(q))


def validate(
    q,
    keys: Sequence,
    values: Sequence,
    *,
    causal: bool,
    windows: Sequence[int | None] | None,
    key_masks: Sequence | None,
    scale,
    key_names: Sequence[str],
    value_names: Sequence[str],
    mask_names: Sequence[str],
) -> AttentionSpec:
    """Checks shapes and arguments; raises ValueError naming the argument and the shapes."""
    if len(keys) != len(values):
        raise ValueError(f"got {len(keys)} key sets but {len(values)} value sets")
    if not 1 <= len(keys) <= 3:
        raise ValueError(f"order must be 2, 3 or 4 (1-3 key sets), got {len(keys)} key sets")
    for name, x in [("q", q), *zip(key_names, keys), *zip(value_names, values)]:
        if not _is_array(x):
            raise ValueError(f"{name} must be an array (jax or numpy), got {type(x).__name__}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if len(_shape(q)) != 4:
        raise ValueError(f"q must have rank 4 [B,T,N,H], got shape {_shape(q)}")
    b, t, n, h = _shape(q)
    kv_heads = None
    hv = None
    for name, k in zip(key_names, keys):
        if len(_shape(k)) != 4:
            raise ValueError(f"{name} must have rank 4 [B,S,K,H], got shape {_shape(k)}")
        kb, _, kk, kh = _shape(k)
        if kb != b or kh != h:
            raise ValueError(
                f"{name} shape {_shape(k)} does not match q shape {_shape(q)} in batch or head dim"
            )
        if kv_heads is None:
            kv_heads = kk
        elif kk != kv_heads:
            raise ValueError(f"{name} has {kk} key/value heads but {key_names[0]} has {kv_heads}")
    for name, kname, v, k in zip(value_names, key_names, values, keys):
        if len(_shape(v)) != 4:
            raise ValueError(f"{name} must have rank 4 [B,S,K,Hv], got shape {_shape(v)}")
        if _shape(v)[:3] != _shape(k)[:3]:
            raise ValueError(
                f"{name} shape {_shape(v)} does not match {kname} shape {_shape(k)} in [B,S,K]"
            )
        if hv is None:
            hv = _shape(v)[3]
        elif _shape(v)[3] != hv:
            raise ValueError(
                f"{name} value dim {_shape(v)[3]} differs from {value_names[0]}'s {hv}"
            )
    if n == 0 or kv_heads == 0 or h == 0:
        raise ValueError(
            f"query heads N, key/value heads K and head dim H must be positive, got q shape "
            f"{_shape(q)} (N={n}, H={h}) and {key_names[0]} shape {_shape(keys[0])} (K={kv_heads})"
        )
    if n % kv_heads != 0:
        raise ValueError(
            f"query heads N={n} (q shape {_shape(q)}) must be a multiple of key/value heads "
            f"K={kv_heads} ({key_names[0]} shape {_shape(keys[0])})"
        )
    for x, name in [(q, "q"), *zip(keys, key_names), *zip(values, value_names)]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(x)}")
    lengths = [_shape(k)[1] for k in keys]
    if windows is not None:
        # Any window tuple implies causal: `(None, ..., None)` is exactly causal=True.
        if len(windows) != len(keys):
            raise ValueError(f"window must have {len(keys)} entries, got {tuple(windows)}")
        for w in windows:
            if w is not None and (
                not isinstance(w, numbers.Integral) or isinstance(w, bool) or w < 1
            ):
                raise ValueError(f"window sizes must be positive ints, got window={tuple(windows)}")
        windows = tuple(None if w is None else int(w) for w in windows)
        causal_needed = True
    else:
        windows = (None,) * len(keys)
        causal_needed = False
    if causal or causal_needed:
        if any(s != t for s in lengths):
            what = "causal=True" if causal else f"window={tuple(windows)}"
            shapes = ", ".join(f"{nm} {_shape(k)}" for nm, k in zip(key_names, keys))
            raise ValueError(f"{what} needs equal lengths, got q {_shape(q)}, {shapes}")
    masks: list = []
    key_masks = key_masks if key_masks is not None else (None,) * len(keys)
    if len(key_masks) != len(keys):
        raise ValueError(f"key_masks must have {len(keys)} entries, got {len(key_masks)}")
    for name, kname, m, s in zip(mask_names, key_names, key_masks, lengths):
        if m is None:
            masks.append(None)
            continue
        if _shape(m) != (b, s):
            raise ValueError(
                f"{name} must have shape [B,S]=({b}, {s}) to match {kname}, got {_shape(m)}"
            )
        dtype = jnp.result_type(m)
        if dtype != jnp.bool_:
            raise ValueError(
                f"{name} must be a boolean mask (True = valid key), got dtype {dtype}; an "
                "additive float mask (0 / -inf) is not accepted: pass `additive == 0` instead"
            )
        masks.append(jnp.asarray(m))
    static_scale = True
    if scale is None:
        scale = h**-0.5
    elif _is_array(scale):
        if _shape(scale) not in ((), (n,)):
            raise ValueError(
                f"an array scale must have shape () or [N]=({n},) (one per query head), got "
                f"{_shape(scale)}"
            )
        if not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
            raise ValueError(f"an array scale must be floating point, got {jnp.result_type(scale)}")
        scale, static_scale = 1.0, False
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise ValueError(
            f"scale must be a Python float or a JAX array of shape () or [N], got {scale!r}"
        )
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    causal = bool(causal or causal_needed)
    return AttentionSpec(
        scale=float(scale),
        causal=causal,
        # A window at least as long as the sequence is no window (causal already bounds it).
        windows=tuple(None if w is None or w >= t else w for w in windows),
        key_masks=tuple(masks),
        static_scale=static_scale,
    )


# ---------------------------------------------------------------------------------------------
# The mask predicate and its range arithmetic. Positions are Python ints (static tables) or
# int32 scalars/arrays (inside kernels); both work.


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def allowed(query_pos, key_pos, causal: bool, window: int | None):
    """Whether key position `key_pos` is allowed for query position `query_pos` (broadcast):
    causal: `a <= i`; a window `w` further requires `i - w < a` (docs/math.md §1). Padding
    masks are separate `valid` vectors ANDed in by each kernel. Returns True (a Python bool)
    when nothing constrains the pair."""
    ok = True
    if causal:
        ok = key_pos <= query_pos
    if window is not None:
        ok = ok & (key_pos > query_pos - window)
    return ok


def key_range(first, last, length: int, causal: bool, window: int | None):
    """Key positions `[lo, hi)` that some query in `first..last` may see."""
    lo, hi = 0, length
    if causal:
        hi = _min(hi, last + 1)
    if window is not None:
        lo = _max(lo, first - window + 1)
    return lo, hi


def full_range(first, last, causal: bool, window: int | None):
    """Key positions `[lo, hi)` that every query in `first..last` may see (`hi` None: no
    bound), so that pairs inside need no causal/window mask."""
    lo, hi = 0, None
    if causal:
        hi = first + 1
    if window is not None:
        lo = _max(lo, last - window + 1)
    return lo, hi


def tile_range(first, last, length: int, block: int, causal: bool, window: int | None):
    """Key tiles `[lo, hi)` (of `block` positions) that can hold a key that some query in
    `first..last` may see."""
    lo, hi = 0, -(-length // block)
    if causal:
        hi = _min(hi, last // block + 1)
    if window is not None:
        lo = _max(lo, (first - window + 1) // block)
    return lo, hi


def query_tile_range(k_first, k_last, num_tiles: int, block: int, causal: bool, window):
    """Query tiles `[lo, hi)` (of `block` positions) with a query that may see some key in
    `k_first..k_last`."""
    lo, hi = 0, num_tiles
    if causal:
        lo = _max(lo, k_first // block)
    if window is not None:
        hi = _min(hi, (k_last + window - 1) // block + 1)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Head layouts: query head `n` uses key/value head `n // G` (G = N // K).


def clean_keys(k_BSKH, v_BSKV, mask_BS=None):
    """`(k, v, bad [B,S,K])`: keys and values with non-finite entries (and, with a padding
    mask, padded positions) set to 0, and the valid positions whose key or value held a
    non-finite entry (a query that may see one has no finite result)."""
    finite_k, finite_v = jnp.isfinite(k_BSKH), jnp.isfinite(v_BSKV)
    bad_BSK = ~(jnp.all(finite_k, axis=-1) & jnp.all(finite_v, axis=-1))
    if mask_BS is not None:
        bad_BSK = bad_BSK & mask_BS[:, :, None]
        finite_k = finite_k & mask_BS[:, :, None, None]
        finite_v = finite_v & mask_BS[:, :, None, None]
    k_BSKH = jnp.where(finite_k, k_BSKH, jnp.zeros((), k_BSKH.dtype))
    v_BSKV = jnp.where(finite_v, v_BSKV, jnp.zeros((), v_BSKV.dtype))
    return k_BSKH, v_BSKV, bad_BSK


def split_heads(x_BTNX, kv_heads: int):
    """`[B,T,N,X]` -> `[B,K,T,G,X]`."""
    b, t, n, d = x_BTNX.shape
    return x_BTNX.reshape(b, t, kv_heads, n // kv_heads, d).transpose(0, 2, 1, 3, 4)


def merge_heads(x_BKTGX):
    """`[B,K,T,G,X]` -> `[B,T,N,X]`."""
    b, kv, t, g, d = x_BKTGX.shape
    return x_BKTGX.transpose(0, 2, 1, 3, 4).reshape(b, t, kv * g, d)


def row_tiles(x_BTNX, kv_heads: int, block_q: int):
    """Pads `[B,T,N,X]` to whole query tiles -> `[B,K,nq,G·block_q,X]`: a tile's rows are
    (head in the key/value group, position)."""
    b, t, n, d = x_BTNX.shape
    g = n // kv_heads
    nq = -(-t // block_q)
    x = jnp.pad(x_BTNX, ((0, 0), (0, nq * block_q - t), (0, 0), (0, 0)))
    x = x.reshape(b, nq, block_q, kv_heads, g, d).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, kv_heads, nq, g * block_q, d)


def merge_row_tiles(x_BKnRX, t: int, block_q: int):
    """`[B,K,nq,G·block_q,X]` -> `[B,T,N,X]` (drops the padding rows)."""
    b, kv, nq, rows, d = x_BKnRX.shape
    g = rows // block_q
    out = x_BKnRX.reshape(b, kv, nq, g, block_q, d).transpose(0, 2, 4, 1, 3, 5)
    return out.reshape(b, nq * block_q, kv * g, d)[:, :t]


def split_keys(x_BSKX):
    """`[B,S,K,X]` -> `[B,K,S,X]`."""
    return x_BSKX.transpose(0, 2, 1, 3)


def key_tiles(x_BSKX, block: int):
    """Pads `[B,S,K,X]` to whole tiles -> `[B,K,nt,block,X]`."""
    b, s, kv, d = x_BSKX.shape
    nt = -(-s // block)
    x = jnp.pad(x_BSKX, ((0, 0), (0, nt * block - s), (0, 0), (0, 0)))
    return x.reshape(b, nt, block, kv, d).transpose(0, 3, 1, 2, 4)


def merge_key_tiles(x_BKntX, like):
    """`[B,K,nt,block,X]` (or `[B,K,S_pad,X]`) -> `like`'s `[B,S,K,X]` shape and dtype."""
    b, s, kv, d = like.shape
    x = x_BKntX.reshape(b, kv, -1, d).transpose(0, 2, 1, 3)[:, :s]
    return x.astype(like.dtype)


# ---------------------------------------------------------------------------------------------
# The dot/accumulation policy.


def accumulation_dtype(*dtypes):
    """float32, or float64 when an input is float64."""
    return jnp.result_type(jnp.float32, *dtypes)


def _precision(*dtypes):
    wide = all(jnp.dtype(d).itemsize >= 4 for d in dtypes)
    return jax.lax.Precision.HIGHEST if wide else None


def dot(a, b, contract):
    """Matrix product `a @ b` contracting axis `contract[0]` of `a` with `contract[1]` of
    `b`: float32 accumulation (float64 for float64), full precision for float32 operands (no
    TF32 / bf16 passes), the operands' own precision for 16-bit ones."""
    return jax.lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=_precision(a.dtype, b.dtype),
        preferred_element_type=accumulation_dtype(a.dtype, b.dtype),
    )


def cached(kernel):
    """`kernel(static, *arrays)` under `jax.jit` with its first argument static (a hashable
    config or plan): an eager call then compiles once per (static, shapes), as a jitted
    caller's does. Traced anew on each eager call, the kernel's scan bodies and Pallas calls
    are new functions, which JAX's eager dispatch would compile every time."""
    return jax.jit(kernel, static_argnums=0)


def einsum(expr: str, *xs):
    """`jnp.einsum` under the same policy as `dot`."""
    dtypes = [x.dtype for x in xs]
    return jnp.einsum(
        expr, *xs, precision=_precision(*dtypes), preferred_element_type=accumulation_dtype(*dtypes)
    )
