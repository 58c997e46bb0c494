"""Test setup: float32 matmuls at full precision so comparisons are meaningful on any backend;
tests marked `gpu` (compiled GPU kernels) run on an NVIDIA GPU and skip elsewhere, `tpu` ones
on a TPU; `-n auto` (pytest-xdist) runs one worker per available core, at most 8."""

import os
import sys

# Several xdist workers share one GPU: each takes memory as needed instead of 75% up front.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu(hopper=False): compiled GPU kernels; skipped without an NVIDIA GPU (with "
        "hopper=True, without a Hopper one); `-m gpu` runs only these",
    )
    config.addinivalue_line(
        "markers", "tpu: kernels compiled for a TPU; skipped without one; `-m tpu` runs only these"
    )
    config.addinivalue_line(
        "markers", "multi_device: several simulated CPU devices in a subprocess, on any machine"
    )


def _skip_reason(marker) -> str | None:
    if jax.default_backend() != "gpu":
        return "compiled GPU kernels need an NVIDIA GPU"
    cc = str(getattr(jax.devices()[0], "compute_capability", ""))
    if marker.kwargs.get("hopper") and cc != "9.0":
        return f"compiled Mosaic GPU kernels need a Hopper GPU (sm_90), not compute capability {cc}"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker and (reason := _skip_reason(marker)):
            item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("tpu") and jax.default_backend() != "tpu":
            item.add_marker(pytest.mark.skip(reason="kernels compiled for a TPU need a TPU"))


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container's share of a larger host, which `os.cpu_count()` does not see)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):  # v2, v1
        try:
            with open(path) as f:
                quota, *period = f.read().split()
            if not period:  # v1 keeps the period in its own file
                with open(os.path.join(os.path.dirname(path), "cpu.cfs_period_us")) as f:
                    period = f.read().split()
            if quota not in ("max", "-1"):
                cores = min(cores, int(quota) // int(period[0]))
        except (OSError, ValueError, IndexError):
            pass
    return max(1, cores)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, when installed
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per available core, at most 8 (each holds its own JAX runtime and
    compiled kernels, up to about 2 GB), unless PYTEST_XDIST_AUTO_NUM_WORKERS says otherwise."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return min(available_cores(), 8)


@pytest.fixture
def poison_params_at(monkeypatch):
    """`poison_params_at(step)`: the training step turns every parameter NaN at `step`
    (the loss of that step stays finite); returns the real `make_train_step`."""

    def poison(at_step: int):
        from tensorattn import training

        real = training.make_train_step

        def poisoned(seed):
            step_fn = real(seed)

            def wrapped(state, batch):
                state, metrics = step_fn(state, batch)
                if int(state.step) == at_step:
                    params = jax.tree_util.tree_map(lambda p: p * jax.numpy.nan, state.params)
                    state = state.replace(params=params)
                return state, metrics

            return wrapped

        monkeypatch.setattr(training, "make_train_step", poisoned)
        return real

    return poison
