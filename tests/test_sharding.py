"""Data and sequence parallelism on 4 CPU devices give the results of one device.

Each test runs a script in a subprocess with XLA_FLAGS set before jax starts, so the rest of
the suite keeps its single-device jax. The subprocess is pinned to the CPU platform
(JAX_PLATFORMS=cpu): on a GPU machine JAX would otherwise default to the one GPU.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_4_devices(script: str) -> dict:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.multi_device
def test_sequence_parallel_layer_matches_single_device():
    """The trainer's sharded attend function (`shard_queries` around the kernel) gives the
    layer's outputs and gradients, the learned per-head scale's included, for each kernel
    that runs on the host: reference, blocked (scans), polynomial, and the default at more
    key pairs than the reference takes (it picks blocked)."""
    result = run_with_4_devices(
        """
        import json
        import jax, numpy as np
        from tensorattn import sharding
        from tensorattn.kernels.configs import PolynomialConfig
        from tensorattn.layers import Kernel, TensorAttention
        assert jax.device_count() == 4
        kernels = {
            "reference": (Kernel("reference"), 8),
            "blocked": (Kernel("blocked"), 8),
            "polynomial": (Kernel("polynomial", PolynomialConfig(degree=4)), 8),
            "default": (Kernel(), 36),  # 36 x 36 key pairs: blocked
        }
        out = {}
        for name, (kernel, t) in kernels.items():
            x = jax.random.normal(jax.random.key(0), (2, t, 12))
            mask = np.ones((2, t), bool); mask[0, t - 2:] = False
            plain = TensorAttention(
                num_heads=2, implementation=kernel.implementation, kernel_config=kernel.config,
                learn_scale=True, entry_bound=0.5,
            )
            params = jax.jit(plain.init)(jax.random.key(1), x)

            def loss(layer):
                return lambda p, x, m: layer.apply(p, x, k1_mask=m, k2_mask=m).sum()

            want = jax.jit(plain.apply)(params, x, k1_mask=mask, k2_mask=mask)
            want_g = jax.jit(jax.grad(loss(plain)))(params, x, mask)
            errors, grad_errors = [], []
            for shards in (2, 4):
                mesh = sharding.make_mesh(shards)
                layer = plain.clone(attend=sharding.shard_queries(kernel))
                with jax.set_mesh(mesh):
                    xs = jax.device_put(x, sharding.batch_sharded(mesh))
                    got = jax.jit(lambda p, x, m: layer.apply(p, x, k1_mask=m, k2_mask=m))(
                        params, xs, mask
                    )
                    got_g = jax.jit(jax.grad(loss(layer)))(params, xs, mask)
                errors.append(float(np.abs(np.asarray(got) - np.asarray(want)).max()))
                diffs = jax.tree_util.tree_map(
                    lambda a, b: float(np.abs(a - b).max()), got_g, want_g
                )
                grad_errors.append(max(jax.tree_util.tree_leaves(diffs)))
            out[name] = {"errors": errors, "grad_errors": grad_errors}
        print(json.dumps(out))
        """
    )
    assert sorted(result) == ["blocked", "default", "polynomial", "reference"]
    for name, r in result.items():
        assert max(r["errors"]) < 1e-5, (name, r)
        assert max(r["grad_errors"]) < 1e-4, (name, r)


@pytest.mark.multi_device
def test_training_data_and_sequence_parallel_match_one_device(tmp_path):
    """Data and sequence parallel runs give one device's metrics; a run interrupted on one
    device resumes on 4 devices with 2 sequence shards (run options, not the model's
    identity) and ends with the same metrics."""
    result = run_with_4_devices(
        f"""
        import json, logging
        from configs import match3
        from tensorattn import tasks, training
        real = tasks.train_batch
        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())
        logging.getLogger("tensorattn").addHandler(handler)
        logging.getLogger("tensorattn").setLevel(logging.INFO)

        def dying(task, seed, step, batch_size, *rest):
            if step == 5:
                raise KeyboardInterrupt("simulated kill")
            return real(task, seed, step, batch_size, *rest)

        def config(devices, shards):
            c = match3.get_config("smoke")
            c.kernel.implementation = "reference"
            c.train.num_devices = devices
            c.train.sequence_shards = shards
            c.train.num_steps = 6
            c.train.checkpoint_every = 3
            return c.to_dict()

        def metrics(workdir):
            return [
                r for r in training.read_metrics(workdir) if "train/loss" in r or "eval/loss" in r
            ]

        out = {{}}
        for name, devices, shards in [("one", 1, 1), ("data", 4, 1), ("seq", 4, 2)]:
            workdir = "{tmp_path}/" + name
            training.train_and_evaluate(config(devices, shards), workdir)
            out[name] = metrics(workdir)
        workdir = "{tmp_path}/resumed"
        tasks.train_batch = dying
        try:
            training.train_and_evaluate(config(1, 1), workdir)
        except KeyboardInterrupt:
            pass
        tasks.train_batch = real
        training.train_and_evaluate(config(4, 2), workdir)
        out["resumed"] = metrics(workdir)
        out["logged"] = logged
        print(json.dumps(out))
        """
    )
    changed = [m for m in result["logged"] if "config differs" in m]
    assert len(changed) == 1, changed
    assert "train.num_devices 1 -> 4" in changed[0] and "train.sequence_shards 1 -> 2" in changed[0]
    assert "model." not in changed[0].split("; ", 1)[1] and "resuming with" in changed[0]
    assert any("resuming from checkpoint step 3" in m for m in result["logged"])
    one = result["one"]
    for name in ("data", "seq", "resumed"):
        other = result[name]
        assert len(other) == len(one), name
        for a, b in zip(one, other):
            for key in ("train/loss", "eval/loss", "eval/accuracy"):
                if key in a:
                    assert abs(a[key] - b[key]) < 1e-4, (name, key, a, b)
