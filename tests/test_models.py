"""Encoder/classifier shapes, embeddings, per-layer attention kinds and option validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tensorattn import models
from tensorattn.kernels.configs import BlockedConfig, PolynomialConfig
from tensorattn.layers import Kernel

REFERENCE = Kernel("reference")


def opts(**kw):
    base = dict(vocab_size=11, width=16, num_heads=2, mlp_dim=32)
    return models.ModelOptions(**{**base, **kw})


def test_token_head_and_param_count():
    o = opts(num_layers=2, tensor_every=2, embedding="fourier")
    assert o.attention_kinds == ("standard", "tensor")
    model = models.Classifier(o, kernel=REFERENCE)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 6)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    logits = jax.jit(model.apply, static_argnames="deterministic")({"params": params}, x)
    assert logits.shape == (3, 6, 2)
    enc = params["encoder"]
    assert "key1" in enc["block_1"]["attention"] and "key" in enc["block_0"]["attention"]
    assert models.count_params(params) == sum(p.size for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_sequence_head(pool):
    o = opts(head="sequence", pool=pool, positional="learned", max_len=8, num_classes=3)
    model = models.Classifier(o, kernel=REFERENCE)
    x = jnp.zeros((2, 5), jnp.int32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    params = jax.jit(model.init)(jax.random.key(1), x)
    assert jax.jit(model.apply, static_argnames="deterministic")(params, x, mask).shape == (2, 3)


@pytest.mark.parametrize("pool", ["last", "first", "mean"])
def test_sequence_pooling_reads_valid_positions_only(pool):
    """Right padding (row 0) and left padding (row 1): changing padded tokens changes nothing."""
    o = opts(head="sequence", pool=pool)
    model = models.Classifier(o, kernel=REFERENCE)
    x = jnp.asarray(np.random.default_rng(5).integers(0, 11, (2, 6)), jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], bool)
    params = model.init(jax.random.key(6), x)
    other = jnp.where(mask, x, (x + 5) % 11)
    np.testing.assert_allclose(
        model.apply(params, other, mask), model.apply(params, x, mask), atol=1e-5
    )
    alone = model.apply(params, x[:1, :4])  # row 0 without its padding
    np.testing.assert_allclose(model.apply(params, x, mask)[0], alone[0], atol=1e-5)


def test_learned_positions_refuse_inputs_past_max_len():
    model = models.Classifier(opts(positional="learned", max_len=4), kernel=REFERENCE)
    with pytest.raises(ValueError, match="model.max_len: 4 learned positions.*length 6"):
        model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))


def test_learned_positions_start_at_the_token_embeddings_scale():
    """Positions and tokens both start with std 1/sqrt(width): positions far smaller (GPT-2's
    0.02 at width 64) kept one tensor layer from finding a grid's rows and columns."""
    o = opts(positional="learned", width=64, vocab_size=512, max_len=512)
    params = models.Classifier(o, kernel=REFERENCE).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]["encoder"]["embedding"]
    for table in (params["positions"], params["tokens"]["embedding"]):
        assert abs(float(jnp.std(table)) - 64**-0.5) < 0.01


def test_dtype_objects_and_names_have_one_identity():
    a, b = opts(dtype=jnp.bfloat16), opts(dtype="bfloat16")
    assert a == b and a.identity() == b.identity()
    models.validate(models.ModelOptions(**a.identity()))  # config.json reloads
    assert opts(dtype=None).identity() == opts(dtype="float32").identity()
    assert opts(dtype=jnp.float32).identity() == opts().identity()


def test_fourier_features_are_periodic_in_the_modulus():
    f = models.fourier_features(jnp.array([0, 3, 3 + 13]), 13)
    assert f.shape == (3, 12)
    np.testing.assert_allclose(f[1], f[2], atol=1e-5)
    np.testing.assert_allclose(f[0, :6], 1.0)


def test_options_hashable_by_value():
    a = opts(attention="polynomial", polynomial={"degree": 4})
    b = opts(attention="polynomial", polynomial=PolynomialConfig(degree=4))
    assert hash(a) == hash(b) and a == b
    assert opts(attention="polynomial").polynomial == PolynomialConfig()
    assert opts(polynomial={}).polynomial is None  # defaults of an unused section


def test_attention_kinds_from_attention_and_tensor_every():
    assert opts(num_layers=4, tensor_every=2).attention_kinds == (
        "standard",
        "tensor",
        "standard",
        "tensor",
    )
    assert opts(num_layers=2, attention="standard").attention_kinds == ("standard",) * 2
    assert opts(num_layers=2, attention="polynomial").attention_kinds == ("polynomial",) * 2


def test_kernel_is_not_identity_and_gives_the_same_function():
    """Other exact kernels (and tiles) run the same parameters to the same logits."""
    o = opts(num_layers=2)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 7)), jnp.int32)
    params = models.Classifier(o, kernel=REFERENCE).init(jax.random.key(2), x)
    want = models.Classifier(o, kernel=REFERENCE).apply(params, x)
    for kernel in (Kernel(), Kernel("blocked", BlockedConfig(4, 2, 8))):
        got = models.Classifier(o, kernel=kernel).apply(params, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_polynomial_model_runs_its_config():
    o = opts(attention="polynomial", polynomial={"degree": 6}, entry_bound=1.0)
    x = jnp.asarray(np.random.default_rng(3).integers(0, 11, (1, 6)), jnp.int32)
    params = models.Classifier(o).init(jax.random.key(4), x)
    exact = models.Classifier(dataclasses.replace(o, attention="tensor", polynomial=None))
    np.testing.assert_allclose(
        models.Classifier(o).apply(params, x), exact.apply(params, x), atol=2e-2
    )
    with pytest.raises(ValueError, match="polynomial attention is an architecture"):
        models.Classifier(o, kernel=Kernel("polynomial"))


def test_identity_drops_polynomial_run_options_only():
    a = opts(attention="polynomial", polynomial={"degree": 3})
    b = opts(attention="polynomial", polynomial={"degree": 3, "gradient": "autodiff"})
    f = opts(attention="polynomial", polynomial={"degree": 3, "fused": True, "block_q": 64})
    c = opts(attention="polynomial", polynomial={"degree": 2})
    assert a.identity() == b.identity() == f.identity() != c.identity()
    assert "on_uncertified" not in a.identity()["polynomial"]


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(num_heads=3), "model.num_heads"),
        (dict(attention="cubic"), "model.attention"),
        (dict(tensor_every=0), "model.tensor_every"),
        (dict(tensor_every=2), "model.tensor_every"),
        (dict(embedding="onehot"), "model.embedding"),
        (dict(num_kv_heads=3, num_heads=4, width=16), "model.num_kv_heads"),
        (dict(window=(2, 2)), "model.window"),
        (dict(dropout_rate=1.0), "model.dropout_rate"),
        (dict(polynomial=PolynomialConfig(degree=3)), "model.polynomial.degree"),
        (dict(attention="polynomial", head_dim=128), "model.polynomial.degree"),
    ],
)
def test_validate_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        models.validate(dataclasses.replace(opts(), **change))


def test_polynomial_mapping_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^model\.polynomial\.degree: PolynomialConfig"):
        opts(attention="polynomial", polynomial={"degree": -1})
    with pytest.raises(ValueError, match=r"^model\.polynomial\.colour: unknown field"):
        opts(attention="polynomial", polynomial={"colour": 1})
