"""Encoders and classifiers built from the attention layers (pre-LayerNorm transformer).

`ModelOptions` is the typed, frozen description of a model's architecture (what its
parameters mean); `Classifier(options, kernel=..., wrap_attend=...)` maps int32 tokens
`[B, T]` to logits `[B, T, C]` (per-position head) or `[B, C]` (per-sequence head). How it
runs (the exact kernel of its tensor layers, sequence sharding) is given separately and is
not part of its identity: a checkpoint restores under any of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tensorattn.kernels.configs import KernelConfig, PolynomialConfig
from tensorattn.layers import Attend, Kernel, StandardAttention, TensorAttention

Array = jax.Array

ATTENTION = ("tensor", "standard", "polynomial")
EMBEDDINGS = ("learned", "fourier")
POSITIONAL = ("none", "learned")
HEADS = ("token", "sequence")
POOLS = ("mean", "last", "first")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def typed_config(cls: type[KernelConfig], values, prefix: str) -> KernelConfig:
    """`cls` (a `KernelConfig` class) built from a mapping of its fields (or an instance),
    validated by the class itself; ValueError starts with the dotted field (`prefix.field:`)."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix}: must be a mapping of {cls.__name__} fields, got {values!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in known:
            raise ValueError(f"{prefix}.{name}: unknown field; {cls.__name__} has {known}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        field = re.match(rf"{cls.__name__}\.(\w+)", str(e))
        raise ValueError(f"{prefix}{'.' + field.group(1) if field else ''}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """A `Classifier`'s architecture; see `validate` for the allowed values.

    `attention` ("tensor", "standard" or "polynomial") and `tensor_every` give each layer's
    kind (`attention_kinds`); `polynomial` (a `PolynomialConfig` or a mapping of its fields)
    configures the polynomial layers: None for attention="polynomial" means
    `PolynomialConfig()`; for the exact kinds it must be None or the defaults (kept as None).
    """

    vocab_size: int
    num_classes: int = 2
    width: int = 64
    num_layers: int = 1
    num_heads: int = 2
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int = 256
    dropout_rate: float = 0.0
    attention: str = "tensor"
    # With several layers: layer i is a tensor layer iff (i + 1) % tensor_every == 0.
    tensor_every: int = 1
    polynomial: PolynomialConfig | None = None
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
    dtype: Any = None

    def __post_init__(self):
        if isinstance(self.window, list | tuple):
            object.__setattr__(self, "window", tuple(self.window))
        if self.dtype is not None:
            try:  # a dtype object -> its name, as config.json holds it (validate checks it)
                object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
            except TypeError:
                pass
        poly = self.polynomial
        if poly is not None:
            poly = typed_config(PolynomialConfig, poly, "model.polynomial")
        if self.attention == "polynomial" and poly is None:
            poly = PolynomialConfig()
        elif self.attention != "polynomial" and poly == PolynomialConfig():
            poly = None  # the defaults of an unused section: one canonical form
        object.__setattr__(self, "polynomial", poly)

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """One kind per layer: `attention` ("tensor" or "polynomial") where
        `(i + 1) % tensor_every == 0`, else "standard"; all "standard" for attention="standard"."""
        every = self.tensor_every
        return tuple(
            self.attention if (i + 1) % every == 0 else "standard" for i in range(self.num_layers)
        )

    def identity(self) -> dict[str, Any]:
        """The fields that define the parameters and the function they compute (`identity`)."""
        return identity(dataclasses.asdict(self))


# Polynomial options that change how the function is computed, not which: a checkpoint
# resumes under other values.
POLYNOMIAL_RUN_OPTIONS = ("gradient", "chunk_size", "on_uncertified", "fused") + (
    PolynomialConfig.FUSED_OPTIONS
)


def json_ready(value):
    """`value` as it reads back from JSON (tuples as lists, dtypes as strings)."""
    return json.loads(json.dumps(value, default=str))


def identity(model: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The identity of a model given as a dict (`ModelOptions` fields, e.g. from a saved
    config.json): every field but `POLYNOMIAL_RUN_OPTIONS`. Equal identities share
    checkpoints; the kernel, sequence sharding and device count are not part of it."""
    if not isinstance(model, Mapping):
        return model
    out = json_ready(dict(model))
    if out.get("dtype") == "float32":
        out["dtype"] = None  # the same computation: float32 is the default
    if isinstance(out.get("polynomial"), dict):
        for name in POLYNOMIAL_RUN_OPTIONS:
            out["polynomial"].pop(name, None)
    return out


def _check_polynomial(o: ModelOptions, head_dim: int, fail) -> None:
    """The polynomial layers' feature rank `C(head_dim + g, g)` must be at most 2^20 (the
    kernel's `MAX_RANK`), with `g` the degree, or the one `tolerance` picks at the initial
    score range `scale·head_dim·bound³` (docs/math.md §4)."""
    from tensorattn.kernels import polynomial as poly

    p = o.polynomial
    degree, picked = p.degree, ""
    if degree is None and p.tolerance is not None:
        R = p.score_range
        if R is None:
            scale = o.scale if o.scale is not None else head_dim**-0.5
            R = scale * head_dim * p.bound**3
        try:
            degree = poly.select_degree(float(R), float(p.tolerance), p.polynomial)
        except ValueError as e:
            fail("polynomial.tolerance", str(e))
        picked = f"tolerance={p.tolerance} picks degree {degree}, which "
    g = poly.DEFAULT_DEGREE if degree is None else degree
    rank = math.comb(head_dim + g, g)
    if rank > poly.MAX_RANK:
        fail(
            "polynomial.tolerance" if picked else "polynomial.degree",
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
    - attention: "tensor", "standard" or "polynomial"; tensor_every: a positive int, at most
      num_layers unless attention="standard" (so that some layer is of the given kind).
    - polynomial: `PolynomialConfig` fields (checked by the class), only with
      attention="polynomial"; its feature rank C(head_dim + degree, degree) (degree 4 by
      default, or the one `tolerance` picks) must be at most 2^20.
    - entry_bound, scale: None or a positive finite number; learn_scale, causal: bools.
    - window: None or a pair (w1, w2), each a positive int or None (unbounded), only with
      causal=True; standard layers use w1 alone, which must then be an int.
    - embedding: "learned" or "fourier"; fourier_frequencies: None (all (vocab_size - 1) // 2:
      needs vocab_size >= 3 with "fourier") or an int in [1, vocab_size // 2].
    - positional: "none" or "learned"; head: "token" or "sequence"; pool: "mean", "last" or
      "first".
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
    if not isinstance(o.attention, str) or o.attention not in ATTENTION:
        fail("attention", f"unknown attention {o.attention!r}; choose {ATTENTION}")
    if not is_int(o.tensor_every) or o.tensor_every < 1:
        fail("tensor_every", f"must be a positive int, got {o.tensor_every!r}")
    if o.attention != "standard" and o.tensor_every > o.num_layers:
        fail(
            "tensor_every",
            f"{o.tensor_every} > num_layers={o.num_layers} leaves no {o.attention} layer; "
            "lower it, or use attention='standard'",
        )
    head_dim = o.head_dim or o.width // o.num_heads
    if o.polynomial is not None:
        if not isinstance(o.polynomial, PolynomialConfig):
            fail("polynomial", f"must be a PolynomialConfig, got {o.polynomial!r}")
        if o.attention != "polynomial":
            changed = [
                f.name
                for f in dataclasses.fields(PolynomialConfig)
                if getattr(o.polynomial, f.name) != f.default
            ]
            fail(
                f"polynomial.{changed[0]}" if changed else "polynomial",
                f"set, but attention={o.attention!r}: polynomial options configure "
                "attention='polynomial' layers only",
            )
        _check_polynomial(o, head_dim, fail)
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
        if (
            not isinstance(w, tuple)
            or len(w) != 2
            or not all(x is None or (is_int(x) and x >= 1) for x in w)
        ):
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
    if o.dtype is not None:
        try:
            name = jnp.dtype(o.dtype).name
        except TypeError:
            name = None
        if name not in DTYPES:
            fail("dtype", f"must be None (float32) or one of {DTYPES}, got {o.dtype!r}")


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
            if tokens_BxT.shape[1] > o.max_len:
                raise ValueError(
                    f"model.max_len: {o.max_len} learned positions, but the input has length "
                    f"{tokens_BxT.shape[1]}; raise max_len"
                )
            # Initialised like the token embeddings (std 1/sqrt(width)): at GPT-2's 0.02 the
            # positions are a sixth of the input at width 64, and one tensor layer never found
            # the grid's rows and columns (docs/training.md, quotient relation composition).
            pos_TxD = self.param(
                "positions", nn.linear.default_embed_init, (o.max_len, o.width), jnp.float32
            )
            x_BxTxD = x_BxTxD + pos_TxD[: tokens_BxT.shape[1]]
        return x_BxTxD


class Block(nn.Module):
    """Pre-LayerNorm block: `x + attn(LN(x))`, then `x + MLP(LN(x))`."""

    options: ModelOptions
    kind: str
    kernel: Kernel = Kernel()
    wrap_attend: Callable[[Attend], Attend] | None = None

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
        if self.kind == "standard":
            window = None if o.window is None else o.window[0]  # w1 (validate)
            h_BxTxD = StandardAttention(window=window, **common)(
                h_BxTxD, kv_mask=mask_BxT, deterministic=deterministic
            )
        else:
            kernel = self.kernel if self.kind == "tensor" else Kernel("polynomial", o.polynomial)
            attend = None if self.wrap_attend is None else self.wrap_attend(kernel)
            h_BxTxD = TensorAttention(
                window=o.window,
                implementation=kernel.implementation,
                kernel_config=kernel.config,
                attend=attend,
                **common,
            )(h_BxTxD, k1_mask=mask_BxT, k2_mask=mask_BxT, deterministic=deterministic)
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
    kernel: Kernel = Kernel()
    wrap_attend: Callable[[Attend], Attend] | None = None

    @nn.compact
    def __call__(
        self, tokens_BxT: Array, mask_BxT: Array | None = None, *, deterministic: bool = True
    ) -> Array:
        x_BxTxD = Embedding(self.options, name="embedding")(tokens_BxT)
        for i, kind in enumerate(self.options.attention_kinds):
            block = Block(self.options, kind, self.kernel, self.wrap_attend, name=f"block_{i}")
            x_BxTxD = block(x_BxTxD, mask_BxT, deterministic)
        return nn.LayerNorm(name="ln_final")(x_BxTxD)


class Classifier(nn.Module):
    """Encoder plus a per-position (`head="token"`) or per-sequence (`"sequence"`) head.

    `options`: the architecture. Run options, not part of the identity:
    - `kernel`: the exact kernel of the "tensor" layers, a `tensorattn.layers.Kernel`
      (implementation None|"reference"|"blocked"|"pallas" and its typed config); polynomial
      layers run `Kernel("polynomial", options.polynomial)`.
    - `wrap_attend`: None, or a function `attend -> attend` applied to every tensor or
      polynomial layer's kernel (the trainer's sequence sharding: `sharding.shard_queries`).
      It should compare by value (e.g. a module-level function) so jit caches by it.

    `mask_BxT` marks valid input positions (key padding); None means all valid. With it,
    `pool="last"`/`"first"` take each row's last/first valid position, `"mean"` the mean over
    valid positions.
    """

    options: ModelOptions
    kernel: Kernel = Kernel()
    wrap_attend: Callable[[Attend], Attend] | None = None

    def __post_init__(self):
        if not isinstance(self.kernel, Kernel):
            raise ValueError(f"Classifier.kernel must be a layers.Kernel, got {self.kernel!r}")
        if self.kernel.name == "polynomial":
            raise ValueError(
                "Classifier.kernel is the exact kernel of tensor layers; polynomial attention "
                "is an architecture: ModelOptions(attention='polynomial', polynomial=...)"
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self, tokens_BxT: Array, mask_BxT: Array | None = None, *, deterministic: bool = True
    ) -> Array:
        o = self.options
        x_BxTxD = Encoder(o, self.kernel, self.wrap_attend, name="encoder")(
            tokens_BxT, mask_BxT, deterministic=deterministic
        )
        if o.head == "sequence":
            if o.pool in ("last", "first"):
                index_B = _pool_index(o.pool, mask_BxT, x_BxTxD)
                x_BxD = x_BxTxD[jnp.arange(x_BxTxD.shape[0]), index_B]
            elif mask_BxT is None:
                x_BxD = x_BxTxD.mean(axis=1)
            else:
                w_BxT = mask_BxT.astype(x_BxTxD.dtype)
                x_BxD = (x_BxTxD * w_BxT[..., None]).sum(1) / jnp.maximum(w_BxT.sum(1), 1)[:, None]
            return nn.Dense(o.num_classes, name="head")(x_BxD)
        return nn.Dense(o.num_classes, name="head")(x_BxTxD)


def _pool_index(pool: str, mask_BxT: Array | None, x_BxTxD: Array) -> Array:
    """`[B]` the last (or first) valid position of each row (0 for a row with none)."""
    b, t = x_BxTxD.shape[:2]
    if mask_BxT is None:
        return jnp.full((b,), t - 1 if pool == "last" else 0)
    pos_T = jnp.arange(t)
    if pool == "last":
        return jnp.max(jnp.where(mask_BxT, pos_T, 0), axis=1)
    return jnp.min(jnp.where(mask_BxT, pos_T, t), axis=1) % t


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
