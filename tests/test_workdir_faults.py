"""Training workdirs under faults: kills at random moments (during checkpoint saves too),
concurrent runs, torn and corrupt files, unwritable folders, non-finite states.

The reference is one uninterrupted smoke run; every faulted run must end with the same
metrics, line for line (wall-clock fields aside), nothing duplicated or lost.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from configs import match3
from tensorattn import checkpoints, tasks, training, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 60 steps: checkpoints every 5, metrics every 5, evals every 10 (13 saves to hit).
OVERRIDES = dict(num_steps=60, checkpoint_every=5, log_every=5, eval_every=10)


def config():
    c = match3.get_config("smoke").to_dict()
    c["train"].update(OVERRIDES)
    return c


def records(path):
    """Metric records without wall-clock fields."""
    return [
        {k: v for k, v in r.items() if k != "steps_per_sec"} for r in training.read_metrics(path)
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reference"))
    training.train_and_evaluate(config(), path)
    return records(path)


def assert_same_run(path, reference):
    got = records(path)
    assert got == reference, (len(got), len(reference))
    keys = [(r["step"], tuple(sorted(r))) for r in got]
    assert len(keys) == len(set(keys)), "duplicated records"


# A run in a subprocess; with KILL_IN_SAVE set it SIGKILLs itself a random moment after a
# checkpoint save starts (while orbax writes, renames or finalises the step).
RUN = textwrap.dedent(
    """
    import json, os, random, signal, sys, threading
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py
    from tensorattn import checkpoints, training
    real_save = checkpoints.Checkpoints.save
    kill_at = os.environ.get("KILL_IN_SAVE")
    def save(self, step, state):
        if kill_at is not None and step >= int(kill_at):
            delay = random.Random(step).uniform(0.0, 0.02)
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        real_save(self, step, state)
    checkpoints.Checkpoints.save = save
    training.train_and_evaluate(json.loads(sys.argv[1]), sys.argv[2])
    """
)


def launch(path, kill_in_save=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if kill_in_save is not None:
        env["KILL_IN_SAVE"] = str(kill_in_save)
    return subprocess.Popen(
        [sys.executable, "-c", RUN, json.dumps(config()), path],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_step(path) -> int:
    return max((r["step"] for r in training.read_metrics(path)), default=0)


def kill_after(proc, path, step: int, extra_s: float) -> None:
    """SIGKILLs `proc` `extra_s` seconds after its metrics reach `step` (or at once if it
    has exited): a random moment of training, however fast the machine is."""
    deadline = time.monotonic() + 240
    while last_step(path) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra_s)
    proc.send_signal(signal.SIGKILL)


def test_random_kills_resume_to_the_uninterrupted_metrics(reference, tmp_path):
    """Six SIGKILLs (three from outside at random moments of training, three inside
    checkpoint saves), then a run to the end: its metrics equal the uninterrupted run's."""
    rng = random.Random(0)
    path = str(tmp_path)
    killed = 0
    for attempt in range(6):
        if attempt % 2:
            proc = launch(path, kill_in_save=last_step(path) + 5)
        else:
            proc = launch(path)
            kill_after(proc, path, last_step(path) + rng.randint(1, 7), rng.uniform(0.0, 0.2))
        proc.wait(timeout=240)
        killed += proc.returncode == -signal.SIGKILL
        training.read_metrics(path)  # readable after every kill
    assert killed == 6 and last_step(path) < OVERRIDES["num_steps"]
    proc = launch(path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert_same_run(path, reference)


def test_kill_before_the_first_checkpoint_writes_step_0_once(reference, tmp_path, monkeypatch):
    real = tasks.train_batch

    def dying(task, seed, step, batch_size, *rest):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(task, seed, step, batch_size, *rest)

    monkeypatch.setattr(tasks, "train_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        training.train_and_evaluate(config(), str(tmp_path))
    monkeypatch.setattr(tasks, "train_batch", real)
    training.train_and_evaluate(config(), str(tmp_path))
    assert_same_run(str(tmp_path), reference)


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    with workdir.lock(str(tmp_path)):
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {os.getpid()}"):
            training.train_and_evaluate(config(), str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_second_cli_run_exits_nonzero(tmp_path):
    with workdir.lock(str(tmp_path)):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.train", "--config=configs/match3.py:smoke"]
            + [f"--workdir={tmp_path}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode != 0 and "in use by another run" in out.stderr


@pytest.fixture
def interrupted(reference, tmp_path):
    """A finished run with its last checkpoint (step 60) removed: resumes from step 55."""
    path = str(tmp_path / "run")
    training.train_and_evaluate(config(), path)
    return path


def test_torn_last_metrics_line_is_dropped(reference, interrupted, caplog):
    shutil.rmtree(os.path.join(interrupted, "checkpoints", "60"))
    metrics = os.path.join(interrupted, "metrics.jsonl")
    os.truncate(metrics, os.path.getsize(metrics) - 10)
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(config(), interrupted)
    assert "metrics.jsonl line" in caplog.text and "torn" in caplog.text
    assert_same_run(interrupted, reference)


def test_corrupt_metrics_line_in_the_middle_names_file_and_line(interrupted):
    metrics = os.path.join(interrupted, "metrics.jsonl")
    lines = open(metrics).read().splitlines(keepends=True)
    lines[2] = lines[2][:7] + "\n"
    open(metrics, "w").writelines(lines)
    with pytest.raises(workdir.CorruptFileError, match="metrics.jsonl line 3"):
        training.read_metrics(interrupted)


def _largest_file(directory):
    paths = [os.path.join(d, name) for d, _, names in os.walk(directory) for name in names]
    return max(paths, key=os.path.getsize)


@pytest.mark.parametrize(
    "damage", ["deleted_item", "truncated_files", "flipped_bytes", "unverified_truncated"]
)
def test_bad_latest_checkpoint_falls_back_to_the_previous(
    reference, interrupted, damage, caplog, monkeypatch
):
    """flipped_bytes: silent damage that still decodes, found by the step's checksums;
    unverified_truncated: data files cut in a step without checksums (a kill between orbax's
    commit and their write), which fails inside orbax's restore: its in-flight reads then
    report "Event loop is closed" dozens of times, which are dropped (one warning is left)."""
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    step_dir = os.path.join(interrupted, "checkpoints", "60")
    if damage == "deleted_item":
        shutil.rmtree(os.path.join(step_dir, "default"))
    elif damage == "unverified_truncated":
        os.remove(os.path.join(step_dir, checkpoints.CHECKSUMS))
        for folder, _, files in os.walk(os.path.join(step_dir, "default", "d")):
            for name in files:
                os.truncate(os.path.join(folder, name), 10)
    elif damage == "truncated_files":
        for folder, _, files in os.walk(step_dir):
            for name in files:
                f = os.path.join(folder, name)
                os.truncate(f, os.path.getsize(f) // 2)
    else:
        with open(_largest_file(step_dir), "r+b") as f:
            data = bytearray(f.read())
            data[len(data) // 2] ^= 0xFF
            f.seek(0)
            f.write(data)
    with caplog.at_level(logging.WARNING):
        training.train_and_evaluate(config(), interrupted)
    assert "checkpoint step 60" in caplog.text and "cannot be restored" in caplog.text
    assert os.listdir(os.path.join(interrupted, "checkpoints_corrupt"))
    assert_same_run(interrupted, reference)
    assert not reports, [str(r.exc_value) for r in reports]


def test_restore_failing_inside_orbax_leaves_one_warning(interrupted):
    """Data files cut in a step without checksums (a kill between orbax's commit and their
    write) fail inside orbax's restore; its reads still in flight then report "Event loop is
    closed" dozens of times. The command resumes from the step before with one warning and
    no traceback."""
    step_dir = os.path.join(interrupted, "checkpoints", "60")
    os.remove(os.path.join(step_dir, checkpoints.CHECKSUMS))
    for folder, _, files in os.walk(os.path.join(step_dir, "default", "d")):
        for name in files:
            os.truncate(os.path.join(folder, name), 10)
    overrides = [f"--config.train.{k}={v}" for k, v in OVERRIDES.items()]
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/match3.py:smoke",
         f"--workdir={interrupted}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step 60" in out.stderr and "cannot be restored" in out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr


def test_non_finite_parameters_are_never_saved(tmp_path, monkeypatch, poison_params_at):
    """The loss stays finite but the parameters turn NaN at step 12: the save at 15 is
    refused, checkpoint 10 stays the newest, and resuming from it works."""
    real = poison_params_at(12)
    c = config()
    c["train"].update(checkpoint_every=10, log_every=10)
    with pytest.raises(training.NonFiniteLossError, match="last good checkpoint is step 10"):
        training.train_and_evaluate(c, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
    monkeypatch.setattr(training, "make_train_step", real)
    c["train"]["num_steps"] = 20
    assert training.train_and_evaluate(c, str(tmp_path))["step"] == 20


def _set_writable(path, writable: bool) -> None:
    """chmod for a normal user; root ignores modes, so `chattr +i` (immutable) for root."""
    root = os.geteuid() == 0
    if root and writable:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    os.chmod(path, 0o755 if writable else 0o555)
    if root and not writable:
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)


def _can_make_unwritable(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    _set_writable(probe, False)
    try:
        (probe / "x").touch()
        return False
    except OSError:
        return True
    finally:
        _set_writable(probe, True)


def test_unwritable_checkpoint_folder_fails_fast(tmp_path, monkeypatch):
    if not _can_make_unwritable(tmp_path):
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    folder = tmp_path / "run" / "checkpoints"
    real = tasks.train_batch

    def lock_folder(task, seed, step, batch_size, *rest):
        if step == 7:
            _set_writable(folder, False)
        return real(task, seed, step, batch_size, *rest)

    monkeypatch.setattr(tasks, "train_batch", lock_folder)
    start = time.time()
    try:
        with pytest.raises(checkpoints.CheckpointError, match="cannot write checkpoints"):
            training.train_and_evaluate(config(), str(tmp_path / "run"))
    finally:
        _set_writable(folder, True)
    assert time.time() - start < 60


def test_failed_start_leaves_no_obstacle(tmp_path):
    """A config.json from a run that never saved a checkpoint (it failed at start) does not
    block a corrected run, even of another model."""
    other = config()
    other["model"]["width"] = 32
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "config.json").write_text(json.dumps(other))
    c = config()
    c["train"]["num_steps"] = 5
    assert training.train_and_evaluate(c, str(tmp_path))["step"] == 5


# The command line, with its training batch at step 7 pausing (after writing `.at7`) until the
# test has signalled it, so the signal lands mid-training, after the handler is installed.
PAUSED_CLI = textwrap.dedent(
    """
    import os, runpy, sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py
    from tensorattn import tasks
    real = tasks.train_batch
    def paused(task, seed, step, batch_size, *rest):
        if step == 7:
            marker = os.path.join(sys.argv[-1].split("=", 1)[1], ".at7")
            open(marker, "w").close()
            deadline = time.monotonic() + 60
            while os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
        return real(task, seed, step, batch_size, *rest)
    tasks.train_batch = paused
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("experiments.train", run_name="__main__")
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_exits_with_one_line(reference, tmp_path, sig):
    """SIGTERM (preemption) or Ctrl-C at step 7 (checkpoints every 5): step 7 and its pending
    metrics are saved, the exit is non-zero with one line; the resumed run evaluates as the
    uninterrupted one."""
    path = str(tmp_path / "run")
    args = [f"--config.train.{k}={v}" for k, v in OVERRIDES.items()]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CLI, "--config=configs/match3.py:smoke", *args]
        + [f"--workdir={path}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    marker = os.path.join(path, ".at7")
    deadline = time.monotonic() + 240
    while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    os.remove(marker)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    name = signal.Signals(sig).name
    assert f"training interrupted: {name} at step 7 of 60; saved checkpoint step 7" in err
    assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == ["5", "7"]
    logged = [r for r in records(path) if "train/loss" in r]
    assert [r["step"] for r in logged] == [5, 7]
    training.train_and_evaluate(config(), path)
    evals = [r for r in records(path) if "eval/loss" in r]
    assert evals == [r for r in reference if "eval/loss" in r]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_usual_mode_under_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        workdir.write_atomic(str(tmp_path / "config.json"), "{}")
        with workdir.atomic_path(str(tmp_path / "plot.png")) as tmp:
            open(tmp, "w").close()
        workdir.rewrite_jsonl(str(tmp_path / "metrics.jsonl"), [{"step": 0}])
        workdir.append_jsonl(str(tmp_path / "rows.jsonl"), {"step": 0})
    finally:
        os.umask(old)
    for name in ("config.json", "plot.png", "metrics.jsonl", "rows.jsonl"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o666 & ~umask), name
