"""Flax layers against the float64 oracle applied to the layers' own projections."""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

from tensorattn import PolynomialAccuracyWarning
from tensorattn.kernels.configs import BlockedConfig, PolynomialConfig
from tensorattn.layers import Kernel, StandardAttention, TensorAttention, bound_entries


def proj(x, p):
    return np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), np.asarray(p["dense"]["kernel"]))


def out_proj(o, p):
    return np.einsum("btnv,nvd->btd", o, np.asarray(p["kernel"], np.float64))


def tensor_expected(
    params, xq, xk1, xk2, scale, masks=None, causal=False, windows=None, bound=None
):
    def bnd(a):
        return a if bound is None else bound * np.tanh(a / bound)

    q = bnd(proj(xq, params["query"]))
    k1, k2 = bnd(proj(xk1, params["key1"])), bnd(proj(xk2, params["key2"]))
    v1, v2 = proj(xk1, params["value1"]), proj(xk2, params["value2"])
    o = oracle.attention(
        q, [k1, k2], [v1, v2], scale=scale, causal=causal, windows=windows, masks=masks
    )
    return out_proj(o, params["out"])


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,implementation",
    [(4, 4, None, "blocked"), (4, 2, 8, "reference"), (2, 1, 5, "blocked")],
)
def test_tensor_self_attention_matches_oracle(heads, kv_heads, head_dim, implementation):
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    layer = TensorAttention(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, implementation=implementation
    )
    params = jax.jit(layer.init)(jax.random.key(1), x)["params"]
    got = jax.jit(layer.apply, static_argnames="deterministic")({"params": params}, x)
    assert got.shape == x.shape
    h = head_dim or 16 // heads
    want = tensor_expected(params, x, x, x, h**-0.5)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_tensor_cross_attention_two_modalities_with_masks():
    kq, k1, k2 = jax.random.split(jax.random.key(2), 3)
    xq = jax.random.normal(kq, (2, 5, 12))
    xa = jax.random.normal(k1, (2, 6, 12))
    xb = jax.random.normal(k2, (2, 9, 12))
    ma = np.ones((2, 6), bool)
    ma[0, 4:] = False
    mb = np.ones((2, 9), bool)
    mb[1, :7] = False
    layer = TensorAttention(
        num_heads=2, out_features=7, entry_bound=1.5, implementation="reference"
    )
    params = jax.jit(layer.init)(jax.random.key(3), xq, xa, xb)["params"]
    got = jax.jit(layer.apply, static_argnames="deterministic")(
        {"params": params}, xq, xa, xb, k1_mask=ma, k2_mask=mb
    )
    assert got.shape == (2, 5, 7)
    want = tensor_expected(params, xq, xa, xb, 6**-0.5, masks=[ma, mb], bound=1.5)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_tensor_causal_window_and_learned_scale():
    x = jax.random.normal(jax.random.key(4), (1, 9, 8))
    layer = TensorAttention(
        num_heads=2,
        causal=True,
        window=(3, 5),
        learn_scale=True,
        scale=0.7,
        implementation="reference",
    )
    variables = jax.jit(layer.init)(jax.random.key(5), x)
    params = variables["params"]
    np.testing.assert_allclose(params["log_scale"], np.log(0.7) * np.ones(2), rtol=1e-6)
    got = jax.jit(layer.apply, static_argnames="deterministic")(variables, x)
    want = tensor_expected(params, x, x, x, 0.7, causal=True, windows=[3, 5])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    grads = jax.grad(
        lambda p: jax.jit(layer.apply, static_argnames="deterministic")({"params": p}, x).sum()
    )(params)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(grads["log_scale"]).sum() > 0


def test_dropout_only_in_training():
    x = jax.random.normal(jax.random.key(6), (2, 4, 8))
    layer = TensorAttention(num_heads=2, dropout_rate=0.5, implementation="reference")
    v = jax.jit(layer.init)(jax.random.key(7), x)
    a = jax.jit(layer.apply, static_argnames="deterministic")(v, x)
    np.testing.assert_array_equal(a, jax.jit(layer.apply, static_argnames="deterministic")(v, x))
    b = jax.jit(layer.apply, static_argnames="deterministic")(
        v, x, deterministic=False, rngs={"dropout": jax.random.key(8)}
    )
    assert not np.allclose(a, b)


