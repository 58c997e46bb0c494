"""`train_and_evaluate(options, workdir)`: the training loop, evaluation, metrics, checkpoints.

Typed options (`Options`) come from a plain nested dict via `options_from_dict`, which is where
a config file's ConfigDict (converted with `.to_dict()`) enters the library: sections task,
model (the architecture, `models.ModelOptions`), kernel (the exact kernel of the tensor
layers, `KernelOptions`), optim and train. The loop writes `DIR/config.json` (the whole
config), `DIR/metrics.jsonl` (one JSON object per line, each with "step"), TensorBoard events
under `DIR/tensorboard` and orbax checkpoints under `DIR/checkpoints`, and resumes from the
newest checkpoint of the same task and model architecture (`models.identity`); another kernel,
device count or sequence sharding resumes, logging what changed; an optimizer change that
alters the optimizer state's structure is refused. SIGTERM or SIGINT saves the current step
and raises `TrainingInterrupted`. Training batch `s` is a pure function of `(seed, s)`, so a
resumed run sees the same data and the same seed gives the same metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from tensorattn import checkpoints as checkpoints_lib
from tensorattn import layers, models, sharding, tasks
from tensorattn import workdir as workdir_files
from tensorattn.checkpoints import Checkpoints
from tensorattn.kernels.configs import CONFIGS, BlockedConfig, PallasConfig

log = logging.getLogger(__name__)

# The exact kernels `kernel.implementation` may name (None: the best one for each call).
EXACT = tuple(name for name in CONFIGS if name != "polynomial")


class ConfigError(ValueError):
    """A bad option; the message starts with the dotted field name."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after saving the current step (the message says
    where to resume)."""


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    # Registered task name (`tensorattn.tasks.names()`).
    name: str
    # Keyword arguments of the task constructor.
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Run options: the exact kernel of the model's tensor layers. Not part of the model's
    identity (a checkpoint resumes under another kernel or tiles).

    implementation: None (the best exact kernel for each call), "reference", "blocked" or
      "pallas". blocked, pallas: that implementation's tiles (`BlockedConfig`,
      `PallasConfig`), used when it is the chosen implementation.
    """

    implementation: str | None = None
    blocked: BlockedConfig = BlockedConfig()
    pallas: PallasConfig = PallasConfig()

    def kernel(self) -> layers.Kernel:
        config = {"blocked": self.blocked, "pallas": self.pallas}.get(self.implementation)
        return layers.Kernel(self.implementation, config)


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    # Final learning rate as a fraction of the peak (cosine decay).
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    # Global gradient-norm clip (0: none).
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    seed: int = 0
    batch_size: int = 64
    num_steps: int = 1000
    log_every: int = 100
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_size: int = 1024
    eval_batch_size: int = 256
    eval_seed: int = 1234
    # Devices along the mesh's `seq` axis (queries of tensor attention sharded over them).
    sequence_shards: int = 1
    # Use the first N devices (None: all of them).
    num_devices: int | None = None


@dataclasses.dataclass(frozen=True)
class Options:
    task: TaskOptions
    model: models.ModelOptions
    optim: OptimOptions
    train: TrainOptions
    kernel: KernelOptions = KernelOptions()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, section: str, values: Mapping[str, Any], **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown field; known: {sorted(names)}")
    return cls(**dict(values), **extra)


SECTIONS = ("task", "model", "kernel", "optim", "train")
# Former model fields and where they went.
MOVED = {
    "implementation": "kernel.implementation (the exact kernel) or model.attention='polynomial'",
    "attention_options": "kernel.blocked / kernel.pallas (tiles) or model.polynomial",
    "attention_kinds": "model.attention and model.tensor_every",
    "sequence_axis": "train.sequence_shards",
}
# Largest accepted peak learning rate: AdamW steps are about learning_rate per parameter, so
# anything above this diverges at once (and 1e39 overflows float32).
MAX_LEARNING_RATE = 10.0
# The dropout stream folds in seed + 1 as an int32.
MAX_SEED = 2**31 - 2


def _section(config: Mapping[str, Any], name: str) -> dict:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: must be a mapping of fields, got {value!r}")
    return dict(value)


