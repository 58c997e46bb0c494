"""Shape and argument checks shared by every implementation (one public entry point)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Validated, normalised arguments of one attention call.

    `windows[j]` is the causal sliding window of key set `j` (None: unbounded);
    `key_masks[j]` is a `[B, S_j]` boolean array or None.
    """

    scale: float
    causal: bool
    windows: tuple[int | None, ...]
    key_masks: tuple[Array | None, ...]

    @property
    def order(self) -> int:
        return len(self.windows) + 1


def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def validate(
    q,
    keys: Sequence,
    values: Sequence,
    *,
    causal: bool,
    windows: Sequence[int | None] | None,
    key_masks: Sequence | None,
    scale: float | None,
    key_names: Sequence[str],
    value_names: Sequence[str],
    mask_names: Sequence[str],
) -> AttentionSpec:
    """Checks shapes and arguments; raises ValueError naming the argument and the shapes."""
    if len(keys) != len(values):
        raise ValueError(f"got {len(keys)} key sets but {len(values)} value sets")
    if not 1 <= len(keys) <= 3:
        raise ValueError(f"order must be 2, 3 or 4 (1-3 key sets), got {len(keys)} key sets")
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
            if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
                raise ValueError(f"window sizes must be positive ints, got window={tuple(windows)}")
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
    if scale is None:
        scale = h**-0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a Python float, got {scale!r}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return AttentionSpec(
        scale=float(scale),
        causal=bool(causal or causal_needed),
        windows=tuple(windows),
        key_masks=tuple(masks),
    )
