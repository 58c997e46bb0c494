"""The training loop end to end on the smoke config: artifacts, resume, completion, determinism,
non-finite losses, config validation and the command line."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import claims as claims_config
from configs import match3
from tensorattn import checkpoints, tasks, training, workdir
from tensorattn.kernels.configs import BlockedConfig, PolynomialConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
    config = match3.get_config("smoke").to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def records(workdir):
    """Metric records without wall-clock fields."""
    return [
        {k: v for k, v in r.items() if k != "steps_per_sec"} for r in training.read_metrics(workdir)
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    final = training.train_and_evaluate(smoke_config(), workdir)
    return workdir, final


def test_artifacts(finished):
    workdir, final = finished
    assert final["step"] == 20 and 0.0 <= final["eval/accuracy"] <= 1.0
    assert "eval/majority" in final
    recs = training.read_metrics(workdir)
    assert all("step" in r for r in recs)
    assert recs[0]["num_params"] > 0
    assert {r["step"] for r in recs if "eval/accuracy" in r} == {10, 20}
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["task"]["name"] == "match3"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(f"{workdir}/tensorboard"))


@pytest.mark.parametrize("name", claims_config.TASKS)
def test_every_task_config_trains_in_smoke_mode(tmp_path, name):
    """Each task's config (configs/TASK.py) builds its model and trains: token and sequence
    heads, binary and many-class labels (function composition: the class f(f(x)) of n)."""
    config = importlib.import_module(f"configs.{name}").get_config("smoke").to_dict()
    final = training.train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 20 and 0.0 <= final["eval/accuracy"] <= 1.0
    assert np.isfinite(final["eval/loss"])


def test_rerun_of_finished_run_trains_nothing(finished):
    workdir, final = finished
    before = records(workdir)
    again = training.train_and_evaluate(smoke_config(), workdir)
    assert again["complete"] and again["eval/accuracy"] == final["eval/accuracy"]
    assert records(workdir) == before


def test_workdir_of_another_model_is_refused(finished):
    """A finished run of another model is not reported complete nor restored into."""
    workdir, _ = finished
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(training.ConfigError, match="model.width"):
        training.train_and_evaluate(smoke_config(model__width=32), workdir)
    assert open(os.path.join(workdir, "config.json")).read() == before


def test_workdir_of_another_task_format_is_refused(finished, tmp_path):
    """Checkpoints of another format of the task's examples (`Task.format_version`) are not
    resumed; a config.json written before formats were versioned counts as format 1."""
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        config = json.load(f)
    assert config["task_format"] == tasks.make("match3").format_version == 1
    for old_format, refused in [(None, False), (2, True)]:
        config["task_format"] = old_format
        with open(path, "w") as f:
            json.dump({k: v for k, v in config.items() if v is not None}, f)
        if refused:
            refusal = r"^task_format: .*\(task_format 2 -> 1\)"
            with pytest.raises(training.ConfigError, match=refusal):
                training.train_and_evaluate(smoke_config(), workdir)
        else:
            assert training.train_and_evaluate(smoke_config(), workdir)["complete"]


def test_run_fingerprint_names_what_the_metrics_depend_on(monkeypatch):
    """Run options (the kernel, cadence, devices) and fields left at their defaults keep the
    fingerprint; the task, its format, the model, the optimizer, the seed, the budget and the
    code's `RESULTS_VERSION` change it."""
    base = training.run_fingerprint(smoke_config())
    assert len(base) == 12 and base == training.run_fingerprint(
        training.options_from_dict(smoke_config())
    )
    same = [
        smoke_config(kernel__implementation="blocked"),
        smoke_config(train__log_every=3, train__eval_every=5, train__checkpoint_every=7),
        smoke_config(train__num_devices=1, train__sequence_shards=1, train__eval_batch_size=8),
        smoke_config(model__dtype="float32"),
    ]
    assert {training.run_fingerprint(c) for c in same} == {base}
    trimmed = smoke_config()
    del trimmed["optim"]["b1"]  # at its default
    assert training.run_fingerprint(trimmed) == base
    other = [
        smoke_config(optim__learning_rate=0.123),
        smoke_config(train__seed=5),
        smoke_config(train__num_steps=21),
        smoke_config(train__eval_seed=99),
        smoke_config(model__width=32),
        smoke_config(task__kwargs={"length": 7, "modulus": 41}),
    ]
    prints = [training.run_fingerprint(c) for c in other]
    assert base not in prints and len(set(prints)) == len(prints)
    monkeypatch.setattr(tasks.match.Match, "format_version", 2, raising=False)
    assert training.run_fingerprint(smoke_config()) != base
    monkeypatch.undo()
    monkeypatch.setattr(training, "RESULTS_VERSION", training.RESULTS_VERSION + 1)
    assert training.run_fingerprint(smoke_config()) not in (base, *prints)