def test_bound_entries():
    x = jnp.linspace(-100, 100, 11)
    y = bound_entries(x, 2.0)
    assert float(jnp.abs(y).max()) <= 2.0
    np.testing.assert_allclose(bound_entries(jnp.array([1e-3]), 2.0), [1e-3], rtol=1e-5)
    assert bound_entries(x, None) is x


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 3)])
@pytest.mark.parametrize("invalid", [slice(5, None), slice(0, 3), slice(2, 5)])
def test_standard_attention_matches_oracle(causal, window, invalid):
    """Key padding at the end, at the start (causal: the first queries see no valid key and
    output zeros) and in the middle (a window of 3 sees none of them at query 4)."""
    x = jax.random.normal(jax.random.key(9), (2, 7, 16))
    mask = np.ones((2, 7), bool)
    mask[1, invalid] = False
    layer = StandardAttention(num_heads=4, num_kv_heads=2, causal=causal, window=window)
    params = jax.jit(layer.init)(jax.random.key(10), x)["params"]
    got = jax.jit(layer.apply, static_argnames="deterministic")({"params": params}, x, kv_mask=mask)
    q, k, v = (proj(x, params[n]) for n in ("query", "key", "value"))
    o = oracle.attention(q, [k], [v], scale=4**-0.5, causal=causal, windows=[window], masks=[mask])
    np.testing.assert_allclose(got, out_proj(o, params["out"]), rtol=2e-4, atol=2e-5)


def test_layer_errors():
    x = jnp.zeros((1, 4, 10))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        TensorAttention(num_heads=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TensorAttention(num_heads=2, num_kv_heads=3, head_dim=4).init(jax.random.key(0), x)


FIELDS = [("num_heads", 0), ("num_heads", -4), ("num_kv_heads", 0), ("head_dim", 0)]
FIELDS += [("head_dim", -4), ("out_features", 0), ("entry_bound", 0.0), ("entry_bound", -1.0)]
FIELDS += [("scale", 0.0), ("dropout_rate", 1.5), ("num_heads", 2.0)]
FIELDS += [("learn_scale", "False"), ("use_bias", 1)]


@pytest.mark.parametrize("cls", [TensorAttention, StandardAttention])
@pytest.mark.parametrize("field,value", FIELDS + [("value_dim", 0)])
def test_invalid_fields_raise_at_construction(cls, field, value):
    if field not in cls.__dataclass_fields__:
        pytest.skip(f"{cls.__name__} has no {field}")
    kw = {"num_heads": 2, field: value}
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**kw)


@pytest.mark.parametrize(
    "cls,kw,needle",
    [
        (StandardAttention, dict(causal=True, window=0), "window must be a positive int"),
        (StandardAttention, dict(causal=True, window=-1), "window must be"),
        (StandardAttention, dict(causal=True, window=2.5), "window must be"),
        (StandardAttention, dict(causal=True, window=(2, 3)), "window must be"),
        (StandardAttention, dict(window=2), "window requires causal=True"),
        (StandardAttention, dict(causal="no"), "causal must be a bool"),
        (TensorAttention, dict(window=(0, 2)), "window must be a pair"),
        (TensorAttention, dict(window=2), "window must be a pair"),
        (TensorAttention, dict(causal=1), "causal must be a bool"),
        (TensorAttention, dict(learn_scale=True, kernel_config=PolynomialConfig(bound=1.0)),
         "array scale"),
        (TensorAttention, dict(learn_scale=True, kernel_config=PolynomialConfig(fused=True)),
         "array scale"),
        (TensorAttention, dict(window=(2, 3), kernel_config=PolynomialConfig(fused=True)),
         "fused=True. runs no sliding windows"),
    ],
)  # fmt: skip
def test_invalid_windows_and_scales_raise_at_construction(cls, kw, needle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolynomialAccuracyWarning)
        with pytest.raises(ValueError, match=needle):
            cls(num_heads=2, **kw)
    StandardAttention(num_heads=2, causal=True, window=(np.int64(3), 3))  # numpy ints are ints


