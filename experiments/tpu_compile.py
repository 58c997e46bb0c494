r"""The Pallas kernels compiled for TPU chips by libtpu, on a host without a TPU.

  python3 -m venv /tmp/tpu-venv
  /tmp/tpu-venv/bin/pip install -r requirements.txt -e . \
      "jax[tpu]==$(python -c "import jax; print(jax.__version__)")"
  /tmp/tpu-venv/bin/python -m experiments.tpu_compile --out=results/compile_tpu/pallas.jsonl

Each case is traced with `implementation="pallas"` and default tiles as for a TPU
(`tensorattn.kernels.lowering.tpu_target`), forward and gradient, and compiled ahead of
time for one chip of a TPU topology (`jax.experimental.topologies`, no TPU needed): XLA:TPU
and Mosaic run in full (layouts, alignment, VMEM allocation), nothing is executed. A status
per (chip, case, pass): "ok" (compiled), "refused" (`tensorattn.Unsupported` before any work:
float16, or more VMEM than `pallas._tpu_vmem_limit`), or "failed" (the compiler's error).
`vmem_mib` is `pallas.tpu_vmem_bytes`, the estimate the refusal compares. One JSON line per
row: topology, device_kind, case, pass, status, seconds, vmem_mib, message, jax, libtpu.
"""

from __future__ import annotations

import importlib.metadata
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import tensorattn
from experiments import benchlib
from tensorattn import PallasConfig
from tensorattn.kernels import lowering, pallas, spine

FLAGS = flags.FLAGS
# name -> (B, T, N, K, D, dtype, causal, windows, key mask)
CASES = {
    "g2-d5-short-masked": (2, 13, 4, 2, 5, "float32", True, (3, 5), True),
    "g2-d64-causal-masked": (2, 300, 4, 2, 64, "bfloat16", True, None, True),
    "g3-d32-f32-causal": (1, 100, 3, 1, 32, "float32", True, None, False),
    "g8-d128-w32x96": (2, 1000, 8, 1, 128, "bfloat16", True, (32, 96), False),
    "g16-d64-full": (1, 2048, 16, 1, 64, "bfloat16", False, None, False),
    # Issue 10's shapes: fb_4k_h64 at B = 1, paper_16k_512x32 (swapped: w1 > w2).
    "g64-d128-w32x256-4k": (1, 4096, 64, 1, 128, "bfloat16", True, (32, 256), False),
    "g64-d128-w512x32-16k": (1, 16384, 64, 1, 128, "bfloat16", True, (512, 32), False),
    "g8-d128-causal-16k": (1, 16384, 8, 1, 128, "bfloat16", True, None, False),
    "g8-d128-causal-128k": (1, 131072, 8, 1, 128, "bfloat16", True, None, False),
    "g2-d64-f16": (1, 256, 4, 2, 64, "float16", False, None, False),
}
TOPOLOGIES = ["v4:2x2x1", "v5p:2x2x1", "v5e:2x2", "v6e:2x2"]


def define_flags():
    flags.DEFINE_list("cases", list(CASES), f"Cases: {', '.join(CASES)}.")
    flags.DEFINE_list("topologies", TOPOLOGIES, "TPU topologies; one chip of each is compiled for.")
    flags.DEFINE_string("out", "", "JSON lines output ('' = none).")


def _functions(case):
    """`{pass: function}` of one case: its forward and its gradient."""
    b, t, n, kv, d, dtype, causal, windows, masked = case
    mask = np.arange(t)[None].repeat(b, 0) < t - 3 if masked else None  # the last 3 keys invalid

    def forward(*x):
        return tensorattn.tensor_attention(
            *x, implementation="pallas", causal=causal, window=windows, k1_mask=mask, k2_mask=mask
        )

    def loss(*x):
        return jnp.sum(forward(*x).astype(jnp.float32))

    def gradient(*x):
        return jax.grad(loss, argnums=tuple(range(5)))(*x)

    return {"forward": forward, "gradient": gradient}


def _vmem_mib(case) -> float:
    """`pallas.tpu_vmem_bytes` of the case's default plan, in MiB."""
    b, t, n, kv, d, dtype, causal, windows, _ = case
    q = jax.ShapeDtypeStruct((b, t, n, d), dtype)
    k = jax.ShapeDtypeStruct((b, t, kv, d), dtype)
    spec = spine.AttentionSpec(
        scale=d**-0.5, causal=causal, windows=windows or (None, None), key_masks=(None, None)
    )
    keys, values, _, spec = pallas.ordered_key_sets(q, (k, k), (k, k), spec)
    plan = pallas.plan(spec.call(q, keys), PallasConfig())
    return pallas.tpu_vmem_bytes(plan, d, d, jnp.dtype(dtype).itemsize) / 2**20


def trace(name: str, kind: str, sharding=None):
    """Pass `kind` ("forward" or "gradient") of case `name` traced with abstract inputs (on
    `sharding`); run it under `lowering.tpu_target` to trace as for a TPU. A refusal is a
    ValueError from `tensorattn.Unsupported`."""
    b, t, n, kv, d, dtype = CASES[name][:6]
    shapes = [(b, t, n, d)] + [(b, t, kv, d)] * 4
    args = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
    return jax.jit(_functions(CASES[name])[kind]).trace(*args)


def compile_case(topology: str, name: str) -> list[dict]:
    """Rows of one case compiled for one chip of `topology`."""
    from jax.experimental import topologies

    device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    cores = getattr(device, "num_cores", 1)
    rows = []
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):  # the TPU tiles
        vmem = _vmem_mib(CASES[name])
    with lowering.tpu_target(device.device_kind, cores):
        for kind in ("forward", "gradient"):
            start = time.perf_counter()
            try:
                trace(name, kind, sharding).lower().compile()
                status, message = "ok", ""
            except Exception as e:  # a refusal (ValueError from Unsupported) or the compiler's
                if isinstance(e.__cause__, tensorattn.Unsupported):
                    status, message = "refused", str(e.__cause__)
                else:
                    status, message = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
            rows.append(
                {
                    "topology": topology,
                    "device_kind": device.device_kind,
                    "case": name,
                    "pass": kind,
                    "status": status,
                    "seconds": round(time.perf_counter() - start, 2),
                    "vmem_mib": round(vmem, 1),
                    "message": message[:300],
                    "jax": jax.__version__,
                    "libtpu": importlib.metadata.version("libtpu"),
                }
            )
    return rows


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.cases) - set(CASES))
    if unknown:
        raise app.UsageError(f"unknown --cases {unknown}; known: {', '.join(CASES)}")
    rows = []
    for topology in FLAGS.topologies:
        for name in FLAGS.cases:
            for row in compile_case(topology, name):
                print(f"{topology} {name} {row['pass']}: {row['status']} {row['message']}")
                benchlib.append_jsonl(FLAGS.out, row)
                rows.append(row)
    columns = ["topology", "case", "pass", "status", "vmem_mib", "seconds"]
    benchlib.print_table(rows, columns)


if __name__ == "__main__":
    define_flags()
    app.run(main)
