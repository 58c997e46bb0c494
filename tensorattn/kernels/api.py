"""The public, checked entry points: validate, then dispatch to an implementation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from tensorattn.kernels import (
    blocked,
    causal_scan,
    configs,
    mosaic_gpu,
    pallas,
    polynomial,
    reference,
    spine,
)
from tensorattn.kernels.configs import KernelConfig
from tensorattn.kernels.spine import Unsupported

# Implementation name -> module exposing `attention(q, keys, values, spec, config)`.
IMPLEMENTATIONS = {
    "reference": reference,
    "blocked": blocked,
    "polynomial": polynomial,
    "pallas": pallas,
    # Not tried by `implementation=None` until measured on a GPU (docs/pallas.md).
    "mosaic_gpu": mosaic_gpu,
}
# Without an accelerator kernel, short key sequences go to "reference": with at most this many
# key tuples per query and this many scores in all, materialising the scores beats the tiled
# scan (measured fwd+grad, order 3, 2-core CPU: 2.5-3x faster at S1=S2=10..16, equal at 32,
# 2x slower at 64).
REFERENCE_MAX_TUPLES = 32 * 32
REFERENCE_MAX_SCORES = 1 << 24


def _candidates(q, keys) -> list[str]:
    """The exact implementations `implementation=None` tries, in order: pallas on GPU (on
    TPU it compiles but has not been run: docs/pallas.md, "TPU"), the reference for short
    keys, blocked (runs every call)."""
    order = ["pallas"] if jax.default_backend() == "gpu" else []
    tuples = math.prod(k.shape[1] for k in keys)
    b, t, n, _ = q.shape
    if tuples <= REFERENCE_MAX_TUPLES and b * t * n * tuples <= REFERENCE_MAX_SCORES:
        order.append("reference")
    return order + ["blocked"]


def resolve(implementation: str | None, config: KernelConfig | None, options: Mapping):
    """`(implementation, config)` of one call; `(None, None)` lets the default choose.
    ValueError names an unknown implementation, a config of another implementation, or
    keyword options without an implementation that takes them."""
    if implementation is None and config is not None:
        if not isinstance(config, KernelConfig):
            raise ValueError(f"config must be a KernelConfig, got {type(config).__name__}")
        implementation = config.implementation
    if implementation is None:
        if not options:
            return None, None
        takers = {
            name: sorted(set(options) & {f.name for f in dataclasses.fields(cls)})
            for name, cls in configs.CONFIGS.items()
        }
        hint = "; ".join(
            f"{', '.join(found)} {'is an option' if len(found) == 1 else 'are options'} "
            f"of implementation={name!r}"
            for name, found in takers.items()
            if found
        )
        raise ValueError(
            f"keyword options {sorted(options)} need an implementation: "
            f"{hint or 'no implementation takes them'}. Pass implementation=... (or a "
            "config=...) naming the kernel they configure"
        )
    return implementation, configs.config_for(implementation, config, options)


def _run(name: str, q, keys, values, spec, config):
    return IMPLEMENTATIONS[name].attention(q, keys, values, spec, config)


def _attend(q, keys, values, spec, implementation, config):
    if implementation is not None:
        try:
            return _run(implementation, q, keys, values, spec, config)
        except Unsupported as e:
            raise ValueError(f"implementation={implementation!r} cannot run this call: {e}") from e
    for name in _candidates(q, keys):
        try:
            return _run(name, q, keys, values, spec, configs.CONFIGS[name]())
        except Unsupported:
            continue
    raise AssertionError("the blocked kernel runs every call")  # pragma: no cover


def _sanitize(keys, values, spec):
    """Makes masked positions harmless whatever they hold.

    Returns keys and values with non-finite entries and padding-masked positions set to 0,
    and `poisoned [B,T|1,K]`: the query rows (per key/value head) with an allowed key tuple
    that touches a non-finite entry of a valid key or value; the caller sets those whole rows
    to NaN (their exact result is not finite). Rows that cannot see such an entry (causal future,
    outside a window, other batch rows or heads) keep their exact, finite result and
    gradients. Cost: one elementwise pass over keys and values, `O(B·T·K)` prefix sums.
    """
    out_keys, out_values = [], []
    has_pair = True  # row has an allowed tuple: every key set has an allowed position
    touched = False  # some key set has an allowed position holding a non-finite entry
    for k, v, mask, window in zip(keys, values, spec.key_masks, spec.windows):
        k, v, bad = spine.clean_keys(k, v, mask)  # bad [B,S,K]
        valid = jnp.ones(k.shape[:2], bool) if mask is None else mask
        out_keys.append(k)
        out_values.append(v)
        has_pair = has_pair & causal_scan.seen(valid, spec.causal, window)[..., None]
        touched = touched | causal_scan.seen(bad, spec.causal, window)
    return tuple(out_keys), tuple(out_values), has_pair & touched


def _dispatch(q, keys, values, spec, implementation, config):
    b, t, n, _ = q.shape
    hv = values[0].shape[-1]
    if min(b, t, hv, *(k.shape[1] for k in keys)) == 0:
        # Nothing to compute (or no key at all: every row has no allowed tuple): zeros.
        return jnp.zeros((b, t, n, hv), jnp.result_type(q))
    keys, values, poisoned = _sanitize(keys, values, spec)
    out = _attend(q, keys, values, spec, implementation, config)
    rows = jnp.repeat(poisoned, n // keys[0].shape[2], axis=2)  # kv head -> its query heads
    return jnp.where(rows[..., None], jnp.array(jnp.nan, out.dtype), out)


def tensor_attention(
    q,
    k1,
    k2,
    v1,
    v2,
    *,
    implementation: str | None = None,
    config: KernelConfig | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    k1_mask=None,
    k2_mask=None,
    scale=None,
    **options,
):
    """Order-3 tensor attention (docs/math.md §1): each query softmaxes over all key pairs.

    Shapes: `q [B,T,N,H]`, `k1 [B,S1,K,H]`, `k2 [B,S2,K,H]`, `v1 [B,S1,K,Hv]`, `v2 [B,S2,K,Hv]`
    with `N % K == 0` (query head `n` uses key/value head `n // (N // K)`); returns `[B,T,N,Hv]`
    in `q`'s dtype. `N`, `K` and `H` must be at least 1. `scale`: a finite Python float
    (default `1/sqrt(H)`), or a JAX array of shape `()` or `[N]` (per query head, e.g. learned:
    gradients flow into it). `k1_mask [B,S1]`/`k2_mask [B,S2]`: boolean arrays, True marks a
    valid key (other dtypes, e.g. additive 0/-inf float masks, raise ValueError). `causal`
    allows pair `(a,b)` iff `a <= i` and `b <= i`. `window=(w1,w2)` implies causal and further
    requires `i-w1 < a` and `i-w2 < b`; an entry None leaves that key set unbounded, so
    `window=(None, None)` is `causal=True`.

    `implementation`: "reference", "blocked", "polynomial", "pallas", or None: the config's
    implementation if `config` is given, else the best exact one that runs the call (pallas
    on GPU, the reference for short keys, blocked). `config`: the implementation's typed
    config (`BlockedConfig`, `PallasConfig`, `PolynomialConfig`, `ReferenceConfig`);
    `options`: its fields as keywords, a shorthand for the same config (they need an
    `implementation`). An option the implementation does not take, or an implementation that
    cannot run the call (e.g. pallas at order 2 or without a GPU), raises ValueError saying so.

    Edge cases, the same for every implementation:
    - A query with no allowed pair returns zeros, with zero gradients. Zero-size inputs
      (`B`, `T`, `S1`, `S2` or `Hv` = 0) return zeros of shape `[B,T,N,Hv]` without calling
      the implementation.
    - Masked positions never contribute, whatever they hold: NaN/inf in keys or values that a
      query cannot see (padding, causal future, outside its window) leave its output and
      gradients exact. A non-finite entry in a key or value a query can see (an allowed pair
      touches it) makes that query's output row NaN (for the query heads of that key/value
      head); its gradient contributions are zero.
    - A query whose scores overflow float32 (|score| above ~3.4e38 from finite entries) gets
      a NaN row from the exact kernels, as a softmax over inf does; the polynomial method
      gives such rows zeros and says so (docs/kernels.md).
    """
    implementation, config = resolve(implementation, config, options)
    if window is not None:
        if not isinstance(window, Sequence) or len(window) != 2:
            raise ValueError(f"window must be a pair (w1, w2) of positive ints, got {window!r}")
    q, spec = spine.prepare(
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
    return _dispatch(q, (k1, k2), (v1, v2), spec, implementation, config)


def higher_order_attention(
    q,
    keys: Sequence,
    values: Sequence,
    *,
    implementation: str | None = None,
    config: KernelConfig | None = None,
    causal: bool = False,
    key_masks: Sequence | None = None,
    scale=None,
    **options,
):
    """Order `t = len(keys) + 1` attention (t = 2, 3, 4): one softmax over all key tuples.

    `keys[j] [B,S_j,K,H]`, `values[j] [B,S_j,K,Hv]`, `key_masks[j] [B,S_j]` or None.
    Order 2 is ordinary softmax attention. `implementation`, `config`, `options`, masks,
    `scale`, `causal` and the edge cases (empty inputs, non-finite keys or values) behave as
    in `tensor_attention`; sliding windows are `tensor_attention`'s (order 3) only.
    """
    if "window" in options:
        raise ValueError(
            "higher_order_attention takes no window (causal and key_masks only); sliding "
            "windows are tensor_attention's (order 3)"
        )
    implementation, config = resolve(implementation, config, options)
    keys, values = tuple(keys), tuple(values)
    q, spec = spine.prepare_tuples(q, keys, values, causal=causal, key_masks=key_masks, scale=scale)
    return _dispatch(q, keys, values, spec, implementation, config)
