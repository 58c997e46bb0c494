"""Float64 NumPy oracle for tensor attention (docs/math.md §1-§3).

Shares no code with `tensorattn`: it is the independent definition every kernel is tested
against. Orders 2-4, grouped heads, key masks, causal and window masks, forward and gradient.
"""

from __future__ import annotations

import numpy as np

_LETTERS = "xyz"


def _allowed(t, lengths, batch, causal, windows, masks):
    """Boolean [B, T, S_1, ..., S_m]."""
    m = len(lengths)
    allowed = np.ones((batch, t) + tuple(lengths), bool)
    i = np.arange(t)
    for j, s in enumerate(lengths):
        shape = [1, t] + [1] * m
        shape[2 + j] = s
        a = np.arange(s)
        ok = np.ones((t, s), bool)
        if causal:
            ok &= a[None, :] <= i[:, None]
        if windows is not None and windows[j] is not None:
            ok &= a[None, :] > i[:, None] - windows[j]
        allowed &= ok.reshape(shape)
        if masks is not None and masks[j] is not None:
            mshape = [batch, 1] + [1] * m
            mshape[2 + j] = s
            allowed &= np.asarray(masks[j], bool).reshape(mshape)
    return allowed


def _probabilities(q, keys, scale, causal, windows, masks):
    b, t, n, h = q.shape
    kv = keys[0].shape[2]
    g = n // kv
    m = len(keys)
    letters = _LETTERS[:m]
    q5 = q.reshape(b, t, kv, g, h)
    terms = ",".join(f"b{c}kh" for c in letters)
    s = np.einsum(f"btkgh,{terms}->bkgt{letters}", q5, *keys) * scale
    allowed = _allowed(t, [k.shape[1] for k in keys], b, causal, windows, masks)[:, None, None]
    s = np.where(allowed, s, -np.inf)
    axes = tuple(range(4, 4 + m))
    s_max = np.max(s, axis=axes, keepdims=True)
    s_max = np.where(np.isfinite(s_max), s_max, 0.0)
    p = np.exp(s - s_max)
    denom = p.sum(axis=axes, keepdims=True)
    return p / np.where(denom > 0, denom, 1.0), letters


def _per_head(q, scale):
    """A scale per query head (`[N]`) folded into q: `(q * scale, 1.0)`; else `(q, scale)`."""
    if scale is None or np.ndim(scale) == 0:
        return q, None if scale is None else float(scale)
    return np.asarray(q, np.float64) * np.asarray(scale, np.float64)[:, None], 1.0


def attention(q, keys, values, *, scale=None, causal=False, windows=None, masks=None):
    """Exact attention in float64; returns `[B,T,N,Hv]`. `scale`: a number or one per query
    head (`[N]`)."""
    q, scale = _per_head(q, scale)
    q = np.asarray(q, np.float64)
    keys = [np.asarray(k, np.float64) for k in keys]
    values = [np.asarray(v, np.float64) for v in values]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p, letters = _probabilities(q, keys, scale, causal, windows, masks)
    terms = ",".join(f"b{c}kv" for c in letters)
    out = np.einsum(f"bkgt{letters},{terms}->btkgv", p, *values)
    return out.reshape(q.shape[0], q.shape[1], q.shape[2], -1)


def attention_grads(q, keys, values, d_out, *, scale=None, causal=False, windows=None, masks=None):
    """Gradients (dq, dkeys, dvalues) of `sum(attention(...) * d_out)` by docs/math.md §3.
    A per-head `scale [N]` is folded into q (chain rule: dq = scale · d(q·scale))."""
    if scale is not None and np.ndim(scale) == 1:
        s = np.asarray(scale, np.float64)
        q_s, _ = _per_head(q, s)
        dq, dkeys, dvalues = attention_grads(
            q_s, keys, values, d_out, scale=1.0, causal=causal, windows=windows, masks=masks
        )
        return dq * s[:, None], dkeys, dvalues
    q = np.asarray(q, np.float64)
    keys = [np.asarray(k, np.float64) for k in keys]
    values = [np.asarray(v, np.float64) for v in values]
    b, t, n, h = q.shape
    kv = keys[0].shape[2]
    g = n // kv
    scale = h**-0.5 if scale is None else scale
    p, letters = _probabilities(q, keys, scale, causal, windows, masks)
    do = np.asarray(d_out, np.float64).reshape(b, t, kv, g, -1)
    vterms = ",".join(f"b{c}kv" for c in letters)
    out = np.einsum(f"bkgt{letters},{vterms}->btkgv", p, *values)
    dp = np.einsum(f"btkgv,{vterms}->bkgt{letters}", do, *values)
    delta = np.einsum("btkgv,btkgv->bkgt", do, out)
    ds = p * (dp - delta.reshape(delta.shape + (1,) * len(keys)))
    kterms = ",".join(f"b{c}kh" for c in letters)
    dq = scale * np.einsum(f"bkgt{letters},{kterms}->btkgh", ds, *keys)
    q5 = q.reshape(b, t, kv, g, h)
    dkeys, dvalues = [], []
    for j, c in enumerate(letters):
        others_k = [k for jj, k in enumerate(keys) if jj != j]
        others_v = [v for jj, v in enumerate(values) if jj != j]
        ok = ",".join(f"b{cc}kh" for cc in letters if cc != c)
        ov = ",".join(f"b{cc}kv" for cc in letters if cc != c)
        sep_k = "," + ok if ok else ""
        sep_v = "," + ov if ov else ""
        dkeys.append(scale * np.einsum(f"bkgt{letters},btkgh{sep_k}->b{c}kh", ds, q5, *others_k))
        dvalues.append(np.einsum(f"bkgt{letters},btkgv{sep_v}->b{c}kv", p, do, *others_v))
    return dq.reshape(q.shape), dkeys, dvalues
