"""Encoders and classifiers built from the attention layers (pre-LayerNorm transformer).

`ModelOptions` is the typed, frozen description of a model; `Classifier(options)` maps int32
tokens `[B, T]` to logits `[B, T, C]` (per-position head) or `[B, C]` (per-sequence head).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tensorattn.layers import StandardAttention, TensorAttention

Array = jax.Array

ATTENTION_KINDS = ("tensor", "standard")
EMBEDDINGS = ("learned", "fourier")
POSITIONAL = ("none", "learned")
HEADS = ("token", "sequence")
POOLS = ("mean", "last", "first")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Everything that defines a `Classifier`; see `validate` for the allowed values."""

    vocab_size: int
    num_classes: int = 2
    width: int = 64
    num_layers: int = 1
    num_heads: int = 2
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int = 256
    dropout_rate: float = 0.0
    # One entry per layer, each "tensor" or "standard".
    attention_kinds: tuple[str, ...] = ("tensor",)
    implementation: str | None = None
    attention_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    entry_bound: float | None = None
    scale: float | None = None
    learn_scale: bool = False
    causal: bool = False
    window: tuple[int, int] | None = None
    embedding: str = "learned"
    # Number of Fourier frequencies (None: all (vocab_size - 1) // 2 of them).
    fourier_frequencies: int | None = None
    positional: str = "none"
    max_len: int = 512
    head: str = "token"
    pool: str = "mean"
    sequence_axis: str | None = None
    dtype: Any = None

    def __post_init__(self):
        object.__setattr__(self, "attention_kinds", tuple(self.attention_kinds))
        if self.window is not None:
            object.__setattr__(self, "window", tuple(self.window))

    def __hash__(self):  # attention_options is a dict; hash by value.
        fields = dataclasses.asdict(self)
        fields["attention_options"] = tuple(sorted(self.attention_options.items()))
        return hash(tuple(sorted((k, repr(v)) for k, v in fields.items())))


def validate(options: ModelOptions, prefix: str = "model") -> None:
    """Raises ValueError naming the offending field (`prefix.field`)."""

    def fail(field, msg):
        raise ValueError(f"{prefix}.{field}: {msg}")

    o = options
    for name in ("vocab_size", "num_classes", "width", "num_layers", "num_heads", "max_len"):
        if not isinstance(getattr(o, name), int) or getattr(o, name) < 1:
            fail(name, f"must be a positive int, got {getattr(o, name)!r}")
    if o.num_classes < 2:
        fail("num_classes", f"must be >= 2, got {o.num_classes}")
    if o.head_dim is None and o.width % o.num_heads:
        fail("num_heads", f"width={o.width} is not divisible by num_heads={o.num_heads}")
    if o.num_kv_heads is not None and (o.num_kv_heads < 1 or o.num_heads % o.num_kv_heads):
        fail("num_kv_heads", f"must divide num_heads={o.num_heads}, got {o.num_kv_heads}")
    if len(o.attention_kinds) != o.num_layers:
        fail(
            "attention_kinds",
            f"needs one entry per layer ({o.num_layers}), got {o.attention_kinds}",
        )
    for kind in o.attention_kinds:
        if kind not in ATTENTION_KINDS:
            fail("attention_kinds", f"unknown attention kind {kind!r}; choose {ATTENTION_KINDS}")
    if not 0.0 <= o.dropout_rate < 1.0:
        fail("dropout_rate", f"must be in [0, 1), got {o.dropout_rate}")
    if o.mlp_dim < 0:
        fail("mlp_dim", f"must be >= 0 (0: no MLP), got {o.mlp_dim}")
    if o.embedding not in EMBEDDINGS:
        fail("embedding", f"unknown {o.embedding!r}; choose {EMBEDDINGS}")
    if o.positional not in POSITIONAL:
        fail("positional", f"unknown {o.positional!r}; choose {POSITIONAL}")
    if o.head not in HEADS:
        fail("head", f"unknown {o.head!r}; choose {HEADS}")
    if o.pool not in POOLS:
        fail("pool", f"unknown {o.pool!r}; choose {POOLS}")
    if o.entry_bound is not None and o.entry_bound <= 0:
        fail("entry_bound", f"must be positive or None, got {o.entry_bound}")
    if o.scale is not None and o.scale <= 0:
        fail("scale", f"must be positive or None, got {o.scale}")
    if o.window is not None and not o.causal:
        fail("window", "a sliding window requires causal=True")
    if o.sequence_axis is not None and (o.causal or o.window is not None):
        fail("sequence_axis", "sequence parallelism supports only non-causal attention")


def fourier_features(tokens: Array, modulus: int, frequencies: int | None = None) -> Array:
    """`[cos(2 pi f x / M), sin(2 pi f x / M)]` for f = 1..F: fixed features of x mod M."""
    count = (modulus - 1) // 2 if frequencies is None else frequencies
    freqs_F = jnp.arange(1, count + 1, dtype=jnp.float32)
    angle_BxTxF = 2 * math.pi * (tokens[..., None] % modulus) * freqs_F / modulus
    return jnp.concatenate([jnp.cos(angle_BxTxF), jnp.sin(angle_BxTxF)], axis=-1)


