"""Encoder/classifier shapes, embeddings, per-layer attention kinds and option validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tensorattn import models


def opts(**kw):
    base = dict(vocab_size=11, width=16, num_heads=2, mlp_dim=32, implementation="reference")
    return models.ModelOptions(**{**base, **kw})


def test_token_head_and_param_count():
    o = opts(num_layers=2, attention_kinds=("standard", "tensor"), embedding="fourier")
    model = models.Classifier(o)
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
    model = models.Classifier(o)
    x = jnp.zeros((2, 5), jnp.int32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    params = jax.jit(model.init)(jax.random.key(1), x)
    assert jax.jit(model.apply, static_argnames="deterministic")(params, x, mask).shape == (2, 3)


def test_fourier_features_are_periodic_in_the_modulus():
    f = models.fourier_features(jnp.array([0, 3, 3 + 13]), 13)
    assert f.shape == (3, 12)
    np.testing.assert_allclose(f[1], f[2], atol=1e-5)
    np.testing.assert_allclose(f[0, :6], 1.0)


def test_options_hashable_by_value():
    a = opts(attention_options={"degree": 4})
    b = opts(attention_options={"degree": 4})
    assert hash(a) == hash(b) and a == b


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(num_heads=3), "model.num_heads"),
        (dict(attention_kinds=("tensor", "tensor")), "model.attention_kinds"),
        (dict(attention_kinds=("cubic",)), "model.attention_kinds"),
        (dict(embedding="onehot"), "model.embedding"),
        (dict(num_kv_heads=3, num_heads=4, width=16), "model.num_kv_heads"),
        (dict(window=(2, 2)), "model.window"),
        (dict(dropout_rate=1.0), "model.dropout_rate"),
    ],
)
def test_validate_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        models.validate(dataclasses.replace(opts(), **change))