def test_standard_attention_refuses_causal_cross_lengths_and_int_masks():
    layer = StandardAttention(num_heads=2, causal=True)
    x, y = jnp.zeros((1, 4, 8)), jnp.zeros((1, 6, 8))
    with pytest.raises(ValueError, match="causal needs equal lengths"):
        layer.init(jax.random.key(0), x, y)
    with pytest.raises(ValueError, match="kv_mask must be a boolean"):
        layer.init(jax.random.key(0), x, kv_mask=jnp.ones((1, 4), jnp.int32))


def test_k2_mask_defaults_to_k1_mask_for_the_same_keys():
    """`layer(x, k1_mask=m)`: both key sets are x, so both get its padding."""
    x = jax.random.normal(jax.random.key(14), (2, 6, 8))
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    layer = TensorAttention(num_heads=2, implementation="reference")
    params = layer.init(jax.random.key(15), x)
    got = layer.apply(params, x, k1_mask=mask)
    np.testing.assert_array_equal(got, layer.apply(params, x, k1_mask=mask, k2_mask=mask))
    np.testing.assert_allclose(got[1, :4], layer.apply(params, x[1:, :4])[0], atol=1e-5)


@pytest.mark.parametrize("cls,kw", [(TensorAttention, "k1_mask"), (StandardAttention, "kv_mask")])
def test_padding_holding_nan_leaves_valid_rows_exact(cls, kw):
    x = jax.random.normal(jax.random.key(16), (2, 6, 8))
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    layer = cls(num_heads=2)
    params = layer.init(jax.random.key(17), x)
    want = layer.apply(params, x, **{kw: mask})
    got = layer.apply(params, x.at[1, 4:].set(jnp.nan), **{kw: mask})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1, :4], want[1, :4])


@pytest.mark.parametrize("cls", [TensorAttention, StandardAttention])
@pytest.mark.parametrize("window", [None, 2])
def test_nan_in_the_causal_future_leaves_earlier_rows_exact(cls, window):
    """A NaN input at position 4: the rows that cannot see it (earlier ones, and with a window
    of 2 the ones past it too) are exact; the rows that can see it are NaN."""
    x = jax.random.normal(jax.random.key(18), (1, 7, 8))
    w = None if window is None else ((window, window) if cls is TensorAttention else window)
    layer = cls(num_heads=2, causal=True, window=w)
    params = layer.init(jax.random.key(19), x)
    want = layer.apply(params, x)
    got = layer.apply(params, x.at[0, 4].set(jnp.nan))
    sees = np.array([4 <= i and (window is None or i - window < 4) for i in range(7)])
    np.testing.assert_allclose(got[0, ~sees], want[0, ~sees], rtol=1e-6, atol=1e-6)
    assert np.isnan(np.asarray(got[0, sees])).all()


@pytest.mark.parametrize("cls", [TensorAttention, StandardAttention])
def test_inputs_of_the_wrong_rank_or_batch_name_the_input(cls):
    layer = cls(num_heads=2)
    x = jnp.zeros((2, 4, 8))
    with pytest.raises(ValueError, match=r"x_q must be a \[B, T, D\] array, got shape \(4, 8\)"):
        layer.init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="must be a"):
        layer.init(jax.random.key(0), x[None])
    with pytest.raises(ValueError, match="has batch 1, x_q has 2"):
        layer.init(jax.random.key(0), x, x[:1])


