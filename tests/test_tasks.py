"""Task labels against brute force, determinism, balance and the registry."""

import itertools

import numpy as np
import pytest

from tensorattn import tasks
from tensorattn.tasks import match


def brute_match(x, modulus, order):
    n = len(x)
    out = np.zeros(n, np.int32)
    for i in range(n):
        for rest in itertools.product(range(n), repeat=order - 1):
            if (x[i] + sum(x[j] for j in rest)) % modulus == 0:
                out[i] = 1
                break
    return out


@pytest.mark.parametrize("order,length,modulus", [(2, 7, 11), (3, 9, 53), (3, 16, 181)])
def test_match_labels_brute_force(order, length, modulus):
    task = tasks.make(f"match{order}", length=length, modulus=modulus)
    x, y, m = task.sample(np.random.default_rng(3), 16)
    assert x.dtype == np.int32 and y.dtype == np.int32 and m.dtype == bool
    assert x.shape == y.shape == m.shape == (16, length)
    assert m.all() and x.min() >= 0 and x.max() < modulus
    for row_x, row_y in zip(x, y):
        np.testing.assert_array_equal(row_y, brute_match(row_x, modulus, order))


def test_function_composition_brute_force():
    task = tasks.make("function_composition", size=7)
    assert task.length == 8 and task.vocab_size == task.num_classes == 7
    x, y, m = task.sample(np.random.default_rng(0), 64)
    assert x.shape == (64, 8) and y.shape == (64,) and m.shape == (64,) and m.all()
    assert x.min() >= 0 and x.max() < 7
    for row, label in zip(x, y):
        f, q = row[:7], row[7]
        assert label == f[f[q]]


def brute_relation(r):
    m = len(r)
    return np.array(
        [[any(r[i, k] and r[k, j] for k in range(m)) for j in range(m)] for i in range(m)]
    )


def brute_quotient(r, col):
    m = len(r)
    out = np.zeros((m, m), bool)
    for i, j, k1, k2 in itertools.product(range(m), repeat=4):
        if k1 != k2 and col[k1] == col[k2] and r[i, k1] and r[k2, j]:
            out[i, j] = True
    return out


def test_relation_composition_brute_force():
    task = tasks.make("relation_composition", size=5)
    x, y, m = task.sample(np.random.default_rng(1), 32)
    assert x.shape == y.shape == m.shape == (32, 25) and m.all()
    for row, label in zip(x, y):
        np.testing.assert_array_equal(label.reshape(5, 5), brute_relation(row.reshape(5, 5)))


def test_quotient_relation_composition_brute_force():
    size = 5
    task = tasks.make("quotient_relation_composition", size=size)
    x, y, m = task.sample(np.random.default_rng(2), 16)
    assert x.shape == y.shape == m.shape == (16, size * size) and m.all()
    assert x.min() >= 0 and x.max() < task.vocab_size
    for row, label in zip(x, y):
        cells = row.reshape(size, size)
        r, colours = cells % 2, cells // 2
        # Cell (a, b) holds col(a) * size + col(b): rows agree on col(b), columns on col(a).
        col = colours[0] % size
        np.testing.assert_array_equal(colours, col[:, None] * size + col[None, :])
        np.testing.assert_array_equal(label.reshape(size, size), brute_quotient(r, col))


@pytest.mark.parametrize("name", tasks.names())
def test_deterministic_by_seed_and_balanced(name):
    task = tasks.make(name)
    a = task.sample(np.random.default_rng(7), 256)
    b = task.sample(np.random.default_rng(7), 256)
    c = task.sample(np.random.default_rng(8), 256)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    x, y, m = a
    assert x.shape[1] == task.length and x.max() < task.vocab_size
    assert isinstance(task.format_version, int) and task.format_version >= 1
    # Balanced: the majority class holds at most 70% (binary tasks: 30-70% positives).
    majority = tasks.majority_baseline(y, m, task.num_classes)
    assert majority <= 0.7 and y.max() < task.num_classes, majority


