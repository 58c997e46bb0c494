"""Flax (linen) attention layers over the kernels: tensor attention and a standard baseline.

Both layers take `[B, T, D]` inputs and return `[B, T, D_out]`; projections are `DenseGeneral`
to per-head shapes (`q_BxTxNxH`, `k1_BxSxKxH`, ...), `N % K == 0` grouped heads. The kernel
does not expose attention probabilities, so dropout applies to the attention output.

A tensor layer computes its attention with an *attend function*, any callable with
`tensorattn.tensor_attention`'s signature `(q, k1, k2, v1, v2, *, causal, window, k1_mask,
k2_mask, scale)`: by default `Kernel(implementation, kernel_config)`, or one given as `attend`
(e.g. the trainer's sequence-sharded kernel, `tensorattn.sharding.shard_queries`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import Scope

from tensorattn.kernels import api, causal_scan, spine
from tensorattn.kernels.configs import KernelConfig, PolynomialConfig
from tensorattn.kernels.polynomial import PolynomialAccuracyWarning

Array = jax.Array
# An attend function: `(q, k1, k2, v1, v2, *, causal, window, k1_mask, k2_mask, scale) -> out`.
Attend = Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """`tensorattn.tensor_attention` with a fixed implementation and typed config, as an
    attend function. Frozen and compared by value, so equal kernels share jit compilations.

    implementation: None (the best exact kernel for the call, or the config's implementation
      when `config` is given), "reference", "blocked", "pallas" or "polynomial".
    config: that implementation's `KernelConfig` (`BlockedConfig`, `PallasConfig`,
      `PolynomialConfig`, ...) or None (the library picks). A mismatch raises ValueError.
    """

    implementation: str | None = None
    config: KernelConfig | None = None

    def __post_init__(self):
        api.resolve(self.implementation, self.config, {})  # the kernel's own checks

    @property
    def name(self) -> str | None:
        """The implementation that runs: the given one, else the config's (None: the default)."""
        return api.resolve(self.implementation, self.config, {})[0]

    def __call__(
        self,
        q,
        k1,
        k2,
        v1,
        v2,
        *,
        causal=False,
        window=None,
        k1_mask=None,
        k2_mask=None,
        scale=None,
    ):
        return api.tensor_attention(
            q,
            k1,
            k2,
            v1,
            v2,
            implementation=self.implementation,
            config=self.config,
            causal=causal,
            window=window,
            k1_mask=k1_mask,
            k2_mask=k2_mask,
            scale=scale,
        )


def bound_entries(x: Array, bound: float | None) -> Array:
    """`bound * tanh(x / bound)`: entries in `(-bound, bound)`, identity near zero."""
    if bound is None:
        return x
    return bound * jnp.tanh(x / bound)


class _Projections(nn.Module):
    """Shared projection helper: `[B,T,D] -> [B,T,heads,dim]`."""

    heads: int
    dim: int
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.DenseGeneral(
            (self.heads, self.dim),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.lecun_normal(),
            name="dense",
        )(x)


def _output(module: nn.Module, o_BxTxNxV: Array, width: int, deterministic: bool) -> Array:
    """An attention layer's dropout and output projection `[B,T,N,V] -> [B,T,out_features]`
    (its parameters under `out`; called from the layer's compact `__call__`)."""
    o_BxTxNxV = nn.Dropout(module.dropout_rate)(o_BxTxNxV, deterministic=deterministic)
    return nn.DenseGeneral(
        module.out_features or width,
        axis=(-2, -1),
        use_bias=module.use_bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name="out",
    )(o_BxTxNxV)


def _heads(num_heads: int, num_kv_heads: int | None, head_dim: int | None, width: int):
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={kv}")
    if head_dim is None:
        if width % num_heads:
            raise ValueError(
                f"input width {width} is not divisible by num_heads={num_heads}; set head_dim"
            )
        head_dim = width // num_heads
    return kv, head_dim


