"""Shared config pieces: the config-string parser, the default model/kernel/optim/train
sections and the `smoke` switch that shrinks any config so CI runs the real code path in
seconds.

Sections: `model` the architecture (`tensorattn.models.ModelOptions`, with
`model.polynomial` the `PolynomialConfig` of attention="polynomial" layers), `kernel` the run
options of the tensor layers (`implementation`, `blocked`, `pallas`: every `BlockedConfig` /
`PallasConfig` field), `optim`, `train`. All settable from the command line, e.g.
`--config.kernel.implementation=blocked --config.kernel.blocked.block_q=32`,
`--config.kernel.pallas.fwd_block_rows=64`, `--config.model.polynomial.degree=3`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from tensorattn.kernels.configs import BlockedConfig, PallasConfig, PolynomialConfig
from tensorattn.models import ATTENTION


def parse_arg(arg: str | None, **defaults):
    """Parses "key=value,flag" into a ConfigDict typed by `defaults` (bare `flag` is True)."""
    parsed = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not _:
            value = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a bool")
            value = value.lower() in ("true", "1")
        elif isinstance(default, int | float):
            kind = type(default)
            try:
                value = kind(value)
            except ValueError:
                article = "an" if kind is int else "a"
                raise ValueError(
                    f"config argument {key}={value!r} is not {article} {kind.__name__}"
                ) from None
        parsed[key] = value
    if parsed.get("attention", "tensor") not in ATTENTION:
        raise ValueError(f"config argument attention={parsed.attention!r}; choose {ATTENTION}")
    return parsed


def model_config(attention: str = "tensor") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # "tensor" (order-3, exact), "standard" (softmax baseline) or "polynomial" (approximate).
    c.attention = attention
    # With several layers: layer i is a tensor layer iff (i + 1) % tensor_every == 0.
    c.tensor_every = 1
    # Residual stream width.
    c.width = 64
    # Number of transformer blocks.
    c.num_layers = 1
    # Query heads; width must be divisible by it unless head_dim is set.
    c.num_heads = 2
    # Key/value heads (grouped heads); None: num_heads.
    c.num_kv_heads = ml_collections.FieldReference(None, field_type=int)
    # Per-head dimension; None: width // num_heads.
    c.head_dim = ml_collections.FieldReference(None, field_type=int)
    # MLP hidden size (0: no MLP).
    c.mlp_dim = 256
    # Dropout on attention and MLP outputs.
    c.dropout_rate = 0.0
    # attention="polynomial" layers: PolynomialConfig fields (degree None: 4; on_uncertified
    # "warn", "error" or "ignore"; fused=True and its precision, tiles and interpret: run
    # options, not part of the model's identity; ...). Left at the defaults for exact attention.
    c.polynomial = typed_section(PolynomialConfig)
    # Bound B on q, k1, k2 entries via B*tanh(x/B) (polynomial method hypothesis); None: off.
    c.entry_bound = ml_collections.FieldReference(None, field_type=float)
    # Score scale; None: 1/sqrt(head_dim).
    c.scale = ml_collections.FieldReference(None, field_type=float)
    # Learn a per-head score scale (initialised at `scale`).
    c.learn_scale = False
    # Causal masking (and a causal sliding window (w1, w2) if set).
    c.causal = False
    c.window = ml_collections.FieldReference(None, field_type=tuple)
    # Token embedding: "learned" or "fourier" (fixed cos/sin of 2*pi*f*x/vocab, projected).
    c.embedding = "learned"
    # Fourier frequencies f = 1..F; None: all (vocab - 1) // 2.
    c.fourier_frequencies = ml_collections.FieldReference(None, field_type=int)
    # Positional embedding: "none" (permutation-invariant tasks) or "learned".
    c.positional = "none"
    # Per-sequence heads pool with "mean", "last" or "first".
    c.pool = "mean"
    return c


def typed_section(cls) -> ml_collections.ConfigDict:
    """A section with every field of the frozen config class `cls` at its default; a None
    default keeps the field's type (from its annotation) so the command line can set it."""
    types = {"int": int, "float": float, "str": str, "bool": bool}
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        if f.default is None:
            kind = types[str(f.type).split("|")[0].strip()]
            c[f.name] = ml_collections.FieldReference(None, field_type=kind)
        else:
            c[f.name] = f.default
    return c


def kernel_config() -> ml_collections.ConfigDict:
    """Run options of the tensor layers: not part of the model's identity (a workdir resumes
    under another kernel or tiles)."""
    c = ml_collections.ConfigDict()
    # Exact kernel: None (the best one for each call), "reference", "blocked" or "pallas".
    c.implementation = ml_collections.FieldReference(None, field_type=str)
    # Tiles of implementation="blocked" (BlockedConfig: block_q, block_outer, block_inner).
    c.blocked = typed_section(BlockedConfig)
    # Tiles and launch settings of implementation="pallas" (PallasConfig; None: picked for
    # the shapes): fwd_block_rows, fwd_block_k2, bwd_block_rows, bwd_block_k1, bwd_block_k2,
    # bwd_fuse_k1, num_warps, num_stages, interpret.
    c.pallas = typed_section(PallasConfig)
    return c


def optim_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Peak AdamW learning rate (after linear warm-up, then cosine decay).
    c.learning_rate = 1e-3
    # Linear warm-up steps.
    c.warmup_steps = 200
    # Final learning rate as a fraction of the peak.
    c.end_lr_fraction = 0.0
    # Decoupled weight decay on matrices (not biases, norms or scales).
    c.weight_decay = 0.0
    # Adam moments.
    c.b1 = 0.9
    c.b2 = 0.98
    # Global gradient-norm clip (0: off).
    c.grad_clip = 1.0
    return c


def train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Seed of the parameters, dropout and the training data stream.
    c.seed = 0
    # Global batch size (split over data-parallel devices).
    c.batch_size = 128
    # Optimizer steps.
    c.num_steps = 2000
    # Log a progress line and train metrics every N steps.
    c.log_every = 100
    # Evaluate on the fixed held-out set every N steps (and at the end).
    c.eval_every = 500
    # Save an orbax checkpoint every N steps (and at the end).
    c.checkpoint_every = 500
    # Checkpoints kept on disk.
    c.keep_checkpoints = 2
    # Held-out examples and the batch size used to evaluate them.
    c.eval_size = 2048
    c.eval_batch_size = 512
    # Seed of the held-out set (a stream disjoint from the training batches).
    c.eval_seed = 1234
    # Devices along the `seq` mesh axis (tensor-attention queries sharded over them).
    c.sequence_shards = 1
    # Use the first N devices (None: all).
    c.num_devices = ml_collections.FieldReference(None, field_type=int)
    return c


def base_config(task: str, task_kwargs: dict, attention: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = ml_collections.ConfigDict()
    # Registered task name (tensorattn.tasks.names()).
    config.task.name = task
    # Task constructor arguments.
    config.task.kwargs = ml_collections.ConfigDict(task_kwargs)
    config.model = model_config(attention)
    config.kernel = kernel_config()
    config.optim = optim_config()
    config.train = train_config()
    return config


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny model, few steps: every code path (eval, checkpoint, resume) in seconds."""
    config.model.width = 16
    config.model.mlp_dim = 32
    config.model.head_dim = None
    config.train.batch_size = 16
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.train.eval_size = 64
    config.train.eval_batch_size = 32
    config.optim.warmup_steps = 5
    return config
