"""The Pallas kernels against the float64 oracle, forward and gradient.

Every case runs twice: in interpret mode (any machine; small tiles, so it spans several query,
first-key and second-key tiles) and compiled on a GPU with the default tiles (skipped without
one). Lengths are not tile multiples; grouped heads (4 query heads, 2 kv heads).
"""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import tensorattn
from tensorattn.kernels import pallas, validation
from tensorattn.kernels.pallas import PallasBlockSizes

BLOCKS = PallasBlockSizes(block_rows=8, block_k1=4, block_k2=8)
B, N, K, H, HV = 2, 4, 2, 8, 16
INTERPRET = {"interpret": True}


@pytest.fixture(params=["interpret", "gpu"], autouse=True)
def mode(request):
    """Sets how `_pallas` runs: interpret mode, or the compiled kernel on a GPU."""
    if request.param == "gpu" and jax.default_backend() != "gpu":
        pytest.skip("compiled Pallas kernels need a GPU")
    INTERPRET["interpret"] = request.param == "interpret"
    yield request.param
    INTERPRET["interpret"] = True


def _inputs(seed, t, s1, s2, dtype=np.float32):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    arrays = dict(
        q=normal(B, t, N, H),
        k1=normal(B, s1, K, H),
        k2=normal(B, s2, K, H),
        v1=normal(B, s1, K, HV),
        v2=normal(B, s2, K, HV),
    )
    d_out = normal(B, t, N, HV)
    return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}, d_out, rng


def _pallas(x, blocks=BLOCKS, **kw):
    interpret = INTERPRET["interpret"]
    return tensorattn.tensor_attention(
        x["q"], x["k1"], x["k2"], x["v1"], x["v2"], implementation="pallas",
        interpret=interpret, block_sizes=blocks if interpret else PallasBlockSizes(), **kw,
    )  # fmt: skip


def _oracle_kwargs(kw):
    window = kw.get("window")
    masks = None
    if kw.get("k1_mask") is not None or kw.get("k2_mask") is not None:
        masks = [kw.get("k1_mask"), kw.get("k2_mask")]
    return dict(
        causal=kw.get("causal", False) or window is not None,
        windows=window,
        masks=masks,
        scale=kw.get("scale"),
    )


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _check(x, d_out, tol, grads=True, **kw):
    f64 = {k: np.asarray(v, np.float64) for k, v in x.items()}
    keys, values = [f64["k1"], f64["k2"]], [f64["v1"], f64["v2"]]
    okw = _oracle_kwargs(kw)
    out = _pallas(x, **kw)
    assert out.shape == x["q"].shape[:3] + (HV,) and out.dtype == x["q"].dtype
    assert _rel(out, oracle.attention(f64["q"], keys, values, **okw)) < tol
    if not grads:
        return out
    names = ("q", "k1", "k2", "v1", "v2")

    def loss(*args):
        y = _pallas(dict(zip(names, args)), **kw)
        return jnp.sum(y.astype(jnp.float32) * d_out)

    got = jax.grad(loss, argnums=tuple(range(5)))(*(x[n] for n in names))
    dq, dk, dv = oracle.attention_grads(f64["q"], keys, values, d_out, **okw)
    for name, g, want in zip(names, got, [dq, *dk, *dv]):
        assert g.shape == x[name].shape and g.dtype == x[name].dtype, name
        assert _rel(g, want) < tol, name
    return out


def test_full_unequal_lengths_key_masks_grad():
    x, d_out, rng = _inputs(0, t=11, s1=13, s2=19)
    m1, m2 = rng.random((B, 13)) > 0.3, rng.random((B, 19)) > 0.3
    _check(x, d_out, 1e-4, k1_mask=m1, k2_mask=m2, scale=0.3)


def test_causal_grad():
    x, d_out, _ = _inputs(1, t=21, s1=21, s2=21)
    _check(x, d_out, 1e-4, causal=True)


def test_window_grad():
    x, d_out, rng = _inputs(2, t=23, s1=23, s2=23)
    _check(x, d_out, 1e-4, window=(6, 3), k2_mask=rng.random((B, 23)) > 0.2)


def test_rows_without_pairs_give_zeros_and_finite_grads():
    # Causal, and the first 5 first-keys are padding: queries 0..4 have no allowed pair.
    x, d_out, _ = _inputs(3, t=13, s1=13, s2=13)
    m1 = np.ones((B, 13), bool)
    m1[:, :5] = False
    out = _check(x, d_out, 1e-4, causal=True, k1_mask=m1)
    np.testing.assert_array_equal(np.asarray(out)[:, :5], 0.0)


def test_bf16_forward_and_grad():
    x, d_out, _ = _inputs(4, t=17, s1=17, s2=17, dtype=jnp.bfloat16)
    _check(x, d_out, 3e-2, causal=True)


def test_default_block_sizes_match_small_blocks():
    x, _, _ = _inputs(5, t=9, s1=7, s2=12)
    a = _pallas(x, blocks=PallasBlockSizes())
    b = _pallas(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_env_var_selects_interpret_mode(monkeypatch):
    x, _, _ = _inputs(6, t=5, s1=5, s2=5)
    monkeypatch.setenv("TENSORATTN_PALLAS_INTERPRET", "1")
    out = tensorattn.tensor_attention(
        x["q"], x["k1"], x["k2"], x["v1"], x["v2"], implementation="pallas", block_sizes=BLOCKS
    )
    want = oracle.attention(*(np.asarray(x[n]) for n in ("q",)), [x["k1"], x["k2"]],
                            [x["v1"], x["v2"]])  # fmt: skip
    assert _rel(out, want) < 1e-4


def test_supports_and_errors():
    x, _, _ = _inputs(7, t=5, s1=5, s2=5)
    spec = validation.validate(
        x["q"], (x["k1"], x["k2"]), (x["v1"], x["v2"]),
        causal=False, windows=None, key_masks=None, scale=None,
        key_names=("k1", "k2"), value_names=("v1", "v2"), mask_names=("m1", "m2"),
    )  # fmt: skip
    keys = (x["k1"], x["k2"])
    assert pallas.supports(x["q"], keys, spec, interpret=True)
    spec2 = validation.AttentionSpec(scale=1.0, causal=False, windows=(None,), key_masks=(None,))
    assert not pallas.supports(x["q"], keys[:1], spec2, interpret=True)
    with pytest.raises(ValueError, match="order 3"):
        tensorattn.higher_order_attention(
            x["q"], [x["k1"]], [x["v1"]], implementation="pallas", interpret=True
        )
    with pytest.raises(ValueError, match="PallasBlockSizes"):
        _pallas(x, blocks=tensorattn.BlockSizes())
    with pytest.raises(ValueError, match="block_k2"):
        PallasBlockSizes(block_k2=0)