def _check_fields(module: nn.Module, ints: tuple[str, ...], optional: tuple[str, ...]):
    """Raises ValueError naming the first invalid field: `ints` positive ints, `optional`
    positive ints or None; `entry_bound`, `scale` positive finite or None; `dropout_rate` in
    [0, 1]."""
    name = type(module).__name__
    for field in ints + optional:
        v = getattr(module, field)
        if v is None and field in optional:
            continue
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            what = "a positive int" + (" or None" if field in optional else "")
            raise ValueError(f"{name}.{field} must be {what}, got {v!r}")
    for field in ("entry_bound", "scale"):
        v = getattr(module, field)
        ok = v is None or (
            isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < math.inf
        )
        if not ok:
            raise ValueError(f"{name}.{field} must be a positive finite number or None, got {v!r}")
    rate = module.dropout_rate
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0 <= rate <= 1:
        raise ValueError(f"{name}.dropout_rate must be in [0, 1], got {rate!r}")
    kv = module.num_kv_heads
    if kv is not None and module.num_heads % kv:
        raise ValueError(f"num_heads={module.num_heads} must be a multiple of num_kv_heads={kv}")
    for field in ("causal", "learn_scale", "use_bias"):
        if not isinstance(getattr(module, field), (bool, np.bool_)):
            raise ValueError(f"{name}.{field} must be a bool, got {getattr(module, field)!r}")


def _check_inputs(layer: str, **inputs) -> None:
    """Raises ValueError unless every input is `[B, T, D]` with the batch of the first."""
    batch = None
    for name, x in inputs.items():
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 3:
            raise ValueError(f"{layer}: {name} must be a [B, T, D] array, got shape {shape}")
        if batch is None:
            batch, first = shape[0], name
        elif shape[0] != batch:
            raise ValueError(
                f"{layer}: {name} has batch {shape[0]}, {first} has {batch}; they must match"
            )


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _check_window(module: nn.Module, pair_ok) -> None:
    """Raises ValueError unless `window` is None or passes `pair_ok`."""
    window = module.window
    if window is not None and not pair_ok(window):
        raise ValueError(
            f"{type(module).__name__}.window must be {pair_ok.__doc__} or None, got {window!r}"
        )
    if isinstance(window, list):  # a tuple keeps the module hashable (jit static arguments)
        object.__setattr__(module, "window", tuple(window))


def _score_scale(module: nn.Module, scale: float, learn_scale: bool, heads: int):
    """The score scale: `scale`, or with `learn_scale` the learned per-head scale `[N]`
    (`exp(log_scale)`, float32, initialised at `scale`)."""
    if not learn_scale:
        return scale
    log_scale = module.param(
        "log_scale", lambda _, n: jnp.full((n,), math.log(scale), jnp.float32), heads
    )
    return jnp.exp(log_scale)


def _scaled_queries(module: nn.Module, q: Array, scale: float, learn_scale: bool) -> Array:
    """Folds the score scale into `q` (per head with `learn_scale`)."""
    s = _score_scale(module, scale, learn_scale, q.shape[2])
    return q * jnp.asarray(s, q.dtype)[..., None] if learn_scale else q * jnp.asarray(s, q.dtype)


