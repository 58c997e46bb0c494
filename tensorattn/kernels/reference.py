"""Reference tensor attention: materialises every score with einsum (docs/math.md §1).

Readable definition for small sizes and tests: memory is `O(B·N·T·S1·...·Sm)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tensorattn.kernels import spine
from tensorattn.kernels.configs import ReferenceConfig
from tensorattn.kernels.spine import AttentionSpec

_KEY_LETTERS = "xyz"  # one letter per key set in the einsum strings


def allowed_pairs(spec: AttentionSpec, batch: int, t: int, lengths) -> jax.Array:
    """Boolean `[B, T, S_1, ..., S_m]` of allowed key tuples (broadcastable, not materialised
    beyond what the reference needs)."""
    m = len(lengths)
    allowed = jnp.ones((batch, t) + (1,) * m, bool)
    i = jnp.arange(t)
    for j, (s, window, mask) in enumerate(zip(lengths, spec.windows, spec.key_masks)):
        shape = [1, t] + [1] * m
        shape[2 + j] = s
        ok = spine.allowed(i[:, None], jnp.arange(s)[None, :], spec.causal, window)
        ok = jnp.broadcast_to(ok, (t, s)).reshape(shape)
        if mask is not None:
            mshape = [batch, 1] + [1] * m
            mshape[2 + j] = s
            ok = ok & mask.reshape(mshape)
        allowed = allowed & ok
    return allowed


def attention(q, keys, values, spec: AttentionSpec, config: ReferenceConfig | None = None):
    """`q [B,T,N,H]`, `keys[j] [B,S_j,K,H]`, `values[j] [B,S_j,K,Hv]` -> `[B,T,N,Hv]`."""
    b, t, n, h = q.shape
    kv = keys[0].shape[2]
    m = len(keys)
    letters = _KEY_LETTERS[:m]
    f32 = spine.accumulation_dtype(q.dtype)
    q_BKTGH = spine.split_heads(q.astype(f32), kv)
    operands = [k.astype(f32) for k in keys]
    key_terms = ",".join(f"b{c}kh" for c in letters)
    s = spine.einsum(f"bktgh,{key_terms}->bkgt{letters}", q_BKTGH, *operands) * spec.scale
    allowed = allowed_pairs(spec, b, t, [k.shape[1] for k in keys])[:, None, None]
    s = jnp.where(allowed, s, -jnp.inf)
    axes = tuple(range(4, 4 + m))
    s_max = jax.lax.stop_gradient(jnp.max(s, axis=axes, keepdims=True))
    s_max = jnp.where(jnp.isfinite(s_max), s_max, 0.0)
    p = jnp.exp(s - s_max)
    denom = jnp.sum(p, axis=axes, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    p = jnp.where(allowed, p, 0.0)  # the same values; drops masked tuples' cotangents
    # The values one key set at a time, last first, so that no tuple's product
    # v1[a]∘v2[b]... is formed: for a tuple with p = 0 it can overflow (0 · inf is NaN).
    w = p  # [B,K,G,T,S_1..S_j(,Hv)]
    for j in reversed(range(m)):
        held = letters[: j + 1] + ("v" if j < m - 1 else "")
        out_terms = "bktgv" if j == 0 else f"bkgt{letters[:j]}v"
        w = spine.einsum(f"bkgt{held},b{letters[j]}kv->{out_terms}", w, values[j].astype(f32))
    return spine.merge_heads(w).astype(q.dtype)
