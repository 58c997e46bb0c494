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


def test_sequence_parallel_layer_matches_single_device():
    result = run_with_4_devices(
        """
        import json
        import jax, numpy as np
        from tensorattn import sharding
        from tensorattn.layers import TensorAttention
        assert jax.device_count() == 4
        x = jax.random.normal(jax.random.key(0), (2, 8, 12))
        mask = np.ones((2, 8), bool); mask[0, 6:] = False
        plain = TensorAttention(num_heads=2, implementation="reference")
        params = jax.jit(plain.init)(jax.random.key(1), x)
        want = jax.jit(plain.apply)(params, x, k1_mask=mask, k2_mask=mask)
        errors = []
        for shards in (2, 4):
            mesh = sharding.make_mesh(shards)
            layer = plain.clone(sequence_axis=sharding.SEQ_AXIS)
            with jax.set_mesh(mesh):
                xs = jax.device_put(x, sharding.batch_sharded(mesh))
                f = jax.jit(lambda p, x, m: layer.apply(p, x, k1_mask=m, k2_mask=m))
                got = f(params, xs, mask)
            errors.append(float(np.abs(np.asarray(got) - np.asarray(want)).max()))
        print(json.dumps({"errors": errors}))
        """
    )
    assert max(result["errors"]) < 1e-5, result


def test_training_data_and_sequence_parallel_match_one_device(tmp_path):
    result = run_with_4_devices(
        f"""
        import json
        from configs import match3
        from tensorattn import training
        out = {{}}
        for name, devices, shards in [("one", 1, 1), ("data", 4, 1), ("seq", 4, 2)]:
            c = match3.get_config("smoke")
            c.model.implementation = "reference"
            c.train.num_devices = devices
            c.train.sequence_shards = shards
            c.train.num_steps = 6
            workdir = "{tmp_path}/" + name
            training.train_and_evaluate(c.to_dict(), workdir)
            out[name] = [
                r for r in training.read_metrics(workdir) if "train/loss" in r or "eval/loss" in r
            ]
        print(json.dumps(out))
        """
    )
    one = result["one"]
    for name in ("data", "seq"):
        other = result[name]
        assert len(other) == len(one)
        for a, b in zip(one, other):
            for key in ("train/loss", "eval/loss", "eval/accuracy"):
                if key in a:
                    assert abs(a[key] - b[key]) < 1e-4, (name, key, a, b)
