"""MatchK (mod M) tasks, docs/math.md §6: is `x_i` part of a K-tuple summing to 0 mod M?

Match2: `y_i = 1` iff some `j` has `x_i + x_j = 0 (mod M)`; Match3: iff some `j, k` have
`x_i + x_j + x_k = 0 (mod M)` (`j = i`, `j = k` allowed). Inputs are uniform on `[0, M)`;
the label balance is controlled by the modulus, which must give between 30% and 70% positives
(`positive_rate`; `balanced_modulus` suggests one).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

MIN_POSITIVE, MAX_POSITIVE = 0.3, 0.7


def match_labels(x_BxT: np.ndarray, modulus: int, order: int) -> np.ndarray:
    """Vectorised labels: int32 `[B,T]`."""
    r_BxM = np.zeros((x_BxT.shape[0], modulus), bool)  # r[v]: value v occurs in the row
    np.put_along_axis(r_BxM, x_BxT, True, axis=1)
    if order == 2:
        reach_BxM = r_BxM  # sums of one other element
    else:
        # reach[s]: some x_j + x_k = s (mod M), a cyclic self-convolution of the occurrences.
        idx_M = np.arange(modulus)
        reach_BxM = np.zeros_like(r_BxM)
        for v in range(modulus):
            present_B = r_BxM[:, v]
            reach_BxM[present_B] |= r_BxM[present_B][:, (idx_M - v) % modulus]
    need_BxT = (-x_BxT) % modulus
    return np.take_along_axis(reach_BxM, need_BxT, axis=1).astype(np.int32)


def expected_positive_rate(length: int, modulus: int, order: int) -> float:
    """Approximate P(y_i = 1) assuming the candidate sums are independent uniform."""
    count = length if order == 2 else length * (length + 1) // 2
    return 1.0 - (1.0 - 1.0 / modulus) ** count


@functools.lru_cache(maxsize=256)
def positive_rate(length: int, modulus: int, order: int) -> float:
    """P(y_i = 1). Match2: exact (a value `v` with `2v = 0 mod M` always finds itself, any
    other needs one of the `T - 1` others to be `-v`). Match3: measured on rows drawn with a
    fixed seed, at most 2^27 / M^2 of them (<= 16384; `match_labels` costs `B·M^2`), so its
    standard error is below about 0.01."""
    if order == 2:
        v = np.arange(modulus)
        other = 1.0 - (1.0 - 1.0 / modulus) ** (length - 1)
        return float(np.mean(np.where((2 * v) % modulus == 0, 1.0, other)))
    rows = int(np.clip(2**27 // modulus**2, 512, 16384))
    x_BxT = np.random.default_rng(0).integers(0, modulus, (rows, length), dtype=np.int32)
    return float(match_labels(x_BxT, modulus, order).mean())


def balanced_modulus(length: int, order: int, target: float = 0.5) -> int:
    """The smallest odd modulus whose approximate positive rate is at most `target`."""
    m = 3
    while expected_positive_rate(length, m, order) > target:
        m += 2
    return m


@dataclasses.dataclass(frozen=True)
class Match:
    """Per-position MatchK labels (K = `order` in {2, 3}) on length-`length` sequences mod M."""

    length: int = 16
    modulus: int | None = None
    order: int = 3
    label_kind: str = "token"
    num_classes: int = 2
    format_version = 1

    def __post_init__(self):
        if self.order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {self.order}")
        if not isinstance(self.length, int) or self.length < 2:
            raise ValueError(f"length must be an int >= 2, got {self.length!r}")
        if self.modulus is None:
            object.__setattr__(self, "modulus", balanced_modulus(self.length, self.order))
        if not isinstance(self.modulus, int) or self.modulus < 2:
            raise ValueError(f"modulus must be an int >= 2, got {self.modulus!r}")
        rate = positive_rate(self.length, self.modulus, self.order)
        if not MIN_POSITIVE <= rate <= MAX_POSITIVE:
            raise ValueError(
                f"modulus={self.modulus} gives {rate:.0%} positives at length {self.length}; "
                f"labels must be 30-70% positive (try modulus={self._suggestion()})"
            )

    def _suggestion(self) -> int:
        """The first odd modulus from `balanced_modulus` on whose positive rate is in range."""
        m = balanced_modulus(self.length, self.order)
        while not MIN_POSITIVE <= positive_rate(self.length, m, self.order) <= MAX_POSITIVE:
            m += 2
        return m

    @property
    def name(self) -> str:
        return f"match{self.order}"

    @property
    def vocab_size(self) -> int:
        return self.modulus

    def sample(self, rng: np.random.Generator, batch_size: int):
        x_BxT = rng.integers(0, self.modulus, (batch_size, self.length), dtype=np.int32)
        y_BxT = match_labels(x_BxT, self.modulus, self.order)
        return x_BxT, y_BxT, np.ones_like(y_BxT, dtype=bool)


def match2(length: int = 16, modulus: int | None = None) -> Match:
    return Match(length=length, modulus=modulus, order=2)


def match3(length: int = 16, modulus: int | None = None) -> Match:
    return Match(length=length, modulus=modulus, order=3)