class Embedding(nn.Module):
    options: ModelOptions

    @nn.compact
    def __call__(self, tokens_BxT: Array) -> Array:
        o = self.options
        if o.embedding == "learned":
            x_BxTxD = nn.Embed(o.vocab_size, o.width, name="tokens")(tokens_BxT)
        else:
            feats = fourier_features(tokens_BxT, o.vocab_size, o.fourier_frequencies)
            x_BxTxD = nn.Dense(o.width, use_bias=False, name="fourier_proj")(feats)
        if o.positional == "learned":
            pos_TxD = self.param(
                "positions", nn.initializers.normal(0.02), (o.max_len, o.width), jnp.float32
            )
            x_BxTxD = x_BxTxD + pos_TxD[: tokens_BxT.shape[1]]
        return x_BxTxD


class Block(nn.Module):
    """Pre-LayerNorm block: `x + attn(LN(x))`, then `x + MLP(LN(x))`."""

    options: ModelOptions
    kind: str

    @nn.compact
    def __call__(self, x_BxTxD: Array, mask_BxT: Array | None, deterministic: bool) -> Array:
        o = self.options
        common = dict(
            num_heads=o.num_heads,
            num_kv_heads=o.num_kv_heads,
            head_dim=o.head_dim,
            dropout_rate=o.dropout_rate,
            causal=o.causal,
            scale=o.scale,
            learn_scale=o.learn_scale,
            entry_bound=o.entry_bound,
            dtype=o.dtype,
            name="attention",
        )
        h_BxTxD = nn.LayerNorm(name="ln_attention")(x_BxTxD)
        if self.kind == "tensor":
            h_BxTxD = TensorAttention(
                window=o.window,
                implementation=o.implementation,
                attention_options=dict(o.attention_options),
                sequence_axis=o.sequence_axis,
                **common,
            )(h_BxTxD, k1_mask=mask_BxT, k2_mask=mask_BxT, deterministic=deterministic)
        else:
            h_BxTxD = StandardAttention(window=o.window, **common)(
                h_BxTxD, kv_mask=mask_BxT, deterministic=deterministic
            )
        x_BxTxD = x_BxTxD + h_BxTxD
        if o.mlp_dim:
            h_BxTxD = nn.LayerNorm(name="ln_mlp")(x_BxTxD)
            h_BxTxF = nn.gelu(nn.Dense(o.mlp_dim, dtype=o.dtype, name="mlp_in")(h_BxTxD))
            h_BxTxD = nn.Dense(o.width, dtype=o.dtype, name="mlp_out")(h_BxTxF)
            h_BxTxD = nn.Dropout(o.dropout_rate)(h_BxTxD, deterministic=deterministic)
            x_BxTxD = x_BxTxD + h_BxTxD
        return x_BxTxD


class Encoder(nn.Module):
    """Embedding, `num_layers` blocks (attention kind per layer), final LayerNorm."""

    options: ModelOptions

    @nn.compact
    def __call__(
        self, tokens_BxT: Array, mask_BxT: Array | None = None, *, deterministic: bool = True
    ) -> Array:
        x_BxTxD = Embedding(self.options, name="embedding")(tokens_BxT)
        for i, kind in enumerate(self.options.attention_kinds):
            x_BxTxD = Block(self.options, kind, name=f"block_{i}")(x_BxTxD, mask_BxT, deterministic)
        return nn.LayerNorm(name="ln_final")(x_BxTxD)


class Classifier(nn.Module):
    """Encoder plus a per-position (`head="token"`) or per-sequence (`"sequence"`) head.

    `mask_BxT` marks valid input positions (key padding); None means all valid.
    """

    options: ModelOptions

    @nn.compact
    def __call__(
        self, tokens_BxT: Array, mask_BxT: Array | None = None, *, deterministic: bool = True
    ) -> Array:
        o = self.options
        x_BxTxD = Encoder(o, name="encoder")(tokens_BxT, mask_BxT, deterministic=deterministic)
        if o.head == "sequence":
            if o.pool == "last":
                x_BxD = x_BxTxD[:, -1]
            elif o.pool == "first":
                x_BxD = x_BxTxD[:, 0]
            elif mask_BxT is None:
                x_BxD = x_BxTxD.mean(axis=1)
            else:
                w_BxT = mask_BxT.astype(x_BxTxD.dtype)
                x_BxD = (x_BxTxD * w_BxT[..., None]).sum(1) / jnp.maximum(w_BxT.sum(1), 1)[:, None]
            return nn.Dense(o.num_classes, name="head")(x_BxD)
        return nn.Dense(o.num_classes, name="head")(x_BxTxD)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