def options_from_dict(config: Mapping[str, Any]) -> Options:
    """Typed `Options` from a nested dict with sections task, model, kernel, optim, train.

    The model section holds `models.ModelOptions` fields (vocabulary, classes, head and length
    come from the task); `model.polynomial` a mapping of `PolynomialConfig` fields. The kernel
    section: `implementation`, and `blocked`/`pallas` mappings of `BlockedConfig`/
    `PallasConfig` fields. Raises ConfigError naming the field for unknown sections and fields,
    a bad task and values a typed config refuses; `validate` checks the rest.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: must be a mapping with sections {SECTIONS}, got {config!r}")
    for key in config:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; expected {', '.join(SECTIONS)}")
    task_cfg = _section(config, "task")
    if "name" not in task_cfg:
        raise ConfigError("task.name: required")
    name, kwargs = task_cfg.pop("name"), task_cfg.pop("kwargs", None) or {}
    if task_cfg:
        raise ConfigError(f"task.{next(iter(task_cfg))}: unknown field; known: name, kwargs")
    if not isinstance(name, str):
        raise ConfigError(f"task.name: must be a str; choose one of {tasks.names()}, got {name!r}")
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"task.kwargs: must be a mapping, got {kwargs!r}")
    task_options = TaskOptions(name=name, kwargs=dict(kwargs))
    task = _make_task(task_options)

    model_cfg = _section(config, "model")
    for key in ("vocab_size", "num_classes", "head", "max_len"):
        if key in model_cfg:
            raise ConfigError(f"model.{key}: set by the task, not configurable")
    for key, where in MOVED.items():
        if key in model_cfg:
            raise ConfigError(f"model.{key}: unknown field; it is now {where}")
    kernel_cfg = _section(config, "kernel")
    try:
        model = _build(
            models.ModelOptions,
            "model",
            model_cfg,
            vocab_size=task.vocab_size,
            num_classes=task.num_classes,
            head=task.label_kind,
            max_len=task.length,
        )
        kernel = _build(
            KernelOptions,
            "kernel",
            {
                **kernel_cfg,
                **{
                    name: models.typed_config(cls, kernel_cfg[name], f"kernel.{name}")
                    for name, cls in (("blocked", BlockedConfig), ("pallas", PallasConfig))
                    if name in kernel_cfg
                },
            },
        )
        optim = _build(OptimOptions, "optim", _section(config, "optim"))
        train = _build(TrainOptions, "train", _section(config, "train"))
    except TypeError as e:
        raise ConfigError(f"config: {e}") from e
    except ValueError as e:  # a typed config's own check, already naming the field
        raise ConfigError(str(e)) from e
    return Options(task=task_options, model=model, kernel=kernel, optim=optim, train=train)


def _make_task(task_options: TaskOptions):
    try:
        return tasks.make(task_options.name, **task_options.kwargs)
    except ValueError as e:
        field = "task.name" if task_options.name not in tasks.REGISTRY else "task.kwargs"
        raise ConfigError(f"{field}: {e}") from e


def _check_number(field: str, value, low: float, high: float, closed=(True, True)) -> None:
    """`value` must be a finite real number within `[low, high]` (ends open per `closed`)."""
    ok = models.is_real(value) and math.isfinite(value)
    ok = ok and (low <= value if closed[0] else low < value)
    ok = ok and (value <= high if closed[1] else value < high)
    if not ok:
        interval = f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"
        raise ConfigError(f"{field}: must be a finite number in {interval}, got {value!r}")


def validate(options: Options, num_devices: int | None = None) -> None:
    """Checks every option before anything compiles; raises ConfigError naming the field.

    Allowed values (model fields: `models.validate`; task: any registered task and its
    constructor's arguments):
    - optim.learning_rate: a finite number in (0, 10]. optim.warmup_steps: an int >= 0.
      optim.end_lr_fraction: a number in [0, 1]. optim.b1, optim.b2: numbers in [0, 1).
      optim.weight_decay: a finite number >= 0 with learning_rate·weight_decay < 1 (the
      fraction of each weight decayed per step). optim.grad_clip: a finite number >= 0 (0: off).
    - train.seed: an int in [0, 2^31 - 2] (parameters, dropout (seed + 1 as int32), batches);
      train.eval_seed: an int >= 0. train.batch_size, num_steps, log_every, eval_every,
      checkpoint_every, keep_checkpoints, eval_size, eval_batch_size, sequence_shards:
      positive ints; eval_size a multiple of eval_batch_size, and the held-out set must leave
      inputs to train on (training batches exclude its examples). train.num_devices: None (all)
      or an int in [1, available devices]; sequence_shards must divide the devices and the
      task length, and the model's tensor layers must be non-causal when it is above 1;
      batch_size and eval_batch_size must divide over the data-parallel devices.
    - kernel.implementation: None (the best exact kernel for each call), "reference",
      "blocked" or "pallas", and it must run the model's tensor layers here (e.g. "pallas"
      needs a GPU, or kernel.pallas.interpret=True). kernel.blocked, kernel.pallas: the
      `BlockedConfig` / `PallasConfig` fields (checked by the classes), left at their defaults
      unless that implementation is chosen.
    """
    try:
        models.validate(options.model)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _check_kernel_options(options.kernel)
    task = _make_task(options.task)
    o, t = options.optim, options.train
    _check_number("optim.learning_rate", o.learning_rate, 0.0, MAX_LEARNING_RATE, (False, True))
    if not models.is_int(o.warmup_steps) or o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must be an int >= 0, got {o.warmup_steps!r}")
    _check_number("optim.end_lr_fraction", o.end_lr_fraction, 0.0, 1.0)
    _check_number("optim.b1", o.b1, 0.0, 1.0, (True, False))
    _check_number("optim.b2", o.b2, 0.0, 1.0, (True, False))
    _check_number("optim.weight_decay", o.weight_decay, 0.0, math.inf, (True, False))
    if o.learning_rate * o.weight_decay >= 1:
        raise ConfigError(
            f"optim.weight_decay: learning_rate·weight_decay = "
            f"{o.learning_rate * o.weight_decay:g} must be < 1 (each step would decay the "
            "weights past zero)"
        )
    _check_number("optim.grad_clip", o.grad_clip, 0.0, math.inf, (True, False))
    if not models.is_int(t.seed) or not 0 <= t.seed <= MAX_SEED:
        raise ConfigError(f"train.seed: must be an int in [0, {MAX_SEED}], got {t.seed!r}")
    if not models.is_int(t.eval_seed) or t.eval_seed < 0:
        raise ConfigError(f"train.eval_seed: must be an int >= 0, got {t.eval_seed!r}")
    for name in (
        "batch_size",
        "num_steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_size",
        "eval_batch_size",
        "sequence_shards",
    ):
        value = getattr(t, name)
        if not models.is_int(value) or value < 1:
            raise ConfigError(f"train.{name}: must be a positive int, got {value!r}")
    m = options.model
    tensor_layers = any(kind != "standard" for kind in m.attention_kinds)
    if t.sequence_shards > 1 and tensor_layers and (m.causal or m.window is not None):
        raise ConfigError(
            f"train.sequence_shards: {t.sequence_shards} shards the queries of tensor layers, "
            "which supports only non-causal attention (model.causal, model.window)"
        )
    if t.eval_size % t.eval_batch_size:
        raise ConfigError(
            f"train.eval_size: {t.eval_size} is not a multiple of eval_batch_size "
            f"{t.eval_batch_size}"
        )
    devices = jax.device_count() if num_devices is None else num_devices
    if t.num_devices is not None:
        if not models.is_int(t.num_devices) or not 1 <= t.num_devices <= devices:
            raise ConfigError(
                f"train.num_devices: must be None or an int in [1, {devices}], got "
                f"{t.num_devices!r}"
            )
        devices = t.num_devices
    if devices % t.sequence_shards:
        raise ConfigError(
            f"train.sequence_shards: {t.sequence_shards} does not divide {devices} devices"
        )
    data = devices // t.sequence_shards
    for name in ("batch_size", "eval_batch_size"):
        if getattr(t, name) % data:
            raise ConfigError(
                f"train.{name}: {getattr(t, name)} is not divisible by the {data} data-parallel "
                "devices"
            )
    if t.sequence_shards > 1 and task.length % t.sequence_shards:
        raise ConfigError(
            f"train.sequence_shards: sequence length {task.length} is not divisible by "
            f"{t.sequence_shards}"
        )
    _check_kernels_run(options, task.length // t.sequence_shards)
    try:  # a held-out set covering the task's inputs leaves nothing to train on
        held_out = tasks.held_out_keys(tasks.eval_set(task, t.eval_seed, t.eval_size))
        tasks.train_batch(task, t.seed, 1, t.batch_size, held_out)
    except ValueError as e:
        raise ConfigError(f"train.eval_size: {e}") from e


def _check_kernel_options(k: KernelOptions) -> None:
    if k.implementation is not None and k.implementation not in EXACT:
        hint = (
            "; polynomial attention is an architecture: set model.attention='polynomial'"
            if k.implementation == "polynomial"
            else ""
        )
        raise ConfigError(
            f"kernel.implementation: unknown exact kernel {k.implementation!r}; choose None "
            f"(the best one for each call) or one of {EXACT}{hint}"
        )
    for name, cls in (("blocked", BlockedConfig), ("pallas", PallasConfig)):
        config = getattr(k, name)
        if not isinstance(config, cls):
            raise ConfigError(f"kernel.{name}: must be a {cls.__name__}, got {config!r}")
        if name != k.implementation and config != cls():
            field = next(
                f.name for f in dataclasses.fields(cls) if getattr(config, f.name) != f.default
            )
            raise ConfigError(
                f"kernel.{name}.{field}: set, but kernel.implementation is "
                f"{k.implementation!r}; these tiles apply to implementation={name!r} only"
            )


def _check_kernels_run(options: Options, query_length: int) -> None:
    """Traces (does not compile) one call of each attention kernel the model runs, at its
    shapes and scale (a learned one is an array): a kernel that refuses them (e.g. "pallas"
    without a GPU, a polynomial `bound` with a learned scale) refuses here, from the code that
    would run it, as a ConfigError naming kernel.implementation or model.polynomial."""
    m = options.model
    head_dim = m.head_dim or m.width // m.num_heads
    kv = m.num_kv_heads or m.num_heads
    dtype = jnp.dtype(m.dtype or jnp.float32)
    q = jax.ShapeDtypeStruct((1, query_length, m.num_heads, head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, m.max_len, kv, head_dim), dtype)
    scale = m.scale if m.scale is not None else head_dim**-0.5
    kinds = set(m.attention_kinds)
    checks = []
    if "tensor" in kinds and options.kernel.implementation is not None:
        checks.append(("kernel.implementation", options.kernel.kernel()))
    if "polynomial" in kinds:
        checks.append(("model.polynomial", layers.Kernel("polynomial", m.polynomial)))
    for field, kernel in checks:

        def call(q, k, scale, kernel=kernel):
            return kernel(q, k, k, k, k, causal=m.causal, window=m.window, scale=scale)

        try:
            if m.learn_scale:
                jax.eval_shape(call, q, k, jax.ShapeDtypeStruct((m.num_heads,), jnp.float32))
            else:
                jax.eval_shape(lambda q, k, call=call: call(q, k, scale), q, k)
        except ValueError as e:
            named = re.match(r"PolynomialConfig\.(\w+)", str(e))
            if field == "kernel.implementation":
                field = f"{field}: {options.kernel.implementation!r} does not run"
            else:
                field = f"{field}.{named.group(1)}" if named else field
                field += ": the polynomial kernel does not run"
            raise ConfigError(
                f"{field} this model's layers on the {jax.default_backend()!r} backend: {e}"
            ) from e


# ---------------------------------------------------------------------------------------------
# Model, optimizer, steps


def _schedule(o: OptimOptions, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine decay to `end_lr_fraction`, over `num_steps`."""
    warmup = min(o.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0,
        o.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=o.learning_rate * o.end_lr_fraction,
    )