def tensorboard_scalars(workdir):
    """Sorted (tag, step, value) points as TensorBoard shows them (without wall-clock tags):
    the event files in the order they were written, a SessionLog START at step s hiding every
    earlier event at a step >= s."""
    from tensorboardX.proto import event_pb2

    files = []
    for name in os.listdir(os.path.join(workdir, "tensorboard")):
        with open(os.path.join(workdir, "tensorboard", name), "rb") as f:
            data, events = f.read(), []
        while data:  # TFRecords: uint64 length, uint32 crc, payload, uint32 crc
            length = int.from_bytes(data[:8], "little")
            events.append(event_pb2.Event.FromString(data[12 : 12 + length]))
            data = data[16 + length :]
        files.append(events)
    points = []
    for events in sorted(files, key=lambda events: events[0].wall_time):
        for e in events:
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                points = [p for p in points if p[1] < e.step]
            points += [(v.tag, e.step, v.simple_value) for v in e.summary.value]
    return sorted(p for p in points if p[0] != "steps_per_sec")


def test_interrupted_run_resumes_to_identical_metrics(finished, tmp_path, monkeypatch):
    """Killed at step 17 (last checkpoint 10, train metrics logged at 15); the resumed run
    equals the uninterrupted one, in metrics.jsonl and as TensorBoard shows it, which also
    shows that the same seed gives the same metrics."""
    workdir, _ = finished
    resumed = str(tmp_path)
    real = tasks.train_batch

    def dying(task, seed, step, batch_size, *rest):
        if step == 17:
            raise KeyboardInterrupt("simulated kill")
        return real(task, seed, step, batch_size, *rest)

    monkeypatch.setattr(tasks, "train_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(smoke_config(), resumed)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["10"]
    assert any(p[:2] == ("train/loss", 15) for p in tensorboard_scalars(resumed))
    monkeypatch.setattr(tasks, "train_batch", real)
    training.train_and_evaluate(smoke_config(), resumed)
    assert records(resumed) == records(workdir)
    assert tensorboard_scalars(resumed) == tensorboard_scalars(workdir)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = training.make_train_step

    def poisoned(seed):
        step_fn = real(seed)

        def wrapped(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state.step) >= 13:
                metrics = {**metrics, "loss": metrics["loss"] * float("nan")}
            return state, metrics

        return wrapped

    monkeypatch.setattr(training, "make_train_step", poisoned)
    with pytest.raises(training.NonFiniteLossError, match="step 13.*checkpoint is step 10"):
        training.train_and_evaluate(smoke_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(model__num_heads=3), "model.num_heads"),
        (dict(model__attention="cubic"), "model.attention"),
        (dict(model__embedding="onehot"), "model.embedding"),
        (dict(task__kwargs={"length": 10, "modulus": 7}), "task.kwargs"),
        (dict(task__name="match5"), "task.name"),
        (dict(model__colour="red"), "model.colour"),
        (dict(train__batch_size=0), "train.batch_size"),
        (dict(train__eval_size=100), "train.eval_size"),
        (dict(optim__learning_rate=-1.0), "optim.learning_rate"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(training.ConfigError, match=field.replace(".", r"\.")):
        training.validate(training.options_from_dict(smoke_config(**overrides)))


def test_one_vocabulary_from_config_to_model():
    options = training.options_from_dict(smoke_config(model__num_layers=4, model__tensor_every=2))
    assert options.model.attention == "tensor" and options.model.tensor_every == 2
    assert options.model.attention_kinds == ("standard", "tensor", "standard", "tensor")
    config = match3.get_config("attention=polynomial,smoke")
    config.model.polynomial.degree = 3
    options = training.options_from_dict(config.to_dict())
    assert options.model.polynomial == PolynomialConfig(degree=3)
    config = smoke_config(kernel__implementation="blocked")
    config["kernel"]["blocked"]["block_q"] = 8
    options = training.options_from_dict(config)
    training.validate(options)
    assert options.kernel.kernel().config == BlockedConfig(block_q=8)


def test_resume_with_another_exact_kernel(finished, tmp_path, monkeypatch, caplog):
    """Killed at step 15 with the default kernel, resumed with kernel.implementation=
    "reference": one log line names the change, and the metrics equal the uninterrupted run's
    (on CPU the default runs "reference" at this length, so they are identical)."""
    workdir, _ = finished
    resumed = str(tmp_path)
    real = tasks.train_batch

    def dying(task, seed, step, batch_size, *rest):
        if step == 15:
            raise KeyboardInterrupt("simulated kill")
        return real(task, seed, step, batch_size, *rest)

    monkeypatch.setattr(tasks, "train_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(smoke_config(), resumed)
    monkeypatch.setattr(tasks, "train_batch", real)
    with caplog.at_level("INFO", logger="tensorattn"):
        training.train_and_evaluate(smoke_config(kernel__implementation="reference"), resumed)
    changed = [r.getMessage() for r in caplog.records if "config differs" in r.getMessage()]
    assert len(changed) == 1 and "kernel.implementation None -> 'reference'" in changed[0]
    assert any("resuming from checkpoint step 10" in r.getMessage() for r in caplog.records)
    assert records(resumed) == records(workdir)


def test_switching_exact_and_polynomial_attention_is_refused(finished):
    workdir, _ = finished
    with pytest.raises(training.ConfigError, match="model.attention"):
        training.train_and_evaluate(smoke_config(model__attention="polynomial"), workdir)


def run_cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_smoke_run(tmp_path):
    out = run_cli(
        "--config=configs/match3.py:smoke",
        f"--workdir={tmp_path}",
        "--config.kernel.implementation=blocked",
        "--config.kernel.blocked.block_q=8",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "config.json") as f:
        kernel = json.load(f)["kernel"]
    assert kernel["implementation"] == "blocked" and kernel["blocked"]["block_q"] == 8
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "config.json").exists()
    assert (tmp_path / "checkpoints" / "20").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.model.num_heads=3", "model.num_heads"),
        (
            "--config.model.num_headz=2",
            "invalid config: model.num_headz: not a field of the "
            'config (set by --config.model.num_headz=2). Did you mean "num_heads"',
        ),
        ("--config.model.nonexistent=2", "invalid config: model.nonexistent: not a field"),
    ],
)
def test_cli_bad_override_exits_nonzero_naming_the_field(tmp_path, override, needle):
    out = run_cli("--config=configs/match3.py:smoke", f"--workdir={tmp_path}", override)
    assert out.returncode != 0
    assert needle in out.stderr + out.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_finished_run_keeps_its_config_when_rerun_with_another(finished):
    """A finished run re-run with other settings trains nothing and leaves config.json, which
    describes its checkpoints and metrics, as it was."""
    workdir, final = finished
    before = records(workdir), open(os.path.join(workdir, "config.json")).read()
    overrides = dict(train__num_steps=10, optim__learning_rate=5e-3, train__eval_seed=99)
    again = training.train_and_evaluate(smoke_config(**overrides), workdir)
    assert again["complete"] and again["step"] == final["step"] == 20
    assert (records(workdir), open(os.path.join(workdir, "config.json")).read()) == before


