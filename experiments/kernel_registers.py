r"""Registers and spills of the Pallas kernels compiled for an H100 (sm_90a), on any host.

  pip install triton      # the Triton compiler and its ptxas; GPU machines have it already
  python -m experiments.kernel_registers --out=$OUT/kernel_registers.jsonl
  python -m experiments.kernel_registers --cases=fb_4k_h128 \
      --variants=default,bwd_block_rows=64,bwd_block_rows=64+num_warps=4

Each case (issue 10's shapes for `implementation="pallas"`, issue 14's for the fused
polynomial kernels; bfloat16) is lowered for CUDA as it runs on a GPU, forward and gradient;
each Triton kernel's IR is compiled by the `triton`
package for compute capability 9.0 and its PTX assembled by ptxas with `-v`, which reports
registers per thread and spill bytes. A kernel that spills keeps part of its tiles in local
memory (global memory behind the L1 cache) instead of registers. No GPU is needed, so tile
defaults can be checked for spills before a GPU session times them.

Caveat: a GPU runs the IR through the Triton compiler bundled with XLA, not the `triton`
package's; the two versions' pipelines can allocate registers differently, so the counts are
indicative. Variants: "default" (the library's tiles) or `PallasConfig` fields joined by "+",
e.g. "bwd_block_rows=64+num_warps=4" (ints, or true/false for `bwd_fuse_k1`), and likewise
`PolynomialConfig` fields for the polynomial cases (`--poly_variants`). One JSON line
per kernel: case, variant, kernel, num_warps, num_stages, registers, spill_stores,
spill_loads, shared_bytes, wgmma and mma_sync (tensor-core instructions in the PTX: Hopper's
wgmma, or the older mma.sync that Triton falls back to for tiles under 64 rows), and the
compilers' versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

import tensorattn
from experiments import benchlib
from tensorattn import PallasConfig, PolynomialConfig
from tensorattn.kernels import lowering

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Case:
    """One call, bfloat16: `implementation="pallas"` (causal, with `windows` (w1, w2) or
    none), or the fused polynomial kernels (`PolynomialConfig(fused=True)`, Taylor degree 4,
    scale 1/H)."""

    batch: int
    t: int
    heads: int
    kv_heads: int
    head_dim: int
    windows: tuple | None = None
    causal: bool = True
    polynomial: bool = False


# Issue 10's shapes (FBGEMM's and lucidrains' benchmark cases, and full causal attention),
# and issue 14's (the polynomial method at H = Hv = 16, rank 4,845).
CASES = {
    "fb_4k_h64": Case(4, 4096, 64, 1, 128, (32, 256)),
    "fb_4k_h128": Case(4, 4096, 128, 1, 128, (32, 256)),
    "fb_16k_h64": Case(4, 16384, 64, 1, 128, (32, 512)),
    "fb_16k_h128": Case(4, 16384, 128, 1, 128, (32, 512)),
    "paper_16k_512x32": Case(1, 16384, 64, 1, 128, (512, 32)),
    "paper_16k_512x32_h128": Case(1, 16384, 128, 1, 128, (512, 32)),
    "luc_16k_d64": Case(1, 16384, 64, 1, 64, (512, 32)),
    "full_4k_h128": Case(1, 4096, 8, 2, 128),
    "poly_h16_65k": Case(1, 65536, 8, 8, 16, causal=False, polynomial=True),
    "poly_h16_65k_causal": Case(1, 65536, 8, 8, 16, polynomial=True),
}
_TRITON_CALL = "__gpu$xla.gpu.triton"


def define_flags() -> None:
    flags.DEFINE_list("cases", list(CASES), f"Cases: {', '.join(CASES)}.")
    flags.DEFINE_list("variants", ["default"], 'PallasConfig variants: "default" or f=v+...')
    flags.DEFINE_list("poly_variants", ["default"], "PolynomialConfig variants, likewise.")
    flags.DEFINE_string("out", "", "JSON lines output ('' = none).")


def variant_config(variant: str, polynomial: bool = False):
    """The kernel config of a variant: "default", or fields "name=value+name=value" of
    `PallasConfig` (or of `PolynomialConfig(fused=True, degree=4)`)."""
    fields = ({} if variant == "default" else benchlib.config_fields(variant)) | {
        "interpret": False
    }
    if polynomial:
        base = {"fused": True, "degree": 4, "on_uncertified": "ignore"}
        return PolynomialConfig.from_mapping(base | fields, prefix="variant")
    return PallasConfig.from_mapping(fields, prefix="variant")


@contextlib.contextmanager
def _triton_kernels(kernels: list):
    """Appends `{name, ttir, num_warps, num_stages}` for each Pallas Triton call lowered
    inside the context (the module text and the custom call's launch attributes)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    lower, custom_call = triton_lowering.lower_jaxpr_to_triton_module, mlir.custom_call
    modules = []

    def lower_and_keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    def call_and_keep(call_target_name, *args, backend_config=None, **kwargs):
        if call_target_name == _TRITON_CALL:
            kernels.append(
                {
                    "kernel": ir.StringAttr(backend_config["name"]).value,
                    "ttir": modules[-1],
                    "num_warps": ir.IntegerAttr(backend_config["num_warps"]).value,
                    "num_stages": ir.IntegerAttr(backend_config["num_stages"]).value,
                }
            )
        return custom_call(call_target_name, *args, backend_config=backend_config, **kwargs)

    triton_lowering.lower_jaxpr_to_triton_module = lower_and_keep
    mlir.custom_call = call_and_keep
    try:
        yield
    finally:
        triton_lowering.lower_jaxpr_to_triton_module, mlir.custom_call = lower, custom_call


def gradient_trace(case: Case, config):
    """`jax.jit(grad)` of one case's summed output (all five inputs, bfloat16) and its abstract
    arguments, ready to lower for CUDA."""
    q = jax.ShapeDtypeStruct((case.batch, case.t, case.heads, case.head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((case.batch, case.t, case.kv_heads, case.head_dim), jnp.bfloat16)
    scale = 1.0 / case.head_dim if case.polynomial else None

    def loss(q, k1, k2, v1, v2):
        out = tensorattn.tensor_attention(
            q, k1, k2, v1, v2, causal=case.causal, window=case.windows, scale=scale, config=config
        )
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=tuple(range(5)))), (q, k, k, k, k)


def lower_case(name: str, variant: str = "default") -> list[dict]:
    """The Triton kernels of one case's forward and gradient, lowered for CUDA."""
    case = CASES[name]
    grad, args = gradient_trace(case, variant_config(variant, case.polynomial))
    kernels = []
    with lowering.gpu_target(), _triton_kernels(kernels):
        grad.trace(*args).lower(lowering_platforms=("cuda",))
    return kernels


def _ptxas_candidates():
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [os.environ.get("TRITON_PTXAS_PATH"), bin_dir / "ptxas-blackwell"]
    return [str(p) for p in found + [bin_dir / "ptxas", shutil.which("ptxas")] if p]


@functools.cache
def ptxas_version(exe: str) -> str:
    """ptxas' release line, e.g. "Cuda compilation tools, release 13.0, V13.0.88"."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    return next((line for line in lines if "release" in line), lines[-1])


def _ptxas(ptx: Path) -> tuple[str, str]:
    """`(ptxas -v report, ptxas version)` from the first ptxas that takes this PTX's version."""
    errors = []
    for exe in _ptxas_candidates():
        if not Path(exe).is_file():
            continue
        cmd = [exe, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(ptx.with_suffix(".cubin"))]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode == 0:
            return run.stderr + run.stdout, ptxas_version(exe)
        errors.append(f"{exe}: {run.stderr.strip()[:200]}")
    raise RuntimeError("no ptxas took the PTX: " + "; ".join(errors))


def compile_kernel(kernel: dict, workdir: Path) -> dict:
    """Registers, spills and shared memory of one captured kernel on sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = workdir / f"{kernel['kernel']}.ttir"
    src.write_text(kernel["ttir"])
    options = {"num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"]}
    compiled = triton.compile(str(src), target=GPUTarget("cuda", 90, 32), options=options)
    ptx_text = compiled.asm["ptx"]
    ptx = src.with_suffix(".ptx")
    ptx.write_text(ptx_text)
    report, ptxas_version = _ptxas(ptx)
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not (regs and spills):
        raise RuntimeError(f"unexpected ptxas report for {kernel['kernel']}: {report}")
    return {
        "registers": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared_bytes": int(compiled.metadata.shared),
        # Tensor-core instructions: wgmma (Hopper's) or mma.sync (Ampere's, slower on Hopper;
        # Triton emits it for tiles under 64 rows).
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx_text)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx_text)),
        "triton_version": triton.__version__,
        "ptxas": ptxas_version,
    }


def report(cases, variants, poly_variants=("default",), emit=None) -> list[dict]:
    """One row per (case, variant, kernel); prints a table line per row. `variants` apply to
    the Pallas cases, `poly_variants` to the polynomial ones."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for variant in poly_variants if CASES[case].polynomial else variants:
                for kernel in lower_case(case, variant):
                    row = {"kind": "registers", "case": case, "variant": variant}
                    row |= {k: v for k, v in kernel.items() if k != "ttir"}
                    row |= compile_kernel(kernel, Path(tmp))
                    row["jax_version"] = jax.__version__
                    print(
                        f"{case:22} {variant:28} {row['kernel']:14} warps={row['num_warps']} "
                        f"regs={row['registers']:3} spills={row['spill_stores']:5}/"
                        f"{row['spill_loads']:<5} smem={row['shared_bytes']:6} "
                        f"wgmma={row['wgmma']} mma.sync={row['mma_sync']}",
                        flush=True,
                    )
                    if emit:
                        emit(row)
                    rows.append(row)
    return rows


def main(argv):
    del argv
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, no warning
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("kernel_registers needs the triton package (pip install triton)")
    unknown = [c for c in FLAGS.cases if c not in CASES]
    if unknown:
        sys.exit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    for variant in FLAGS.variants:  # bad variants fail before any compilation
        variant_config(variant)
    for variant in FLAGS.poly_variants:
        variant_config(variant, polynomial=True)
    report(
        FLAGS.cases,
        FLAGS.variants,
        FLAGS.poly_variants,
        emit=lambda row: benchlib.append_jsonl(FLAGS.out, row),
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