def make_optimizer(o: OptimOptions, num_steps: int) -> optax.GradientTransformation:
    """AdamW, linear warm-up then cosine decay; no weight decay on biases, norms, scales."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(
        _schedule(o, num_steps), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask
    )
    if o.grad_clip:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw


def learning_rate_at(o: OptimOptions, num_steps: int, step: int) -> float:
    """The learning rate training step `step` (1-based) applies: optax evaluates the schedule
    at the count of updates before it, `step - 1`."""
    return float(_schedule(o, num_steps)(max(step - 1, 0)))


def masked_metrics(logits, labels, mask) -> dict[str, jax.Array]:
    """Mean cross-entropy and accuracy over the entries where `mask` is True."""
    w = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)
    return {"loss": (ce * w).sum() / count, "accuracy": (correct * w).sum() / count}


def make_model(options: Options) -> models.Classifier:
    """The model of `options`: its architecture, its tensor layers on the chosen exact kernel,
    their queries sharded over the mesh's `seq` axis when train.sequence_shards > 1."""
    shard = sharding.shard_queries if options.train.sequence_shards > 1 else None
    return models.Classifier(options.model, kernel=options.kernel.kernel(), wrap_attend=shard)


def create_state(options: Options, seed: int, init_batch: int = 1) -> train_state.TrainState:
    """Fresh parameters and optimizer state; `init_batch` must divide over the `data` axis
    (and, with sequence sharding, run under the mesh of `sharding.make_mesh`)."""
    model = make_model(options)
    task = tasks.make(options.task.name, **options.task.kwargs)
    dummy = jnp.zeros((init_batch, task.length), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(seed), dummy)["params"]
    tx = make_optimizer(options.optim, options.train.num_steps)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@functools.partial(jax.jit, donate_argnums=0)
