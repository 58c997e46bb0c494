"""The analytic cost model (tensorattn/kernels/cost.py, docs/math.md §3-§5)."""

from __future__ import annotations

import math

import pytest

from tensorattn.kernels import cost


def test_allowed_tuples_full_causal_window():
    assert cost.allowed_tuples(4) == 64
    assert cost.allowed_tuples(3, causal=True) == 1 + 4 + 9
    assert cost.allowed_tuples(3, causal=True, window=(1, 2)) == 1 + 2 + 2
    # Brute force over (i, a, b) with i-w < a <= i.
    n, (w1, w2) = 9, (3, 5)
    count = sum(
        1
        for i in range(n)
        for a in range(n)
        for b in range(n)
        if i - w1 < a <= i and i - w2 < b <= i
    )
    assert cost.allowed_tuples(n, causal=True, window=(w1, w2)) == count


def test_exact_flops():
    assert cost.exact_flops(8, 16) == 4.0 * 8**3 * 16  # 4·tuples·H at Hv = H
    assert cost.exact_flops(8, 16, value_dim=32) == 2.0 * 8**3 * (16 + 32)
    assert cost.exact_flops(8, 16, heads=3, grad=True) == 3 * 3.5 * 4.0 * 8**3 * 16


def test_feature_rank_and_polynomial_flops():
    assert cost.feature_rank(16, 4) == 4845
    assert cost.feature_rank(8, 2) == 45
    assert cost.feature_rank(8, 0) == 1
    with pytest.raises(ValueError, match="feature_rank"):
        cost.feature_rank(0, 2)
    r = 45
    assert cost.polynomial_flops(100, 8, 2) == 2.0 * r * 9 * 3 * 100
    grad = cost.polynomial_flops(100, 8, 2, grad=True, heads=2)
    assert grad == 2 * (2.0 * r * 9 * 3 * 100 + 2.0 * r * 9 * 9 * 5 * 100)
    # Linear in n, the exact count cubic.
    assert cost.polynomial_flops(200, 8, 2) == 2 * cost.polynomial_flops(100, 8, 2)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_cost_ratio_and_crossover(order):
    h, g = 10, 3
    r = math.comb(h + g, g)
    n = 512
    assert cost.cost_ratio(n, h, g, order) == pytest.approx(
        2 * r * (h + 1) * order * n / (4 * n**order * h)
    )
    cross = cost.crossover_length(h, g, order)
    assert cost.cost_ratio(cross, h, g, order) == pytest.approx(1.0)
    assert cost.cost_ratio(2 * cross, h, g, order) < 1 < cost.cost_ratio(cross / 2, h, g, order)
    with pytest.raises(ValueError, match="order"):
        cost.crossover_length(h, g, 1)
