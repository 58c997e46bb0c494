"""Composition tasks, docs/math.md §6: function, relation and quotient-relation composition.

- `function_composition`: tokens `[f(0) .. f(n-1), x]` (values in `[0, n)`); one label per
  sequence, the class `f(f(x))` of `n`.
- `relation_composition`: an `m x m` 0/1 grid `R` (row-major); per cell `(i, j)`: is there `k`
  with `R(i,k) and R(k,j)`? The density is chosen so about half the cells are positive.
- `quotient_relation_composition`: the grid with a colouring `col: [m] -> [m]`, cell `(a, b)`
  the token `R(a,b) + 2 (col(a) m + col(b))`; per cell `(i, j)`: are there `k1 != k2` with
  `col(k1) = col(k2)`, `R(i,k1)` and `R(k2,j)`?

Each format puts a witness on three positions (the query and two keys), which one order-3
score relates (docs/math.md §6).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FunctionComposition:
    size: int = 16
    label_kind: str = "sequence"

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"size must be an int >= 2, got {self.size!r}")

    name = "function_composition"
    format_version = 2  # 1: `f(f(x)) = y?` with y a separate token (a four-position witness)

    @property
    def length(self) -> int:
        return self.size + 1

    @property
    def vocab_size(self) -> int:
        return self.size

    @property
    def num_classes(self) -> int:
        return self.size

    def sample(self, rng: np.random.Generator, batch_size: int):
        n = self.size
        f_BxN = rng.integers(0, n, (batch_size, n), dtype=np.int32)
        x_B = rng.integers(0, n, batch_size, dtype=np.int32)
        rows = np.arange(batch_size)
        ffx_B = f_BxN[rows, f_BxN[rows, x_B]]
        inputs = np.concatenate([f_BxN, x_B[:, None]], axis=1)
        return inputs, ffx_B, np.ones(batch_size, bool)  # ffx_B is int32 like f


def _half_density(pairs: float) -> float:
    """Density p with P(some of `pairs` independent pairs has both bits set) = 1/2."""
    return float(np.sqrt(1.0 - 0.5 ** (1.0 / pairs)))


@dataclasses.dataclass(frozen=True)
class RelationComposition:
    size: int = 6
    density: float | None = None
    label_kind: str = "token"
    num_classes: int = 2

    name = "relation_composition"
    format_version = 1

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"size must be an int >= 2, got {self.size!r}")
        if self.density is None:
            object.__setattr__(self, "density", _half_density(self.size))
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1), got {self.density}")

    @property
    def length(self) -> int:
        return self.size * self.size

    @property
    def vocab_size(self) -> int:
        return 2

    def _relation(self, rng, batch_size):
        m = self.size
        return rng.random((batch_size, m, m)) < self.density

    def sample(self, rng: np.random.Generator, batch_size: int):
        r_BxMxM = self._relation(rng, batch_size)
        ri = r_BxMxM.astype(np.int32)
        y_BxMxM = (ri @ ri) > 0
        b = batch_size
        return (
            ri.reshape(b, -1),
            y_BxMxM.reshape(b, -1).astype(np.int32),
            np.ones((b, self.length), bool),
        )


@dataclasses.dataclass(frozen=True)
class QuotientRelationComposition:
    size: int = 6
    density: float | None = None
    label_kind: str = "token"
    num_classes: int = 2

    name = "quotient_relation_composition"
    format_version = 2  # 1: the colours as separate tokens (a five-position witness)

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"size must be an int >= 2, got {self.size!r}")
        if self.density is None:
            # About (m - 1) ordered pairs k1 != k2 share a colour under uniform colouring.
            object.__setattr__(self, "density", _half_density(max(self.size - 1, 1)))
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1), got {self.density}")

    @property
    def length(self) -> int:
        return self.size * self.size

    @property
    def vocab_size(self) -> int:
        return 2 * self.size * self.size

    def sample(self, rng: np.random.Generator, batch_size: int):
        m, b = self.size, batch_size
        r_BxMxM = (rng.random((b, m, m)) < self.density).astype(np.int32)
        col_BxM = rng.integers(0, m, (b, m), dtype=np.int32)
        same_BxMxM = (col_BxM[:, :, None] == col_BxM[:, None, :]) & ~np.eye(m, dtype=bool)
        # y[i,j] = sum_{k1,k2} R[i,k1] S[k1,k2] R[k2,j] > 0.
        y_BxMxM = (r_BxMxM @ same_BxMxM.astype(np.int32) @ r_BxMxM) > 0
        # Cell (a, b) carries R(a,b), col(a) and col(b).
        cells_BxMxM = col_BxM[:, :, None] * m + col_BxM[:, None, :]
        inputs = r_BxMxM + 2 * cells_BxMxM
        return (
            inputs.reshape(b, -1).astype(np.int32),
            y_BxMxM.reshape(b, -1).astype(np.int32),
            np.ones((b, m * m), bool),
        )


def function_composition(size: int = 16) -> FunctionComposition:
    return FunctionComposition(size=size)


def relation_composition(size: int = 6, density: float | None = None) -> RelationComposition:
    return RelationComposition(size=size, density=density)


def quotient_relation_composition(
    size: int = 6, density: float | None = None
) -> QuotientRelationComposition:
    return QuotientRelationComposition(size=size, density=density)
