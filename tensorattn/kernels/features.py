"""Monomial feature maps of the polynomial method (docs/math.md §4).

All monomials `x^α` of degree `<= g` in `d` variables (rank `r = C(d+g, g)`), ordered by
degree, each degree-`t` monomial built as (its degree-`t-1` parent) × (one coordinate): two
gathers and one product per degree, so tracing stays fast at `d=16, g=4` (`r = 4845`).
Index 0 is the constant monomial.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Monomials:
    """Multisets `α` of size `<= degree` from `{0..dim-1}` as sorted index tuples.

    `parents[t-1][k]`: index (within degree `t-1`) of the `k`-th degree-`t` monomial's parent;
    `lasts[t-1][k]`: the coordinate it multiplies in; `multinomials[t][k] = t! / prod(α_i!)`.
    """

    dim: int
    degree: int
    parents: tuple[np.ndarray, ...]
    lasts: tuple[np.ndarray, ...]
    multinomials: tuple[np.ndarray, ...]

    @property
    def rank(self) -> int:
        return math.comb(self.dim + self.degree, self.degree)

    def degrees(self) -> np.ndarray:
        """`[r]` degree of each monomial."""
        return np.concatenate([np.full(len(m), t) for t, m in enumerate(self.multinomials)])


@functools.lru_cache(maxsize=64)
def monomials(dim: int, degree: int) -> Monomials:
    """Enumerates the monomials, vectorised per degree (no Python loop over monomials)."""
    parents, lasts = [], []
    multinomials = [np.ones(1)]
    last = np.zeros(1, np.int64)  # smallest coordinate a child may append
    run = np.zeros(1, np.int64)  # multiplicity of the last coordinate
    for t in range(1, degree + 1):
        lo = last if t > 1 else np.zeros(1, np.int64)
        counts = dim - lo
        parent = np.repeat(np.arange(len(lo)), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        child = lo[parent] + (np.arange(len(parent)) - starts)
        same = (child == last[parent]) & (t > 1)
        new_run = np.where(same, run[parent] + 1, 1)
        multinomials.append(multinomials[-1][parent] * t / new_run)
        parents.append(parent.astype(np.int32))
        lasts.append(child.astype(np.int32))
        last, run = child, new_run
    return Monomials(dim, degree, tuple(parents), tuple(lasts), tuple(multinomials))


def feature_weights(mono: Monomials, coeffs, scale: float) -> np.ndarray:
    """`[r]` weights `c_|α| · scale^|α| · multinom(α)` of the query features (signs kept)."""
    per_degree = [coeffs[t] * scale**t * m for t, m in enumerate(mono.multinomials[: len(coeffs)])]
    return np.concatenate(per_degree)


def features(x: jax.Array, mono: Monomials, weights: np.ndarray | None = None) -> jax.Array:
    """`[..., d]` -> `[..., r]` monomials `x^α` (times `weights` if given)."""
    blocks = [jnp.ones(x.shape[:-1] + (1,), x.dtype)]
    for parent, last in zip(mono.parents, mono.lasts):
        blocks.append(jnp.take(blocks[-1], parent, axis=-1) * jnp.take(x, last, axis=-1))
    out = jnp.concatenate(blocks, axis=-1)
    if weights is not None:
        out = out * jnp.asarray(weights, x.dtype)
    return out
