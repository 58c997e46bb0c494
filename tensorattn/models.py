"""Encoders and classifiers built from the attention layers (pre-LayerNorm transformer).

`ModelOptions` is the typed, frozen description of a model; `Classifier(options)` maps int32
tokens `[B, T]` to logits `[B, T, C]` (per-position head) or `[B, C]` (per-sequence head).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
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


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# The options each implementation's kernel accepts (`tensorattn.tensor_attention(**options)`);
# implementation=None (the best exact kernel) runs "blocked" whenever options are given.
ATTENTION_OPTIONS: dict[str | None, tuple[str, ...]] = {
    None: ("block_sizes",),
    "reference": (),
    "blocked": ("block_sizes",),
    "pallas": ("block_sizes", "interpret"),
    "polynomial": (
        "degree",
        "polynomial",
        "bound",
        "score_range",
        "tolerance",
        "on_uncertified",
        "gradient",
        "chunk_size",
    ),
}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def block_sizes_class(implementation: str | None):
    """The tile-size dataclass of `implementation`'s `block_sizes` option (blocked's for None)."""
    if implementation == "pallas":
        from tensorattn.kernels import pallas

        return pallas.PallasBlockSizes
    from tensorattn.kernels import blocked

    return blocked.BlockSizes


def check_attention_options(
    implementation: str | None,
    options: Mapping[str, Any],
    *,
    head_dim: int | None = None,
    scale: float = 1.0,
    prefix: str = "model.attention_options",
) -> None:
    """Checks the names, types and ranges of a kernel's `options` without calling the kernel;
    raises ValueError naming `prefix.option`. Allowed:

    - "reference": no options.
    - "blocked" and None: `block_sizes`: None or a `BlockSizes` (positive ints).
    - "pallas": `block_sizes`: None or a `PallasBlockSizes`; `interpret`: None or a bool.
    - "polynomial": `degree`: None (4) or an int in [0, 40] whose feature rank
      C(head_dim + degree, degree) is at most 2^20; `polynomial`: "taylor" or "chebyshev"
      (needs `bound` or `score_range`); `bound`, `score_range`: None or a positive finite
      number; `tolerance`: None or a number in (0, 1) (without `degree` it picks the degree:
      needs `bound` or `score_range`, and some degree <= 40 must reach it); `on_uncertified`:
      "warn", "error" or "ignore"; `gradient`: "closed_form" or "autodiff"; `chunk_size`: None
      or a positive int.

    `scale` is the score scale the kernel sees (the layers fold theirs into q and pass 1.0);
    with `head_dim` it turns `bound` into the score range `scale·head_dim·bound³`.
    """

    def fail(key, msg):
        raise ValueError(f"{prefix}.{key}: {msg}")

    if not isinstance(options, Mapping):
        raise ValueError(f"{prefix}: must be a mapping of kernel options, got {options!r}")
    if implementation not in ATTENTION_OPTIONS:
        return  # an unknown implementation is the caller's error to report
    known = ATTENTION_OPTIONS[implementation]
    for key in options:
        if key not in known:
            fail(
                key,
                f"unknown option for implementation={implementation!r}; known: "
                + (", ".join(known) if known else "none"),
            )
    o = dict(options)
    if o.get("block_sizes") is not None:
        cls = block_sizes_class(implementation)
        if not isinstance(o["block_sizes"], cls):
            fail(
                "block_sizes",
                f"must be a {cls.__name__} (in a config file: a mapping of its fields), got "
                f"{o['block_sizes']!r}",
            )
    if o.get("interpret") is not None and not isinstance(o["interpret"], bool):
        fail("interpret", f"must be None or a bool, got {o['interpret']!r}")
    if implementation != "polynomial":
        return
    from tensorattn.kernels import polynomial as poly

    for key, allowed, default in (
        ("polynomial", poly.POLYNOMIALS, "taylor"),
        ("on_uncertified", poly.ON_UNCERTIFIED, "warn"),
        ("gradient", poly.GRADIENTS, "closed_form"),
    ):
        value = o.get(key, default)
        if not isinstance(value, str) or value not in allowed:
            fail(key, f"must be one of {allowed}, got {value!r}")
    for key in ("bound", "score_range"):
        value = o.get(key)
        if value is not None and not (is_real(value) and 0 < value < math.inf):
            fail(key, f"must be None or a positive finite number, got {value!r}")
    tolerance = o.get("tolerance")
    if tolerance is not None and not (is_real(tolerance) and 0 < tolerance < 1):
        fail("tolerance", f"must be None or a number in (0, 1), got {tolerance!r}")
    chunk = o.get("chunk_size")
    if chunk is not None and not (is_int(chunk) and chunk >= 1):
        fail("chunk_size", f"must be None or a positive int, got {chunk!r}")
    degree = o.get("degree")
    if degree is not None and not (is_int(degree) and 0 <= degree <= poly.MAX_DEGREE):
        fail("degree", f"must be None or an int in [0, {poly.MAX_DEGREE}], got {degree!r}")
    kind, bound, score_range = o.get("polynomial", "taylor"), o.get("bound"), o.get("score_range")
    if kind == "chebyshev" and bound is None and score_range is None:
        fail("polynomial", "'chebyshev' needs bound or score_range (the fit interval)")
    picked = ""
    if degree is None and tolerance is not None:
        if bound is None and score_range is None:
            fail("tolerance", "without a degree it needs bound or score_range to pick one")
        R = score_range
        if R is None and head_dim is not None:
            R = abs(scale) * head_dim * bound**3
        if R is not None:
            try:
                degree = poly.select_degree(float(R), float(tolerance), kind)
            except ValueError as e:
                fail("tolerance", str(e))
            picked = f"tolerance={tolerance} picks degree {degree}, which "
    if head_dim is not None:
        g = poly.DEFAULT_DEGREE if degree is None else degree
        rank = math.comb(head_dim + g, g)
        if rank > poly.MAX_RANK:
            fail(
                "tolerance" if picked else "degree",
                f"{picked or f'degree {g} '}at head_dim {head_dim} gives feature rank "
                f"C(H+g, g) = {rank} > {poly.MAX_RANK}; "
                + (
                    "raise the tolerance, lower bound/score_range or the head dim"
                    if picked
                    else "lower the degree or the head dim"
                ),
            )


def validate(options: ModelOptions, prefix: str = "model") -> None:
    """Raises ValueError naming the offending field (`prefix.field`). Allowed values:

    - vocab_size, width, num_layers, num_heads, max_len: positive ints; num_classes: an int
      >= 2; mlp_dim: an int >= 0 (0: no MLP); dropout_rate: a number in [0, 1).
    - num_kv_heads: None or a positive int dividing num_heads.
    - head_dim: None (width // num_heads: num_heads must divide width) or a positive int.
    - attention_kinds: one entry per layer, each "tensor" or "standard".
    - implementation: None (the best exact kernel), "reference", "blocked", "polynomial" or
      "pallas" (only where it supports the model: a GPU, or attention_options.interpret=True).
    - attention_options: the implementation's options (`check_attention_options`).
    - entry_bound, scale: None or a positive finite number; learn_scale, causal: bools.
    - window: None or a pair (w1, w2), each a positive int or None (unbounded), only with
      causal=True; standard layers use w1 alone, which must then be an int.
    - embedding: "learned" or "fourier"; fourier_frequencies: None (all (vocab_size - 1) // 2:
      needs vocab_size >= 3 with "fourier") or an int in [1, vocab_size // 2].
    - positional: "none" or "learned"; head: "token" or "sequence"; pool: "mean", "last" or
      "first".
    - sequence_axis: None or a mesh axis name (str), only without causal masks or windows.
    - dtype: None (float32) or one of float32, bfloat16, float16, float64 (name or dtype).
    """

    def fail(field, msg):
        raise ValueError(f"{prefix}.{field}: {msg}")

    o = options
    for name in ("vocab_size", "num_classes", "width", "num_layers", "num_heads", "max_len"):
        if not is_int(getattr(o, name)) or getattr(o, name) < 1:
            fail(name, f"must be a positive int, got {getattr(o, name)!r}")
    if o.num_classes < 2:
        fail("num_classes", f"must be >= 2, got {o.num_classes}")
    for name in ("num_kv_heads", "head_dim"):
        value = getattr(o, name)
        if value is not None and (not is_int(value) or value < 1):
            fail(name, f"must be None or a positive int, got {value!r}")
    if o.head_dim is None and o.width % o.num_heads:
        fail("num_heads", f"width={o.width} is not divisible by num_heads={o.num_heads}")
    if o.num_kv_heads is not None and o.num_heads % o.num_kv_heads:
        fail("num_kv_heads", f"must divide num_heads={o.num_heads}, got {o.num_kv_heads}")
    if not is_int(o.mlp_dim) or o.mlp_dim < 0:
        fail("mlp_dim", f"must be an int >= 0 (0: no MLP), got {o.mlp_dim!r}")
    if not (is_real(o.dropout_rate) and 0.0 <= o.dropout_rate < 1.0):
        fail("dropout_rate", f"must be a number in [0, 1), got {o.dropout_rate!r}")
    if len(o.attention_kinds) != o.num_layers:
        fail(
            "attention_kinds",
            f"needs one entry per layer ({o.num_layers}), got {o.attention_kinds}",
        )
    for kind in o.attention_kinds:
        if not isinstance(kind, str) or kind not in ATTENTION_KINDS:
            fail("attention_kinds", f"unknown attention kind {kind!r}; choose {ATTENTION_KINDS}")
    implementations = tuple(k for k in ATTENTION_OPTIONS if k is not None)
    if o.implementation is not None and (
        not isinstance(o.implementation, str) or o.implementation not in implementations
    ):
        fail(
            "implementation",
            f"unknown implementation {o.implementation!r}; choose None (the best exact kernel) "
            f"or one of {implementations}",
        )
    head_dim = o.head_dim or o.width // o.num_heads
    check_attention_options(
        o.implementation,
        o.attention_options,
        head_dim=head_dim,
        prefix=f"{prefix}.attention_options",
    )
    for name, allowed in (
        ("embedding", EMBEDDINGS),
        ("positional", POSITIONAL),
        ("head", HEADS),
        ("pool", POOLS),
    ):
        value = getattr(o, name)
        if not isinstance(value, str) or value not in allowed:
            fail(name, f"unknown {value!r}; choose {allowed}")
    for name in ("entry_bound", "scale"):
        value = getattr(o, name)
        if value is not None and not (is_real(value) and 0 < value < math.inf):
            fail(name, f"must be None or a positive finite number, got {value!r}")
    for name in ("learn_scale", "causal"):
        if not isinstance(getattr(o, name), bool):
            fail(name, f"must be a bool, got {getattr(o, name)!r}")
    if o.window is not None:
        w = o.window
        if len(w) != 2 or not all(x is None or (is_int(x) and x >= 1) for x in w):
            fail("window", f"must be None or a pair (w1, w2) of positive ints or None, got {w!r}")
        if not o.causal:
            fail("window", "a sliding window requires causal=True")
        if "standard" in o.attention_kinds and w[0] is None:
            fail("window", f"standard layers use w1 as their window: it must be an int, got {w}")
    f = o.fourier_frequencies
    if f is not None and not (is_int(f) and 1 <= f <= o.vocab_size // 2):
        fail(
            "fourier_frequencies",
            f"must be None (all (vocab_size - 1) // 2) or an int in [1, {o.vocab_size // 2}] "
            f"(vocab_size {o.vocab_size}), got {f!r}",
        )
    if o.embedding == "fourier" and f is None and (o.vocab_size - 1) // 2 < 1:
        fail("fourier_frequencies", f"vocab_size {o.vocab_size} leaves no frequency; set it to 1")
    if o.sequence_axis is not None:
        if not isinstance(o.sequence_axis, str):
            fail("sequence_axis", f"must be None or a mesh axis name, got {o.sequence_axis!r}")
        if o.causal or o.window is not None:
            fail("sequence_axis", "sequence parallelism supports only non-causal attention")
    if o.dtype is not None:
        try:
            name = jnp.dtype(o.dtype).name
        except TypeError:
            name = None
        if name not in DTYPES:
            fail("dtype", f"must be None (float32) or one of {DTYPES}, got {o.dtype!r}")
    if o.implementation == "pallas" and "tensor" in o.attention_kinds:
        _check_pallas(o, head_dim, fail)


def _check_pallas(o: ModelOptions, head_dim: int, fail) -> None:
    """implementation="pallas" must run this model's tensor layers on the default backend
    (TPU: always allowed, as in the kernel; under sequence sharding: not checked here)."""
    backend = jax.default_backend()
    if backend == "tpu" or o.sequence_axis is not None:
        return
    try:
        from tensorattn.kernels import pallas, validation
    except ImportError as e:
        fail("implementation", f"'pallas' is not available in this build: {e}")
    dtype = jnp.dtype(o.dtype or jnp.float32)
    kv = o.num_kv_heads or o.num_heads
    q = jax.ShapeDtypeStruct((1, o.max_len, o.num_heads, head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, o.max_len, kv, head_dim), dtype)
    windows = (None, None) if o.window is None else tuple(o.window)
    spec = validation.AttentionSpec(
        scale=1.0, causal=o.causal, windows=windows, key_masks=(None, None)
    )
    if not pallas.supports(q, (k, k), spec, **dict(o.attention_options)):
        fail(
            "implementation",
            f"'pallas' does not run this model on the {backend!r} backend (it needs a GPU with "
            "power-of-two head_dim and tiles >= 16, or attention_options.interpret=True); "
            "use implementation=None or 'blocked'",
        )


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