def _train_step(state: train_state.TrainState, batch: dict[str, jax.Array], seed: jax.Array):
    # Module-level jit: runs with equal options share one compilation.
    dropout_key = jax.random.fold_in(jax.random.key(seed + 1), state.step)

    def loss_fn(params):
        logits = state.apply_fn(
            {"params": params},
            batch["inputs"],
            deterministic=False,
            rngs={"dropout": dropout_key},
        )
        metrics = masked_metrics(logits, batch["labels"], batch["mask"])
        return metrics["loss"], metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), metrics


def make_train_step(seed: int):
    """`step(state, batch) -> (state, metrics)`, jitted, donating `state`."""
    seed_array = np.int32(seed)
    return lambda state, batch: _train_step(state, batch, seed_array)


@jax.jit
def _eval_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
    logits = state.apply_fn({"params": state.params}, batch["inputs"], deterministic=True)
    w = batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["labels"]
    )
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return {"loss_sum": (ce * w).sum(), "correct": (correct * w).sum(), "count": w.sum()}


# ---------------------------------------------------------------------------------------------
# Data placement


def _to_global(batch: tasks.Batch, data_sharding) -> dict[str, jax.Array]:
    """Every process draws the global batch; each places its own slice (multi-host ready)."""
    n, pid = jax.process_count(), jax.process_index()

    def place(x: np.ndarray):
        local = x.shape[0] // n
        return jax.make_array_from_process_local_data(
            data_sharding, x[pid * local : (pid + 1) * local], x.shape
        )

    return {"inputs": place(batch.inputs), "labels": place(batch.labels), "mask": place(batch.mask)}