def test_changed_optimizer_structure_is_refused_before_touching_anything(finished):
    """grad_clip 1.0 -> 0 removes a transform: refused naming the field, nothing moved."""
    workdir, _ = finished
    before = records(workdir), open(os.path.join(workdir, "config.json")).read()
    overrides = dict(optim__grad_clip=0.0, train__num_steps=30)
    with pytest.raises(training.ConfigError, match=r"^optim\.grad_clip 1\.0 -> 0\.0 changes"):
        training.train_and_evaluate(smoke_config(**overrides), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))
    assert (records(workdir), open(os.path.join(workdir, "config.json")).read()) == before


@pytest.mark.parametrize(
    "change",
    [
        dict(optim__grad_clip=0.0),  # another optimizer state tree
        dict(model__width=32, train__num_steps=30),  # other array shapes (orbax's shape error)
    ],
)
def test_a_mismatch_is_never_treated_as_corruption(finished, tmp_path, change):
    """Without config.json to compare, the restore's structure or shape mismatch still moves
    nothing, and the refused config is not written as the workdir's config.json."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(finished[0], workdir)
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(checkpoints.CheckpointMismatchError, match="step 20.*another structure"):
        training.train_and_evaluate(smoke_config(**change), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))
    assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_when_no_checkpoint_restores_nothing_is_moved_or_dropped(finished, tmp_path, monkeypatch):
    """A read failure of every checkpoint (e.g. permissions) may be the machine's fault: the
    run stops naming each failure, with the checkpoints and metrics as they were."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(finished[0], workdir)
    before = records(workdir)

    def unreadable(self, step, target):
        raise OSError(f"[Errno 13] Permission denied: step {step}")

    monkeypatch.setattr(checkpoints.Checkpoints, "restore", unreadable)
    with pytest.raises(checkpoints.CheckpointError, match="step 20: OSError.*Nothing was moved"):
        training.train_and_evaluate(smoke_config(train__num_steps=30), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt"))
    assert records(workdir) == before


def test_each_logged_mean_covers_the_steps_since_the_previous_log(tmp_path, monkeypatch):
    """log_every=7 does not divide checkpoint_every=10: the save at 10 writes the mean of
    steps 8-10 (a resume from it loses none), the log at 14 that of 11-14."""
    real, losses = training.make_train_step, {}

    def recording(seed):
        step_fn = real(seed)

        def wrapped(state, batch):
            state, metrics = step_fn(state, batch)
            losses[int(state.step)] = float(metrics["loss"])
            return state, metrics

        return wrapped

    monkeypatch.setattr(training, "make_train_step", recording)
    training.train_and_evaluate(smoke_config(train__log_every=7), str(tmp_path))
    logged = {r["step"]: r["train/loss"] for r in records(str(tmp_path)) if "train/loss" in r}
    assert sorted(logged) == [7, 10, 14, 20]
    for step, first in ((7, 1), (10, 8), (14, 11), (20, 15)):
        expected = sum(losses[s] for s in range(first, step + 1)) / (step - first + 1)
        assert logged[step] == pytest.approx(expected, rel=1e-6)


def test_non_finite_parameters_are_caught_at_the_next_eval_and_no_nan_is_written(
    tmp_path, poison_params_at
):
    """Parameters turn NaN at step 7 with logs and saves at 20 but evals every 5: the eval at
    10 stops the run before writing; no checkpoint exists and the message says so."""
    poison_params_at(7)
    c = smoke_config(train__log_every=20, train__checkpoint_every=20, train__eval_every=5)
    with pytest.raises(training.NonFiniteLossError, match="step 8.*No checkpoint was saved"):
        training.train_and_evaluate(c, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text
    evals = [r for r in map(json.loads, text.splitlines()) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [5]


def test_non_finite_values_are_written_as_null(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    workdir.append_jsonl(path, {"step": 1, "x": float("nan"), "y": [np.float32("inf"), 2.0]})
    assert open(path).read() == '{"step": 1, "x": null, "y": [null, 2.0]}\n'
    workdir.rewrite_jsonl(path, [{"step": 2, "x": float("-inf")}])
    assert json.loads(open(path).read()) == {"step": 2, "x": None}


def test_a_signal_during_the_last_step_is_reported(tmp_path, monkeypatch):
    """SIGTERM at the final step: the run completes and saves, then TrainingInterrupted tells
    the caller (claims run several trainings: they must stop too)."""

    class Signals:  # stands in for the handlers: the "signal" arrives during step 20
        received = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    real = tasks.train_batch

    def signalled(task, seed, step, batch_size, *rest):
        if step == 20:
            Signals.received = "SIGTERM"
        return real(task, seed, step, batch_size, *rest)

    monkeypatch.setattr(training, "_Signals", Signals)
    monkeypatch.setattr(tasks, "train_batch", signalled)
    with pytest.raises(training.TrainingInterrupted, match="step 20 of 20.*the run is complete"):
        training.train_and_evaluate(smoke_config(), str(tmp_path))
    assert training.train_and_evaluate(smoke_config(), str(tmp_path))["step"] == 20


def test_append_after_a_torn_line_cuts_it_off(tmp_path):
    """A kill mid-append leaves a torn last line: the next append never joins it."""
    path = str(tmp_path / "rows.jsonl")
    workdir.append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "x": 0.')
    workdir.append_jsonl(path, {"step": 3})
    workdir.append_jsonl(path, {"step": 4})
    assert [r["step"] for r in workdir.read_jsonl(path)] == [1, 3, 4]
    with open(path, "a") as f:
        f.write('{"step": 5}')  # complete but unterminated: kept
    workdir.append_jsonl(path, {"step": 6})
    assert [r["step"] for r in workdir.read_jsonl(path)] == [1, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config.model.nonexistent=3"], "model.nonexistent: not a field"),
        (["--config=configs/nope.py"], "No such file"),
        (["--config=configs/match3.py:smok"], "unknown config argument 'smok'"),
        (["--config=configs/match3.py:length=abc"], "length='abc' is not an int"),
        (["--workdir={file}"], "is a file, not a folder"),
        (["--workdir={file}/run"], "which is a file"),
        (["--workdir="], "must be a folder path"),
        (["--workdir={file}_dir/run[1]"], "'[' and ']' are not allowed"),
    ],
)
def test_cli_bad_input_exits_with_one_line(tmp_path, args, needle):
    file = tmp_path / "file"
    file.write_text("")
    args = [a.format(file=file) for a in args]
    defaults = ["--config=configs/match3.py:smoke", f"--workdir={tmp_path / 'run'}"]
    flags = {a.split("=")[0] for a in args}
    out = run_cli(*[a for a in defaults if a.split("=")[0] not in flags], *args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and needle in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_cli_os_error_exits_with_one_line(tmp_path):
    """A file the run cannot write (here config.json is a folder): one line, no traceback."""
    (tmp_path / "run" / "config.json").mkdir(parents=True)
    out = run_cli("--config=configs/match3.py:smoke", f"--workdir={tmp_path / 'run'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "training stopped: IsADirectoryError" in out.stderr
    assert "run the same command to resume" in out.stderr


def test_a_held_out_set_covering_the_task_is_refused():
    """2x2 relation grids: 16 inputs, all in a held-out set of 64; nothing left to train on."""
    options = training.options_from_dict(
        smoke_config(
            task__name="relation_composition",
            task__kwargs={"size": 2},
            model__embedding="learned",
            model__fourier_frequencies=None,
        )
    )
    with pytest.raises(training.ConfigError, match="^train.eval_size: .*covers"):
        training.validate(options)


def test_logged_learning_rate_is_the_one_each_step_applies():
    """With b1 = b2 = 0 an AdamW step moves a 1-d parameter by its learning rate (a gradient
    of ones): the logged `learning_rate_at(step)` is that rate, warm-up and decay included."""
    o = training.OptimOptions(learning_rate=2e-3, warmup_steps=5, grad_clip=0.0, b1=0.0, b2=0.0)
    optimizer = training.make_optimizer(o, 20)
    params = {"w": np.zeros(3, np.float32)}
    state = optimizer.init(params)
    for step in range(1, 21):
        updates, state = optimizer.update({"w": np.ones(3, np.float32)}, state, params)
        applied = -float(updates["w"][0])
        assert applied == pytest.approx(training.learning_rate_at(o, 20, step), rel=1e-4, abs=1e-9)
