"""Every config error is caught before anything compiles, naming the dotted field
(`training.options_from_dict` + `training.validate`, `models.validate`, the command line)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import common, match3
from tensorattn import models, training
from tensorattn.kernels.configs import BlockedConfig, PallasConfig, PolynomialConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(arg="smoke", **overrides):
    """match3's config (`arg`) as a dict; `section__field=value` (or
    `section__field__key=value`) overrides it."""
    c = match3.get_config(arg).to_dict()
    for dotted, value in overrides.items():
        *path, last = dotted.split("__")
        node = c
        for part in path:
            node = node[part]
        node[last] = value
    return c


def check(c):
    training.validate(training.options_from_dict(c))


POLY = "attention=polynomial,smoke"

# (config arg, overrides, field named in the error). The first block is issue 12, item 9.
BAD = [
    ("smoke", dict(model__head_dim=0), "model.head_dim"),
    ("smoke", dict(model__head_dim=-4), "model.head_dim"),
    ("smoke", dict(model__fourier_frequencies=0), "model.fourier_frequencies"),
    ("smoke", dict(kernel__implementation="flash"), "kernel.implementation"),
    (POLY, dict(model__polynomial__degree=-1), "model.polynomial.degree"),
    ("smoke", dict(model__causal=True, model__window=(-1, 2)), "model.window"),
    ("smoke", dict(train__seed=-1), "train.seed"),
    ("smoke", dict(optim__b1=2.0), "optim.b1"),
    ("smoke", dict(optim__learning_rate=1e39), "optim.learning_rate"),
    # Types: a string (or bool, or float) where another type is expected.
    ("smoke", dict(model__width="16"), "model.width"),
    ("smoke", dict(model__head_dim="8"), "model.head_dim"),
    ("smoke", dict(model__num_layers="2"), "model.num_layers"),
    ("smoke", dict(model__tensor_every=True), "model.tensor_every"),
    ("smoke", dict(model__causal="yes"), "model.causal"),
    ("smoke", dict(model__learn_scale=1), "model.learn_scale"),
    ("smoke", dict(model__dropout_rate="0.1"), "model.dropout_rate"),
    ("smoke", dict(model__polynomial="degree=4"), "model.polynomial"),
    ("smoke", dict(kernel__blocked="block_q=4"), "kernel.blocked"),
    ("smoke", dict(kernel__pallas__interpret="yes"), "kernel.pallas.interpret"),
    ("smoke", dict(kernel__blocked__block_q=8.0), "kernel.blocked.block_q"),
    ("smoke", dict(train__batch_size="16"), "train.batch_size"),
    ("smoke", dict(train__num_steps=20.0), "train.num_steps"),
    ("smoke", dict(train__seed="0"), "train.seed"),
    ("smoke", dict(optim__learning_rate="1e-3"), "optim.learning_rate"),
    ("smoke", dict(optim__grad_clip=None), "optim.grad_clip"),
    # Ranges: model.
    ("smoke", dict(model__num_kv_heads=0), "model.num_kv_heads"),
    ("smoke", dict(model__mlp_dim=-1), "model.mlp_dim"),
    ("smoke", dict(model__dropout_rate=1.0), "model.dropout_rate"),
    ("smoke", dict(model__fourier_frequencies=27), "model.fourier_frequencies"),
    ("smoke", dict(model__entry_bound=0.0), "model.entry_bound"),
    ("smoke", dict(model__entry_bound=float("nan")), "model.entry_bound"),
    ("smoke", dict(model__scale=float("inf")), "model.scale"),
    ("smoke", dict(model__window=(2, 2)), "model.window"),  # not causal
    ("smoke", dict(model__causal=True, model__window=5), "model.window"),
    ("smoke", dict(model__causal=True, model__window=(2, 2, 2)), "model.window"),
    ("smoke", dict(model__causal=True, model__window=(True, 2)), "model.window"),
    (
        "attention=standard,smoke",
        dict(model__causal=True, model__window=(None, 2)),
        "model.window",
    ),
    ("smoke", dict(model__embedding="onehot"), "model.embedding"),
    ("smoke", dict(model__pool="max"), "model.pool"),
    ("smoke", dict(model__positional="sinusoid"), "model.positional"),
    ("smoke", dict(model__dtype="float8_e4m3fn"), "model.dtype"),
    ("smoke", dict(model__dtype="int32"), "model.dtype"),
    ("smoke", dict(model__tensor_every=0), "model.tensor_every"),
    # Former model fields: named, with where they went.
    ("smoke", dict(model__attention_kinds=("tensor",)), "model.attention_kinds"),
    ("smoke", dict(model__sequence_axis="seq"), "model.sequence_axis"),
    ("smoke", dict(model__implementation="blocked"), "model.implementation"),
    ("smoke", dict(model__attention_options={}), "model.attention_options"),
    # Kernel run options (config.kernel).
    ("smoke", dict(kernel__implementation="polynomial"), "kernel.implementation"),
    ("smoke", dict(kernel__implementation=3), "kernel.implementation"),
    ("smoke", dict(kernel__colour=1), "kernel.colour"),
    ("smoke", dict(kernel__blocked={"q": 8}), "kernel.blocked.q"),
    ("smoke", dict(kernel__blocked__block_q=0), "kernel.blocked.block_q"),
    ("smoke", dict(kernel__blocked__block_inner=-1), "kernel.blocked.block_inner"),
    ("smoke", dict(kernel__pallas__fwd_block_rows=0), "kernel.pallas.fwd_block_rows"),
    ("smoke", dict(kernel__pallas__num_warps="4"), "kernel.pallas.num_warps"),
    ("smoke", dict(kernel__pallas={"block_k1": 16}), "kernel.pallas.block_k1"),
    (  # tiles of an implementation that is not chosen
        "smoke",
        dict(kernel__implementation="reference", kernel__blocked__block_q=8),
        "kernel.blocked.block_q",
    ),
    ("smoke", dict(kernel__pallas__bwd_block_k1=16), "kernel.pallas.bwd_block_k1"),
    # Polynomial layers (model.polynomial).
    ("smoke", dict(model__polynomial__degree=4), "model.polynomial.degree"),  # not polynomial
    (POLY, dict(model__polynomial__degree=41), "model.polynomial.degree"),
    (POLY, dict(model__polynomial__degree=4.0), "model.polynomial.degree"),
    (POLY, dict(model__polynomial__degree="4"), "model.polynomial.degree"),
    (
        POLY,
        dict(model__head_dim=128, model__polynomial__degree=4),
        "model.polynomial.degree",  # feature rank C(132, 4) > 2^20
    ),
    (POLY, dict(model__head_dim=128), "model.polynomial.degree"),  # the default degree 4
    (POLY, dict(model__polynomial__polynomial="legendre"), "model.polynomial.polynomial"),
    (POLY, dict(model__polynomial__polynomial="chebyshev"), "model.polynomial.polynomial"),
    (POLY, dict(model__polynomial__gradient="exact"), "model.polynomial.gradient"),
    (POLY, dict(model__polynomial__on_uncertified="raise"), "model.polynomial.on_uncertified"),
    (POLY, dict(model__polynomial__bound=-1.0), "model.polynomial.bound"),
    (POLY, dict(model__polynomial__score_range=0), "model.polynomial.score_range"),
    (POLY, dict(model__polynomial__tolerance=1.0), "model.polynomial.tolerance"),
    (POLY, dict(model__polynomial__chunk_size=0), "model.polynomial.chunk_size"),
    (POLY, dict(model__polynomial={"block_k1": 8}), "model.polynomial.block_k1"),
    (POLY, dict(model__polynomial__block_q=64), "model.polynomial.block_q"),  # fused only
    (POLY, dict(model__polynomial={"fused": True, "block_q": 48}), "model.polynomial.block_q"),
    (
        POLY,
        dict(model__polynomial={"tolerance": 1e-3}),  # no degree, no bound to pick one
        "model.polynomial.tolerance",
    ),
    (
        POLY,
        dict(model__polynomial={"tolerance": 1e-9, "score_range": 200.0}),
        "model.polynomial.tolerance",  # no degree <= 40 reaches it
    ),
    (
        POLY,
        dict(model__head_dim=64, model__polynomial={"tolerance": 1e-6, "score_range": 8.0}),
        "model.polynomial.tolerance",  # the degree it picks has too large a feature rank
    ),
    (  # a static score range from a learned (array) scale: refused by the kernel's own check
        POLY,
        dict(model__learn_scale=True, model__polynomial__bound=1.0),
        "model.polynomial.bound",
    ),
    # Sequence sharding needs global query positions for causal masks.
    ("smoke", dict(model__causal=True, train__sequence_shards=2), "train.sequence_shards"),
    # Ranges: optim and train.
    ("smoke", dict(optim__learning_rate=0.0), "optim.learning_rate"),
    ("smoke", dict(optim__learning_rate=11.0), "optim.learning_rate"),
    ("smoke", dict(optim__learning_rate=float("inf")), "optim.learning_rate"),
    ("smoke", dict(optim__learning_rate=float("nan")), "optim.learning_rate"),
    ("smoke", dict(optim__b1=-0.1), "optim.b1"),
    ("smoke", dict(optim__b2=1.0), "optim.b2"),
    ("smoke", dict(optim__warmup_steps=-1), "optim.warmup_steps"),
    ("smoke", dict(optim__end_lr_fraction=1.5), "optim.end_lr_fraction"),
    ("smoke", dict(optim__weight_decay=-0.1), "optim.weight_decay"),
    ("smoke", dict(optim__learning_rate=0.5, optim__weight_decay=2.0), "optim.weight_decay"),
    ("smoke", dict(optim__grad_clip=-1.0), "optim.grad_clip"),
    ("smoke", dict(train__seed=2**31), "train.seed"),
    ("smoke", dict(train__eval_seed=-1), "train.eval_seed"),
    ("smoke", dict(train__keep_checkpoints=0), "train.keep_checkpoints"),
    ("smoke", dict(train__log_every=True), "train.log_every"),
    ("smoke", dict(train__num_devices=0), "train.num_devices"),
    ("smoke", dict(train__sequence_shards=0), "train.sequence_shards"),
    # Sections and the task.
    ("smoke", dict(task__name=3), "task.name"),
    ("smoke", dict(task__kwargs=[10, 53]), "task.kwargs"),
    ("smoke", dict(task__kwargs={"length": 10, "colour": 1}), "task.kwargs"),
]


@pytest.mark.parametrize(
    "arg,overrides,field", BAD, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(BAD)]
)
def test_bad_value_names_the_field(arg, overrides, field):
    with pytest.raises(training.ConfigError, match="^" + field.replace(".", r"\.")):
        check(config(arg, **overrides))


def test_bad_section_names_it():
    c = config()
    c["optim"] = 0.1
    with pytest.raises(training.ConfigError, match=r"^optim: must be a mapping"):
        check(c)
    with pytest.raises(training.ConfigError, match=r"^config: must be a mapping"):
        check([("task", {})])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="pallas may run on an accelerator")
def test_pallas_where_it_cannot_run_is_a_config_error():
    with pytest.raises(training.ConfigError, match=r"^kernel\.implementation: 'pallas'"):
        check(config(kernel__implementation="pallas"))
    # Interpret mode runs anywhere.
    check(config(kernel__implementation="pallas", kernel__pallas__interpret=True))


@pytest.mark.parametrize(
    "arg,overrides",
    [
        ("smoke", {}),
        ("", {}),
        ("attention=standard,smoke", dict(model__causal=True, model__window=(4, 4))),
        (POLY, {}),
        (POLY, dict(model__polynomial={"tolerance": 1e-2, "score_range": 1.0})),
        (POLY, dict(model__polynomial={"polynomial": "chebyshev", "score_range": 4.0})),
        (POLY, dict(model__polynomial__on_uncertified="ignore", model__learn_scale=True)),
        ("attention=polynomial", {}),  # the full-size polynomial variant of match3
        ("smoke", dict(kernel__implementation="reference")),
        ("smoke", dict(kernel__implementation="blocked", kernel__blocked__block_q=8)),
        ("smoke", dict(model__learn_scale=True, kernel__implementation="blocked")),
        ("smoke", dict(model__causal=True, model__window=(None, 3))),
        ("smoke", dict(model__fourier_frequencies=26, model__dtype="bfloat16")),
        (
            "smoke",
            dict(optim__b1=0.0, optim__b2=0.999, optim__learning_rate=10, optim__grad_clip=0),
        ),
        ("smoke", dict(train__seed=2**31 - 2, train__eval_seed=2**40)),
    ],
)
def test_good_values_pass(arg, overrides):
    check(config(arg, **overrides))


def test_kernel_section_becomes_the_typed_configs():
    c = config(kernel__implementation="blocked")
    c["kernel"]["blocked"].update(block_q=8, block_inner=16)
    c["kernel"]["pallas"]["fwd_block_rows"] = None
    options = training.options_from_dict(c)
    training.validate(options)
    assert options.kernel.blocked == BlockedConfig(block_q=8, block_inner=16)
    assert options.kernel.pallas == PallasConfig()
    assert options.kernel.kernel().config == BlockedConfig(block_q=8, block_inner=16)
    hash(options.kernel.kernel())  # a jit static argument (through the model)
    saved = json.loads(json.dumps(options.to_dict(), default=str))
    assert saved["kernel"]["blocked"]["block_q"] == 8


def test_config_sections_carry_every_field_of_the_typed_configs():
    """`--config.kernel.pallas.X`, `--config.kernel.blocked.X`, `--config.model.polynomial.X`
    exist for every field X of the config classes, at its default."""
    c = match3.get_config("smoke")
    for section, cls in (
        (c.kernel.blocked, BlockedConfig),
        (c.kernel.pallas, PallasConfig),
        (c.model.polynomial, PolynomialConfig),
    ):
        assert section.to_dict() == cls().to_dict()
    assert isinstance(common.kernel_config(), type(c.kernel))


def test_models_validate_checks_options_built_directly():
    base = models.ModelOptions(vocab_size=11, width=16, num_heads=2)
    models.validate(base)
    for change, field in [
        (dict(head_dim=0), "model.head_dim"),
        (dict(attention="flash"), "model.attention"),
        (dict(polynomial=PolynomialConfig(degree=3)), "model.polynomial.degree"),
        (dict(attention="polynomial", polynomial=PolynomialConfig(degree=40)), "degree"),
        (dict(fourier_frequencies=6), "model.fourier_frequencies"),  # > 11 // 2
    ]:
        with pytest.raises(ValueError, match=field):
            models.validate(dataclasses.replace(base, **change))


@pytest.mark.parametrize(
    "args,field",
    [
        (["--config.model.head_dim=0"], "model.head_dim"),
        (["--config.model.causal=True", "--config.model.window=(-1,2)"], "model.window"),
        (["--config.kernel.pallas.fwd_block_rows=0"], "kernel.pallas.fwd_block_rows"),
        (["--config.model.polynomial.degree=-1"], "model.polynomial.degree"),
    ],
)
def test_command_line_exits_before_compiling(tmp_path, args, field):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/match3.py:smoke"]
        + [f"--workdir={workdir}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_LOG_COMPILES": "1"},
    )
    assert out.returncode != 0
    assert f"invalid config: {field}" in out.stderr, out.stderr[-2000:]
    assert "Compiling" not in out.stderr, out.stderr[-2000:]
    assert not workdir.exists()