class TensorAttention(nn.Module):
    """Multi-head order-3 tensor attention (docs/math.md §1) with input/output projections.

    Self-attention: `layer(x)`. Cross-attention over two key sequences (e.g. two modalities):
    `layer(x_q, x_k1, x_k2)`; `x_k2` defaults to `x_k1`, which defaults to `x_q`, and
    without `x_k2`, `k2_mask` defaults to `k1_mask` (the same keys, the same padding). Inputs
    are `[B, T, D]` arrays with one batch size.

    The attention runs `Kernel(implementation, kernel_config)` (`tensorattn.tensor_attention`
    with that implementation and typed config), or `attend` when given: a function with
    `tensor_attention`'s signature used instead of the kernel (e.g. the trainer's
    sequence-sharded kernel); `implementation`/`kernel_config` then only describe it (for the
    warning below). The score scale reaches the kernel as its `scale`: the float (`scale`,
    default `1/sqrt(head_dim)`), or with `learn_scale` the learned per-head scale `[N]`
    (`exp(log_scale)`), so a polynomial kernel's certificate sees the true scores.
    `entry_bound` B maps q, k1, k2 through `B tanh(./B)` so every entry is below B, the
    polynomial method's hypothesis (docs/math.md §4). A polynomial layer (implementation
    "polynomial" or a `PolynomialConfig`) without `entry_bound` warns at construction
    (`PolynomialAccuracyWarning`) unless `kernel_config.on_uncertified == "ignore"` (a
    polynomial layer trained as an attention of its own). Invalid fields raise ValueError at
    construction.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    value_dim: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    causal: bool = False
    window: tuple[int, int] | None = None
    implementation: str | None = None
    kernel_config: KernelConfig | None = None
    attend: Attend | None = None
    entry_bound: float | None = None
    scale: float | None = None
    learn_scale: bool = False
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _check_fields(
            self, ("num_heads",), ("num_kv_heads", "head_dim", "value_dim", "out_features")
        )
        _check_window(self, _tensor_window)
        kernel = Kernel(self.implementation, self.kernel_config)  # checks the pair
        cfg = self.kernel_config
        if self.learn_scale and isinstance(cfg, PolynomialConfig) and self.attend is None:
            if cfg.bound is not None or cfg.fused:
                what = "bound" if cfg.bound is not None else "fused=True"
                raise ValueError(
                    f"TensorAttention.learn_scale gives the kernel an array scale, which "
                    f"PolynomialConfig({what}) cannot take (it needs a Python float scale); "
                    "set learn_scale=False or give PolynomialConfig a degree without bound"
                )
        if isinstance(cfg, PolynomialConfig) and cfg.fused and self.window is not None:
            raise ValueError(
                "TensorAttention.window: PolynomialConfig(fused=True) runs no sliding windows; "
                "use fused=False (the XLA polynomial kernel runs them) or window=None"
            )
        if self.attend is not None and not callable(self.attend):
            raise ValueError(
                f"TensorAttention.attend must be callable or None, got {self.attend!r}"
            )
        # A Scope parent is init/apply binding a clone: warn once, for the user's construction.
        if (
            kernel.name == "polynomial"
            and self.entry_bound is None
            and (cfg is None or cfg.on_uncertified != "ignore")
            and not isinstance(self.parent, Scope)
        ):
            warnings.warn(
                "TensorAttention(implementation='polynomial') without entry_bound: q, k1, k2 "
                "are unbounded projections, so the scores are unbounded and the polynomial "
                "method's error is not controlled (each call warns when its certified error "
                "exceeds the tolerance). Set entry_bound=B (|score| <= scale·head_dim·B³), or "
                "kernel_config=PolynomialConfig(on_uncertified='ignore') to train the "
                "polynomial layer as an attention of its own.",
                PolynomialAccuracyWarning,
                stacklevel=4,  # user <- flax init wrapper <- __init__ <- here
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x_q: Array,
        x_k1: Array | None = None,
        x_k2: Array | None = None,
        *,
        k1_mask: Array | None = None,
        k2_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        if x_k2 is None and k2_mask is None:
            k2_mask = k1_mask  # the second key set is the first one: the same padding
        x_k1 = x_q if x_k1 is None else x_k1
        x_k2 = x_k1 if x_k2 is None else x_k2
        _check_inputs("TensorAttention", x_q=x_q, x_k1=x_k1, x_k2=x_k2)
        width = x_q.shape[-1]
        kv, h = _heads(self.num_heads, self.num_kv_heads, self.head_dim, width)
        hv = h if self.value_dim is None else self.value_dim
        proj = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        q_BxTxNxH = _Projections(self.num_heads, h, name="query", **proj)(x_q)
        k1_BxSxKxH = _Projections(kv, h, name="key1", **proj)(x_k1)
        k2_BxSxKxH = _Projections(kv, h, name="key2", **proj)(x_k2)
        v1_BxSxKxV = _Projections(kv, hv, name="value1", **proj)(x_k1)
        v2_BxSxKxV = _Projections(kv, hv, name="value2", **proj)(x_k2)
        q_BxTxNxH = bound_entries(q_BxTxNxH, self.entry_bound)
        k1_BxSxKxH = bound_entries(k1_BxSxKxH, self.entry_bound)
        k2_BxSxKxH = bound_entries(k2_BxSxKxH, self.entry_bound)
        scale = 1.0 / math.sqrt(h) if self.scale is None else float(self.scale)
        scale_N = _score_scale(self, scale, self.learn_scale, self.num_heads)
        attend = self.attend or Kernel(self.implementation, self.kernel_config)
        o_BxTxNxV = attend(
            q_BxTxNxH,
            k1_BxSxKxH,
            k2_BxSxKxH,
            v1_BxSxKxV,
            v2_BxSxKxV,
            causal=self.causal,
            window=self.window,
            k1_mask=k1_mask,
            k2_mask=k2_mask,
            scale=scale_N,
        )
        return _output(self, o_BxTxNxV, width, deterministic)


def _tensor_window(window) -> bool:
    """a pair (w1, w2), each a positive int or None (unbounded)"""
    pair = isinstance(window, tuple | list) and len(window) == 2
    return pair and all(w is None or _positive_int(w) for w in window)


def _standard_window(window) -> bool:
    """a positive int or a pair (w, w) of equal positive ints"""
    if isinstance(window, tuple | list):
        return len(window) == 2 and window[0] == window[1] and _positive_int(window[0])
    return _positive_int(window)


class StandardAttention(nn.Module):
    """Multi-head softmax attention on `jax.nn.dot_product_attention`, for baselines.

    `TensorAttention`'s fields with one key sequence, without `value_dim`, `implementation`,
    `kernel_config` and `attend`; called as `layer(x_q, x_kv=None, *, kv_mask=None,
    deterministic=True)`. `window` is `(w, w)` or an int (a causal window of `w` keys,
    `i-w < j <= i`) and needs `causal=True` (TensorAttention's window implies causal).
    Keys a query cannot see (padding, causal future, outside its window) never contribute,
    whatever they hold; a non-finite key or value it can see makes its row NaN, as in the
    tensor kernels. Invalid fields raise ValueError at construction.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    causal: bool = False
    window: int | tuple[int, int] | None = None
    scale: float | None = None
    learn_scale: bool = False
    entry_bound: float | None = None
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _check_fields(self, ("num_heads",), ("num_kv_heads", "head_dim", "out_features"))
        _check_window(self, _standard_window)
        if self.window is not None and not self.causal:
            raise ValueError("StandardAttention.window requires causal=True")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x_q: Array,
        x_kv: Array | None = None,
        *,
        kv_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        x_kv = x_q if x_kv is None else x_kv
        _check_inputs("StandardAttention", x_q=x_q, x_kv=x_kv)
        width = x_q.shape[-1]
        kv, h = _heads(self.num_heads, self.num_kv_heads, self.head_dim, width)
        proj = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        q_BxTxNxH = _Projections(self.num_heads, h, name="query", **proj)(x_q)
        k_BxSxKxH = _Projections(kv, h, name="key", **proj)(x_kv)
        v_BxSxKxH = _Projections(kv, h, name="value", **proj)(x_kv)
        q_BxTxNxH = bound_entries(q_BxTxNxH, self.entry_bound)
        k_BxSxKxH = bound_entries(k_BxSxKxH, self.entry_bound)
        scale = 1.0 / math.sqrt(h) if self.scale is None else self.scale
        q_BxTxNxH = _scaled_queries(self, q_BxTxNxH, scale, self.learn_scale)
        t, s = x_q.shape[1], x_kv.shape[1]
        if self.causal and t != s:
            raise ValueError(f"StandardAttention.causal needs equal lengths, got {t} and {s}")
        w = None if self.window is None else int(np.ravel(self.window)[0])
        window = None if w is None else (w - 1, 0)
        mask = None
        if kv_mask is not None:
            if getattr(kv_mask, "shape", None) != (x_kv.shape[0], s) or kv_mask.dtype != bool:
                raise ValueError(
                    f"kv_mask must be a boolean [B,S]=({x_kv.shape[0]}, {s}) array (True = valid "
                    f"key), got {getattr(kv_mask, 'dtype', type(kv_mask).__name__)} "
                    f"{getattr(kv_mask, 'shape', '')}"
                )
            mask = kv_mask[:, None, None, :]
        # Keys and values a query cannot see never contribute, whatever they hold (0 · NaN is
        # NaN): non-finite entries and padding become 0, and a query that can see a valid
        # non-finite key or value gets a NaN row, as in the tensor kernels.
        k_BxSxKxH, v_BxSxKxH, bad_BxSxK = spine.clean_keys(k_BxSxKxH, v_BxSxKxH, kv_mask)
        poisoned_BxTxK = causal_scan.seen(bad_BxSxK, self.causal, w)  # [B, T|1, K]
        o_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH,
            k_BxSxKxH,
            v_BxSxKxH,
            mask=mask,
            scale=1.0,
            is_causal=self.causal,
            local_window_size=window,
        )
        if kv_mask is not None:
            # A query with no valid key it may see outputs zeros, as in the tensor kernels.
            sees_BxT = causal_scan.seen(kv_mask, self.causal, w)  # [B, T|1]
            o_BxTxNxH = jnp.where(sees_BxT[:, :, None, None], o_BxTxNxH, 0)
        poisoned_BxTxN = jnp.repeat(poisoned_BxTxK, self.num_heads // kv, axis=2)
        o_BxTxNxH = jnp.where(poisoned_BxTxN[..., None], jnp.nan, o_BxTxNxH)
        return _output(self, o_BxTxNxH, width, deterministic)