def test_polynomial_layer_without_entry_bound_warns_at_construction():
    with pytest.warns(PolynomialAccuracyWarning, match="without entry_bound"):
        layer = TensorAttention(num_heads=2, implementation="polynomial")
    x = 1e-3 * jax.random.normal(jax.random.key(13), (1, 4, 8))  # tiny: the calls are certified
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolynomialAccuracyWarning)
        layer.apply(layer.init(jax.random.key(14), x), x)  # no second construction warning
        TensorAttention(num_heads=2, implementation="polynomial", entry_bound=1.0)
        TensorAttention(num_heads=2, implementation="blocked")
        ignore = TensorAttention(
            num_heads=2, kernel_config=PolynomialConfig(on_uncertified="ignore")
        )
        x = 10.0 * x / 1e-3  # unbounded scores, but checked by nobody
        ignore.apply(ignore.init(jax.random.key(14), x), x)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorattn.kernels.polynomial") is None,
    reason="polynomial kernel not available",
)
def test_polynomial_implementation_passes_options_through():
    x = 0.3 * jax.random.normal(jax.random.key(11), (1, 6, 8))
    exact = TensorAttention(num_heads=2, implementation="reference", entry_bound=1.0)
    approx = TensorAttention(num_heads=2, kernel_config=PolynomialConfig(degree=6), entry_bound=1.0)
    params = jax.jit(exact.init)(jax.random.key(12), x)
    np.testing.assert_allclose(
        jax.jit(approx.apply, static_argnames="deterministic")(params, x),
        jax.jit(exact.apply, static_argnames="deterministic")(params, x),
        atol=1e-2,
    )


def test_blocked_tiles_from_a_kernel_config():
    x = jax.random.normal(jax.random.key(15), (1, 7, 8))
    layer = TensorAttention(
        num_heads=2, implementation="blocked", kernel_config=BlockedConfig(4, 2, 3)
    )
    params = jax.jit(layer.init)(jax.random.key(16), x)["params"]
    got = jax.jit(layer.apply)({"params": params}, x)
    np.testing.assert_allclose(got, tensor_expected(params, x, x, x, 4**-0.5), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(implementation="blocked", kernel_config=PolynomialConfig()), "BlockedConfig"),
        (dict(implementation="flash"), "unknown implementation"),
        (dict(kernel_config={"degree": 4}), "config must be a KernelConfig"),
        (dict(attend=3), "attend must be callable"),
    ],
)
def test_kernel_choice_errors_at_construction(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TensorAttention(num_heads=2, **kw)


def test_attend_function_replaces_the_kernel_and_gets_the_learned_scale():
    """`attend` runs instead of the kernel, with the layer's masks and flags, and the learned
    per-head scale arrives as the kernel's `scale` (shape [N]), not folded into q."""
    seen = {}

    def attend(q, k1, k2, v1, v2, *, causal, window, k1_mask, k2_mask, scale):
        seen.update(q=q, causal=causal, window=window, mask=k1_mask, scale=scale)
        return Kernel("reference")(
            q, k1, k2, v1, v2, causal=causal, window=window, k1_mask=k1_mask, k2_mask=k2_mask,
            scale=scale,
        )  # fmt: skip

    x = jax.random.normal(jax.random.key(17), (1, 6, 8))
    mask = np.ones((1, 6), bool)
    mask[0, 5] = False
    kw = dict(num_heads=2, causal=True, window=(4, 4), learn_scale=True, scale=0.5)
    plain = TensorAttention(implementation="reference", **kw)
    layer = TensorAttention(attend=attend, **kw)
    params = plain.init(jax.random.key(18), x)
    want = plain.apply(params, x, k1_mask=mask, k2_mask=mask)
    got = layer.apply(params, x, k1_mask=mask, k2_mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert seen["causal"] and seen["window"] == (4, 4) and seen["mask"] is not None
    np.testing.assert_allclose(seen["scale"], [0.5, 0.5], rtol=1e-6)
    q = proj(x, params["params"]["query"])
    np.testing.assert_allclose(seen["q"], q, rtol=1e-5, atol=1e-6)  # unscaled queries


def test_kernel_is_a_value():
    assert Kernel("blocked", BlockedConfig(8, 8, 8)) == Kernel("blocked", BlockedConfig(8, 8, 8))
    assert hash(Kernel()) == hash(Kernel())
    assert Kernel(config=PolynomialConfig()).name == "polynomial"
