"""The public, checked entry points: validate, then dispatch to an implementation."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import jax

from tensorattn.kernels import validation

# Implementation name -> module exposing `attention(q, keys, values, spec, **options)`.
IMPLEMENTATIONS = {
    "reference": "tensorattn.kernels.reference",
    "blocked": "tensorattn.kernels.blocked",
    "polynomial": "tensorattn.kernels.polynomial",
    "pallas": "tensorattn.kernels.pallas",
}
EXACT_PREFERENCE = ("pallas", "blocked")
# Without an accelerator kernel, short key sequences go to "reference": with at most this many
# key tuples per query and this many scores in all, materialising the scores beats the tiled
# scan (measured fwd+grad, order 3, 2-core CPU: 2.5-3x faster at S1=S2=10..16, equal at 32,
# 2x slower at 64).
REFERENCE_MAX_TUPLES = 32 * 32
REFERENCE_MAX_SCORES = 1 << 24


def _module(name: str):
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation={name!r}; choose one of {sorted(IMPLEMENTATIONS)} or None"
        )
    try:
        return importlib.import_module(IMPLEMENTATIONS[name])
    except ModuleNotFoundError as e:
        raise ValueError(f"implementation={name!r} is not available in this build: {e}") from e


def _default_implementation(q, keys, spec, options) -> str:
    """Best exact implementation that supports this call on the default backend: pallas on
    GPU/TPU where it supports the call, else reference for short keys, else blocked."""
    if jax.default_backend() in ("gpu", "tpu"):
        try:
            pallas = _module("pallas")
        except ValueError:
            pallas = None
        if pallas is not None and pallas.supports(q, keys, spec, **options):
            return "pallas"
    tuples = math.prod(k.shape[1] for k in keys)
    if not options and tuples <= REFERENCE_MAX_TUPLES:
        b, t, n, _ = q.shape
        if b * t * n * tuples <= REFERENCE_MAX_SCORES:
            return "reference"
    return "blocked"


def _dispatch(q, keys, values, spec, implementation, options):
    if implementation is None:
        implementation = _default_implementation(q, keys, spec, options)
    return _module(implementation).attention(q, tuple(keys), tuple(values), spec, **options)


def tensor_attention(
    q,
    k1,
    k2,
    v1,
    v2,
    *,
    implementation: str | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    k1_mask=None,
    k2_mask=None,
    scale: float | None = None,
    **options,
):
    """Order-3 tensor attention (MATH.md section 1): each query softmaxes over all key pairs.

    Shapes: `q [B,T,N,H]`, `k1 [B,S1,K,H]`, `k2 [B,S2,K,H]`, `v1 [B,S1,K,Hv]`, `v2 [B,S2,K,Hv]`
    with `N % K == 0` (query head `n` uses key/value head `n // (N // K)`); returns `[B,T,N,Hv]`
    in `q`'s dtype. `scale` defaults to `1/sqrt(H)`. `k1_mask [B,S1]`/`k2_mask [B,S2]`: True
    marks a valid key. `causal` allows pair `(a,b)` iff `a <= i` and `b <= i`; `window=(w1,w2)`
    further requires `i-w1 < a` and `i-w2 < b`. `implementation`: "reference", "blocked",
    "polynomial", "pallas", or None for the best exact one available. `options` go to the
    implementation (e.g. `block_sizes=BlockSizes(...)` for "blocked").
    """
    if window is not None:
        if not isinstance(window, Sequence) or len(window) != 2:
            raise ValueError(f"window must be a pair (w1, w2) of positive ints, got {window!r}")
    spec = validation.validate(
        q,
        (k1, k2),
        (v1, v2),
        causal=causal,
        windows=None if window is None else tuple(window),
        key_masks=(k1_mask, k2_mask),
        scale=scale,
        key_names=("k1", "k2"),
        value_names=("v1", "v2"),
        mask_names=("k1_mask", "k2_mask"),
    )
    return _dispatch(q, (k1, k2), (v1, v2), spec, implementation, options)


def higher_order_attention(
    q,
    keys: Sequence,
    values: Sequence,
    *,
    implementation: str | None = None,
    causal: bool = False,
    key_masks: Sequence | None = None,
    scale: float | None = None,
    **options,
):
    """Order `t = len(keys) + 1` attention (t = 2, 3, 4): one softmax over all key tuples.

    `keys[j] [B,S_j,K,H]`, `values[j] [B,S_j,K,Hv]`, `key_masks[j] [B,S_j]` or None.
    Order 2 is ordinary softmax attention.
    """
    keys, values = tuple(keys), tuple(values)
    m = len(keys)
    spec = validation.validate(
        q,
        keys,
        values,
        causal=causal,
        windows=None,
        key_masks=None if key_masks is None else tuple(key_masks),
        scale=scale,
        key_names=tuple(f"keys[{j}]" for j in range(m)),
        value_names=tuple(f"values[{j}]" for j in range(m)),
        mask_names=tuple(f"key_masks[{j}]" for j in range(m)),
    )
    return _dispatch(q, keys, values, spec, implementation, options)