def evaluate(state, eval_data: tasks.Batch, batch_size: int, data_sharding) -> dict[str, float]:
    total = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, eval_data.inputs.shape[0], batch_size):
        part = tasks.Batch(*(x[start : start + batch_size] for x in dataclasses.astuple(eval_data)))
        out = jax.device_get(_eval_step(state, _to_global(part, data_sharding)))
        for k in total:
            total[k] += float(out[k])
    return {
        "eval/loss": total["loss_sum"] / max(total["count"], 1.0),
        "eval/accuracy": total["correct"] / max(total["count"], 1.0),
    }


# ---------------------------------------------------------------------------------------------
# Metrics files


class MetricsWriter:
    """`metrics.jsonl` (append-only, one fsynced line per record) plus TensorBoard events;
    a no-op on processes other than 0."""

    def __init__(self, workdir: str, resume_step: int | None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        # Records past the checkpoint we resume from (all of them on a fresh start) will be
        # written again: drop them, and a torn last line, in one atomic rewrite.
        if os.path.exists(self.path):
            records = read_metrics(workdir)
            kept = [] if resume_step is None else [r for r in records if r["step"] <= resume_step]
            dropped = len(records) - len(kept)
            if dropped:
                log.info("dropping %d metrics records past step %s", dropped, resume_step or 0)
            workdir_files.rewrite_jsonl(self.path, kept)
        from tensorboardX import SummaryWriter

        # The same for TensorBoard: its events from the first step written again on are hidden.
        purge_step = 0 if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        workdir_files.append_jsonl(self.path, {"step": int(step), **values})
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `DIR/metrics.jsonl`; a torn last line (a kill mid-write) is dropped
    with a warning naming the file and line."""
    records = workdir_files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    for number, r in enumerate(records, start=1):
        if not isinstance(r.get("step"), int):
            raise workdir_files.CorruptFileError(
                f"{os.path.join(workdir, 'metrics.jsonl')} record {number}: no integer 'step'"
            )
    return records


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(options: Options | Mapping[str, Any], workdir: str) -> dict[str, Any]:
    """Trains (or resumes) in `workdir`; returns the final evaluation metrics.

    Raises ConfigError for bad options (before any compilation), WorkdirError for a workdir
    that cannot be a folder, WorkdirLockedError when another process holds `workdir`,
    NonFiniteLossError when the loss, gradient norm, eval loss or parameters become NaN/inf
    (nothing non-finite is saved), CheckpointError when a checkpoint cannot be written (or
    holds a state of another structure) and TrainingInterrupted after SIGTERM or SIGINT (the
    current step saved). Resumes from the newest checkpoint that restores.
    """
    if not isinstance(options, Options):
        options = options_from_dict(options)
    validate(options)
    workdir = workdir_files.make_workdir(workdir)
    lock = workdir_files.lock(workdir) if jax.process_index() == 0 else None
    try:
        return _train_locked(options, workdir)
    finally:
        if lock is not None:
            lock.release()


class _Signals:
    """While active (main thread only), SIGTERM and SIGINT set `received` instead of stopping
    the process, so the loop can save the current step; a second one acts as usual."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self._restore()
        log.warning(
            "%s received: saving the current step, then stopping (send it again to stop at once)",
            self.received,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


class _Pending:
    """Per-step train metrics since the last train record. `check` (at evals) looks for
    NaN/inf without consuming them; `take_means` (a log or a checkpoint save) does."""

    def __init__(self):
        self.items: list[tuple[int, dict]] = []
        self._checked = 0

    def add(self, step: int, metrics: dict) -> None:
        self.items.append((step, metrics))

    def check(self, stopping: str) -> None:
        """Raises NonFiniteLossError at the first step with a NaN/inf loss or gradient norm."""
        fresh = jax.device_get(self.items[self._checked :])
        self.items[self._checked :] = fresh
        self._checked = len(self.items)
        for step, m in fresh:
            loss, norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise NonFiniteLossError(
                    f"non-finite loss {loss} / grad norm {norm} at step {step}; {stopping}"
                )

    def take_means(self, stopping: str) -> dict[str, float]:
        """The mean of each train metric over the pending steps, which are then cleared."""
        self.check(stopping)
        means = {
            f"train/{k}": float(np.mean([float(m[k]) for _, m in self.items]))
            for k in ("loss", "accuracy", "grad_norm")
        }
        self.items, self._checked = [], 0
        return means


@dataclasses.dataclass
class _Run:
    """One training run's moving parts; `log`, `eval`, `save` and `interrupt` at a step."""

    options: Options
    state: Any
    writer: MetricsWriter
    checkpoints: Checkpoints
    evaluate: Any  # state -> {"eval/loss", "eval/accuracy"}
    majority: float
    last_good: int | None
    start: int
    t0: float = dataclasses.field(default_factory=time.time)
    pending: _Pending = dataclasses.field(default_factory=_Pending)

    def stopping(self) -> str:
        if self.last_good is None:
            return "stopping. No checkpoint was saved before it, so there is none to resume from"
        return (
            f"stopping. The last good checkpoint is step {self.last_good} in "
            f"{self.checkpoints.directory}"
        )

    def log(self, step: int) -> None:
        num_steps = self.options.train.num_steps
        mean = self.pending.take_means(self.stopping())
        rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
        mean["train/learning_rate"] = learning_rate_at(self.options.optim, num_steps, step)
        mean["steps_per_sec"] = rate
        self.writer.write(step, mean)
        log.info(
            "step %d/%d | loss %.4f acc %.4f | %.1f steps/s | ETA %s",
            step,
            num_steps,
            mean["train/loss"],
            mean["train/accuracy"],
            rate,
            _fmt_time((num_steps - step) / max(rate, 1e-9)),
        )

    def eval(self, step: int) -> dict[str, Any]:
        self.pending.check(self.stopping())
        metrics = {**self.evaluate(self.state), "eval/majority": self.majority}
        if not math.isfinite(metrics["eval/loss"]):
            raise NonFiniteLossError(
                f"non-finite eval loss {metrics['eval/loss']} at step {step} (the parameters "
                f"hold NaN/inf); {self.stopping()}"
            )
        self.writer.write(step, metrics)
        log.info(
            "eval step %d: loss %.4f accuracy %.4f (majority %.4f)",
            step,
            metrics["eval/loss"],
            metrics["eval/accuracy"],
            self.majority,
        )
        return {"step": step, **metrics}

    def save(self, step: int) -> None:
        """Writes the pending steps' train mean (so a resume from this step loses none), then
        the checkpoint."""
        if self.pending.items:
            self.log(step)
        if not checkpoints_lib.all_finite(self.state):
            raise NonFiniteLossError(
                f"parameters or optimizer state became NaN/inf by step {step}; nothing saved, "
                f"{self.stopping()}"
            )
        self.checkpoints.save(step, self.state)
        self.last_good = step

    def interrupt(self, step: int, received: str) -> None:
        """Saves `step` with its pending metrics (unless just saved) and raises
        TrainingInterrupted."""
        if self.last_good != step:
            self.save(step)
        total = self.options.train.num_steps
        then = "the run is complete" if step == total else "run the same command to resume"
        raise TrainingInterrupted(
            f"{received} at step {step} of {total}; saved checkpoint step {step} in "
            f"{self.checkpoints.directory}; {then}"
        )


def _train_locked(options: Options, workdir: str) -> dict[str, Any]:
    t = options.train
    task = tasks.make(options.task.name, **options.task.kwargs)
    mesh = sharding.make_mesh(t.sequence_shards, jax.devices()[: t.num_devices])
    data_sharding = sharding.batch_sharded(mesh)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
    try:
        if jax.process_index() == 0:
            _check_config(options, task, workdir, has_checkpoints=bool(checkpoints.steps()))
        with jax.set_mesh(mesh):
            return _train_in_mesh(options, workdir, task, mesh, data_sharding, checkpoints)
    finally:
        checkpoints.close()


def _train_in_mesh(options, workdir, task, mesh, data_sharding, checkpoints) -> dict[str, Any]:
    t = options.train
    state = create_state(options, t.seed, sharding.data_parallel_size(mesh))
    state = jax.device_put(state, sharding.replicated(mesh))
    num_params = models.count_params(state.params)
    latest, state = checkpoints.restore_latest(state)
    start = 0 if latest is None else int(state.step)
    if latest is not None and start >= t.num_steps:
        log.info(
            "run in %s is complete (step %d of %d); nothing to train (its config.json is kept)",
            workdir,
            start,
            t.num_steps,
        )
        evals = [r for r in read_metrics(workdir) if "eval/accuracy" in r]
        return {**(evals[-1] if evals else {"step": start}), "complete": True}
    if jax.process_index() == 0:  # only now: a config the checkpoints refuse is not kept,
        _write_config(options, task, workdir)  # nor one that trains nothing
    if latest is not None:
        log.info("resuming from checkpoint step %d in %s", start, workdir)
    writer = MetricsWriter(workdir, latest)
    try:
        eval_data = tasks.eval_set(task, t.eval_seed, t.eval_size)
        majority = tasks.majority_baseline(eval_data.labels, eval_data.mask, task.num_classes)
        log.info(
            "task %s (length %d, vocab %d), model %s: %d parameters, %d devices (mesh %s)",
            task.name,
            task.length,
            task.vocab_size,
            options.model.attention_kinds,
            num_params,
            mesh.size,
            dict(mesh.shape),
        )
        if start == 0:
            writer.write(0, {"num_params": num_params, "eval/majority": majority})
        run = _Run(
            options=options,
            state=state,
            writer=writer,
            checkpoints=checkpoints,
            evaluate=lambda s: evaluate(s, eval_data, t.eval_batch_size, data_sharding),
            majority=majority,
            last_good=latest,
            start=start,
        )
        return _loop(run, task, tasks.held_out_keys(eval_data), data_sharding)
    finally:
        writer.close()


def _loop(run: _Run, task, held_out: frozenset, data_sharding) -> dict[str, Any]:
    """Steps `run.start + 1 .. num_steps`: logs, evals and saves on schedule; saves the
    current step and stops on SIGTERM/SIGINT."""
    t = run.options.train
    train_step = make_train_step(t.seed)
    final = None
    with _Signals() as signals:
        for step in range(run.start + 1, t.num_steps + 1):
            batch = tasks.train_batch(task, t.seed, step, t.batch_size, held_out)
            batch = _to_global(batch, data_sharding)
            run.state, metrics = train_step(run.state, batch)
            run.pending.add(step, metrics)
            last = step == t.num_steps
            if step % t.log_every == 0 or last:
                run.log(step)
            if step % t.eval_every == 0 or last:
                final = run.eval(step)
            if step % t.checkpoint_every == 0 or last:
                run.save(step)
            if signals.received:  # at the last step too: a caller running several stops
                run.interrupt(step, signals.received)
    return final


def _changed_fields(old, new, prefix="") -> list[str]:
    """Dotted names of the fields that differ between two nested dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix.rstrip(".")]
    out = []
    for key in sorted(set(old) | set(new)):
        out += _changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")
    return out


def _lookup(config, dotted: str):
    for part in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(part)
    return config


def _changes(old: dict, new: dict, fields: list[str]) -> str:
    return ", ".join(f"{c} {_lookup(old, c)!r} -> {_lookup(new, c)!r}" for c in fields)


def _identity(config: Mapping[str, Any]) -> dict:
    """What a workdir's checkpoints belong to: the task, its examples' format and the model
    architecture."""
    return {
        "task": config.get("task"),
        "task_format": config.get("task_format"),
        "model": models.identity(config.get("model")),
    }


# Train options that change how a run is carried out, not the metrics it ends with (the final
# evaluation runs at `num_steps` whatever `eval_every` is).
TRAIN_RUN_OPTIONS = (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_batch_size",
    "sequence_shards",
    "num_devices",
)


# Raised when a change to the code (not the config) changes what a run ends with, so that
# fingerprinted results made before it are not reused: 1 until 2026-12-07, 2 from learned
# positions starting at the token embeddings' scale (std 1/sqrt(width), was 0.02).
RESULTS_VERSION = 2


def run_fingerprint(options: Options | Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over what a finished run's metrics depend on: the task, its
    examples' format (`Task.format_version`), the model's identity, the optimizer, the train
    options but `TRAIN_RUN_OPTIONS` (the kernel is a run option) and the code's
    `RESULTS_VERSION`. Fields left out of a dict count at their defaults. Equal fingerprints,
    equal runs; any other change to those fields gives another fingerprint."""
    if not isinstance(options, Options):
        options = options_from_dict(options)
    config = _config_json(options, _make_task(options.task))
    train = {k: v for k, v in config["train"].items() if k not in TRAIN_RUN_OPTIONS}
    what = {**_identity(config), "optim": config["optim"], "train": train}
    what["results_version"] = RESULTS_VERSION
    text = json.dumps(what, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _config_json(options: Options, task: tasks.Task) -> dict:
    """The whole config, and the format of the task's examples (`Task.format_version`)."""
    return {**models.json_ready(options.to_dict()), "task_format": task.format_version}


def _check_config(options: Options, task: tasks.Task, workdir: str, has_checkpoints: bool) -> None:
    """Compares the options with `DIR/config.json`. A workdir that already holds checkpoints
    of another task, task format (`Task.format_version`) or model architecture is refused
    (resuming it would restore, or report complete, the wrong run); other changes (the
    kernel, sequence sharding, device count, optimizer, steps) resume, logging one line with
    what changed. Without checkpoints (e.g. a run that failed at start) the new config will
    simply replace the old one."""
    path = os.path.join(workdir, "config.json")
    new = _config_json(options, task)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError as e:
            if has_checkpoints:
                raise workdir_files.CorruptFileError(
                    f"{path}: not JSON ({e}); cannot tell which run the checkpoints belong to"
                ) from e
            old = {}
        if not isinstance(old, dict):
            old = {}
        old.setdefault("task_format", 1)  # written before formats were versioned
        old_id, new_id = _identity(old), _identity(new)
        fixed = _changed_fields(old_id, new_id)
        if fixed and has_checkpoints:
            raise ConfigError(
                f"{fixed[0]}: {workdir} holds a run with a different task/model "
                f"({_changes(old_id, new_id, fixed)}); use a new --workdir"
            )
        if has_checkpoints:
            _refuse_optimizer_change(old.get("optim"), new["optim"], workdir)
        changed = _changed_fields(old, new)
        if changed:
            verb = "resuming with" if has_checkpoints else "overwriting it with"
            log.warning("config differs from %s; %s %s", path, verb, _changes(old, new, changed))


def _write_config(options: Options, task: tasks.Task, workdir: str) -> None:
    """Saves config.json (the whole config, atomically), once the checkpoints restored into
    it: a config they refuse (a missing config.json, then another width) is never kept."""
    config = _config_json(options, task)
    text = workdir_files.dumps_json(config, indent=2, sort_keys=True, default=str)
    workdir_files.write_atomic(os.path.join(workdir, "config.json"), text)


def _optimizer_structure(optim: Mapping[str, Any]):
    """The tree structure of the optimizer state under config section `optim` (None if it
    does not build): it changes when an option adds or removes a transform."""
    try:
        o = _build(OptimOptions, "optim", optim)
        params = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
        return jax.tree_util.tree_structure(jax.eval_shape(make_optimizer(o, 2).init, params))
    except (TypeError, ValueError):
        return None


def _refuse_optimizer_change(old: Any, new: Mapping[str, Any], workdir: str) -> None:
    """Raises ConfigError naming the optim fields that changed when they change the optimizer
    state's structure (a checkpoint of the old one cannot be restored into the new one)."""
    if not isinstance(old, dict):
        return
    before = _optimizer_structure(old)
    if before is None or before == _optimizer_structure(new):
        return
    changed = _changed_fields(old, new)
    what = ", ".join(f"optim.{c} {_lookup(old, c)!r} -> {_lookup(new, c)!r}" for c in changed)
    raise ConfigError(
        f"{what} changes the optimizer state's structure, and {workdir} holds checkpoints of "
        "the old one; resume with the old value or use a new --workdir"
    )