def test_eval_set_fixed_and_disjoint_from_training_stream():
    task = tasks.make("match3", length=8, modulus=53)
    e1, e2 = tasks.eval_set(task, 5, 64), tasks.eval_set(task, 5, 64)
    np.testing.assert_array_equal(e1.inputs, e2.inputs)
    t1 = tasks.train_batch(task, 5, 1, 64)
    assert not np.array_equal(e1.inputs, t1.inputs)
    np.testing.assert_array_equal(t1.inputs, tasks.train_batch(task, 5, 1, 64).inputs)
    assert not np.array_equal(t1.inputs, tasks.train_batch(task, 5, 2, 64).inputs)


def test_training_batches_never_hold_an_eval_example():
    """3x3 relation grids: a small input space, where many eval grids would be trained on."""
    task = tasks.make("relation_composition", size=3)  # 2^9 grids
    held = tasks.eval_set(task, 7, 256)
    keys = tasks.held_out_keys(held)
    plain = tasks.train_batch(task, 0, 1, 128)
    assert any(row.tobytes() in keys for row in plain.inputs)  # without exclusion: overlap
    batch = tasks.train_batch(task, 0, 1, 128, keys)
    assert not any(row.tobytes() in keys for row in batch.inputs)
    np.testing.assert_array_equal(batch.inputs, tasks.train_batch(task, 0, 1, 128, keys).inputs)
    kept = np.array([row.tobytes() not in keys for row in plain.inputs])
    np.testing.assert_array_equal(batch.inputs[kept], plain.inputs[kept])  # only those redrawn
    labels = (batch.inputs.reshape(-1, 3, 3) @ batch.inputs.reshape(-1, 3, 3) > 0).reshape(-1, 9)
    np.testing.assert_array_equal(batch.labels, labels)  # redrawn rows keep their labels


def test_majority_baseline():
    labels = np.array([[1, 1, 0, 1], [0, 0, 0, 0]])
    mask = np.array([[True, True, True, True], [True, False, False, False]])
    assert tasks.majority_baseline(labels, mask, 2) == pytest.approx(3 / 5)


def test_match3_balance_is_enforced():
    with pytest.raises(ValueError, match="modulus=.*30-70%"):
        tasks.make("match3", length=16, modulus=17)
    auto = tasks.make("match3", length=16)
    assert 0.3 <= tasks.positive_rate(auto) <= 0.7
    assert auto.modulus == match.balanced_modulus(16, 3)


def test_balance_guard_uses_the_true_positive_rate():
    """Values that pair with themselves (2v = 0 mod M, 3v = 0 mod M) are always positive: the
    independence approximation put these instances in range, their true rates are not."""
    for length, modulus in [(3, 4), (4, 4)]:  # Match2: exact rate against enumeration
        x = np.array(list(itertools.product(range(modulus), repeat=length)))
        exact = match.match_labels(x, modulus, 2).mean()
        assert match.positive_rate(length, modulus, 2) == pytest.approx(exact)
    for name, length, modulus in [("match2", 4, 4), ("match3", 4, 9), ("match3", 5, 15)]:
        order = int(name[-1])
        assert 0.3 <= match.expected_positive_rate(length, modulus, order) <= 0.7
        with pytest.raises(ValueError, match=r"gives 7\d% positives.*try modulus=(\d+)") as e:
            tasks.make(name, length=length, modulus=modulus)
        suggested = int(str(e.value).rsplit("=", 1)[1].rstrip(")"))
        tasks.make(name, length=length, modulus=suggested)  # the suggestion is accepted
    x = np.random.default_rng(1).integers(0, 19, (20000, 6))
    assert match.positive_rate(6, 19, 3) == pytest.approx(match.match_labels(x, 19, 3).mean(),
                                                          abs=0.01)  # fmt: skip


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make("match4")
    with pytest.raises(ValueError, match="bad arguments"):
        tasks.make("match3", lenght=4)
