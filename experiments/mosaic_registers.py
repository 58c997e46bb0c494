r"""Registers and spills of the Mosaic GPU kernels compiled for an H100 (sm_90a), on any host.

  pip install --no-deps --target=/tmp/jax-cuda \
      jax-cuda12-plugin==$(python -c "import jax; print(jax.__version__)") \
      jax-cuda12-pjrt==$(python -c "import jax; print(jax.__version__)")  # or cuda13
  python -m experiments.mosaic_registers --plugin_dir=/tmp/jax-cuda \
      --out=results/compile_sm90/mosaic_registers.jsonl
  python -m experiments.mosaic_registers --plugin_dir=/tmp/jax-cuda --cases=fb_4k_h64 \
      --variants=default,bwd_fuse_k1=false

Each case (issue 10's shapes, `experiments.kernel_registers.CASES`; bfloat16) is lowered for
CUDA here, forward and gradient with `MosaicGPUConfig(backward="mosaic_gpu")` plus the
variant's fields. The Mosaic GPU modules the custom calls carry are then compiled in a
subprocess by the CUDA plugin's own Mosaic GPU compiler (`MosaicGpuCompile`, what a GPU runs
on a kernel's first call), with `MOSAIC_GPU_DUMP_PTXAS` set so that it runs `ptxas -v` on
its PTX: registers per thread, spill bytes and stack per kernel. Two stand-ins let that
compiler run without a GPU: a stub CUDA driver (built here with `cc`) that reports one device
of compute capability 9.0, and an ahead-of-time XLA compile for an H100 topology first, which
initialises the plugin's NVPTX backend. Loading the compiled kernel then fails (there is no
driver), after ptxas has reported. The plugin must be the installed jax's version; `ptxas`
is `--ptxas` or the first on PATH (a GPU runs the ptxas of its CUDA install, so the counts
can differ by version). On a GPU, `MOSAIC_GPU_DUMP_PTXAS=1` makes the real compile print the
same reports (`scripts/gpu_checks.sh DIR kernels` does), and `--from_log=LOG` reads them.

Registers: ptxas reports the launch's allocation (65536 / threads per block, 168 for three
warpgroups); the compute warpgroups raise theirs with `setmaxnreg` (232 with two), and ptxas
allocates their code within that. Spill bytes are per thread, to local memory (L1, then
device memory): the number to drive to zero. One JSON line per kernel: case, variant,
kernel, registers, spill_stores, spill_loads, stack_bytes, jax and ptxas versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import benchlib, kernel_registers
from tensorattn import MosaicGPUConfig
from tensorattn.kernels import lowering, mosaic_gpu

FLAGS = flags.FLAGS
CASES = {name: case for name, case in kernel_registers.CASES.items() if not case.polynomial}

# A stand-in for the CUDA driver: the two queries the Mosaic GPU compiler makes before ptxas.
_STUB_DRIVER = r"""
typedef int CUresult;
CUresult cuInit(unsigned flags) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12080; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuCtxGetCurrent(void **c) { *c = (void *)1; return 0; }
CUresult cuDeviceGet(int *d, int ordinal) { *d = 0; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attribute, int device) {
  *v = attribute == 75 ? 9 : 0;  /* compute capability: major 9, minor 0 */
  return 0;
}
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub driver"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "stub driver"; return 0; }
"""

# An H100 for the ahead-of-time compile that initialises the plugin's NVPTX backend.
_H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
_MARK = "== mosaic_registers module "


def define_flags() -> None:
    flags.DEFINE_list("cases", list(CASES), f"Cases: {', '.join(CASES)}.")
    flags.DEFINE_list("variants", ["default"], 'MosaicGPUConfig variants: "default" or f=v+...')
    flags.DEFINE_string("plugin_dir", "", "Where jax-cuda12-plugin (or 13) is installed.")
    flags.DEFINE_string("ptxas", "", "ptxas to run ('' = the first on PATH).")
    flags.DEFINE_string(
        "nvdisasm",
        "",
        "nvdisasm for the SASS counts ('' = beside ptxas or on PATH; none: no SASS counts).",
    )
    flags.DEFINE_string("out", "", "JSON lines output ('' = none).")
    flags.DEFINE_string(
        "from_log",
        "",
        "Instead: read the ptxas reports in a GPU run's log "
        "(MOSAIC_GPU_DUMP_PTXAS=1), one row per kernel.",
    )


def variant_config(variant: str) -> MosaicGPUConfig:
    """`MosaicGPUConfig(backward="mosaic_gpu")` with a variant's fields ("default", or
    "name=value+name=value")."""
    fields = {} if variant == "default" else benchlib.config_fields(variant)
    return MosaicGPUConfig.from_mapping({"backward": "mosaic_gpu"} | fields, prefix="variant")


def lower_case(name: str, variant: str = "default") -> list[bytes]:
    """The Mosaic GPU modules (serialised, as the custom calls carry them) of one case's
    forward and gradient, lowered for CUDA."""
    from jax.experimental.mosaic.gpu import core

    grad, args = kernel_registers.gradient_trace(CASES[name], variant_config(variant))
    core.KNOWN_KERNELS.clear()  # the lowering files every module here, keyed by its hash
    no_device_check = mock.patch.object(mosaic_gpu, "_check_device", lambda cfg: None)
    with lowering.gpu_target(), no_device_check:
        grad.trace(*args).lower(lowering_platforms=("cuda",))
    return list(core.KNOWN_KERNELS.values())


def compile_modules(paths: list[str]) -> None:
    """(The subprocess.) Compiles each serialised module with the plugin's Mosaic GPU
    compiler; ptxas' report follows each marker line on stdout."""
    import ctypes

    from jax.experimental import topologies

    try:  # jax >= 0.12.1 ships its plugin for CUDA 13 only
        import jax_plugins.xla_cuda13 as plugin
    except ImportError:
        import jax_plugins.xla_cuda12 as plugin

    topology = topologies.get_topology_desc(platform="cuda", target_config=_H100, topology="1x1x1")
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=sharding)
    jax.jit(lambda a: a @ a).lower(x).compile()
    compile_ = ctypes.CDLL(plugin._get_library_path()).MosaicGpuCompile
    compile_.argtypes, compile_.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
    for path in paths:
        module = Path(path).read_bytes()
        print(_MARK + path, flush=True)
        compile_(module, len(module))  # ptxas reports, then loading fails without a driver
        sys.stdout.flush()


def _toolchain(workdir: Path, ptxas: str, nvdisasm: str | None) -> dict:
    """The subprocess' environment: the stub driver, a CUDA root holding `ptxas` (and
    `nvdisasm`, for the SASS counts)."""
    stub = workdir / "driver"
    stub.mkdir()
    (stub / "stub.c").write_text(_STUB_DRIVER)
    cc = ["cc", "-shared", "-fPIC", "-o", str(stub / "libcuda.so.1"), str(stub / "stub.c")]
    subprocess.run(cc, check=True)
    (workdir / "cuda" / "bin").mkdir(parents=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOSAIC_GPU_DUMP_PTXAS="1")
    for tool, exe in (("ptxas", ptxas), ("nvdisasm", nvdisasm)):
        if exe:
            (workdir / "cuda" / "bin" / tool).symlink_to(Path(exe).resolve())
    if nvdisasm:
        env["MOSAIC_GPU_DUMP_SASS"] = "1"
    env["CUDA_ROOT"] = env["MOSAIC_GPU_CUDA_ROOT"] = str(workdir / "cuda")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stub), env.get("LD_LIBRARY_PATH")]))
    path = [FLAGS.plugin_dir, str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    return env


def parse_report(text: str) -> dict:
    """One kernel's `ptxas -v` report (and SASS, when dumped): kernel name, registers, spill
    stores/loads and stack bytes; with SASS, `loop_spills`: local-memory loads and stores
    (`LDL`/`STL` instructions) inside the innermost loops that run wgmma, the compute
    warpgroups' main loops (spills elsewhere, e.g. in the producer or before the loops, cost
    little), and `loop_instructions`, each such loop's length in instructions (one pass: a
    first key in the forward and dQ, a streamed key in dK/dV), the CUDA cores' share."""
    row = {}
    if m := re.search(r"Compiling entry function '(\w+)'", text):
        row["kernel"] = m.group(1).removesuffix("_mosaic_gpu_kernel")
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", text):  # fmt: skip
        row |= dict(zip(("stack_bytes", "spill_stores", "spill_loads"), map(int, m.groups())))
    if m := re.search(r"Used (\d+) registers", text):
        row["registers"] = int(m.group(1))
    lines = text.splitlines()
    labels = {
        m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))
    }
    wgmma = [i for i, line in enumerate(lines) if "HGMMA" in line]
    if wgmma:  # loops: conditional backward branches around a wgmma; the innermost ones
        loops = []
        for j, line in enumerate(lines):
            m = re.search(r"@!?U?P\w* BRA `\((\.L_x_\d+)\)", line)
            t = labels.get(m.group(1), j) if m else j
            if t < j and any(t < i < j for i in wgmma):
                loops.append((t, j))
        inner = [(t, j) for t, j in loops if not any(t <= u < v <= j and (u, v) != (t, j)
                                                     for u, v in loops)]  # fmt: skip
        spill = re.compile(r"\b(LDL|STL)(\.\w+)*\s")
        row["wgmma"] = len(wgmma)
        row["loop_spills"] = sum(bool(spill.search(x)) for t, j in inner for x in lines[t:j])
        instruction = re.compile(r"/\*[0-9a-f]{4,}\*/\s+\S")
        row["loop_instructions"] = [sum(bool(instruction.search(x)) for x in lines[t:j])
                                    for t, j in inner]  # fmt: skip
    return row


def compile_case(name: str, variant: str, workdir: Path, env: dict) -> list[dict]:
    """The kernels of one case and variant, compiled: one row each."""
    modules = []
    for i, module in enumerate(lower_case(name, variant)):
        path = workdir / f"{name}.{variant}.{i}.mlirbc"
        path.write_bytes(module)
        modules.append(str(path))
    code = (
        "import sys; from experiments.mosaic_registers import compile_modules as c; c(sys.argv[1:])"
    )
    run = subprocess.run([sys.executable, "-c", code, *modules], env=env, capture_output=True,
                         text=True)  # fmt: skip
    reports = (run.stdout + run.stderr).split(_MARK)[1:]
    rows = [parse_report(text) for text in reports]
    if len(rows) != len(modules) or not all("registers" in row for row in rows):
        tail = (run.stdout + run.stderr)[-2000:]
        raise RuntimeError(f"{name}/{variant}: no ptxas report for every kernel:\n{tail}")
    meta = {"kind": "mosaic_registers", "case": name, "variant": variant}
    return [meta | row for row in rows]


def reports_in_log(text: str) -> list[dict]:
    """The ptxas reports in a GPU run's log (`MOSAIC_GPU_DUMP_PTXAS=1`), one row per kernel
    compiled, in order (no SASS there: no loop counts)."""
    parts = re.split(r"(?=ptxas info\s*: Compiling entry function)", text)[1:]
    return [parse_report(part) for part in parts]


def main(argv) -> None:
    del argv
    if FLAGS.from_log:
        for row in reports_in_log(Path(FLAGS.from_log).read_text()):
            print(json.dumps(row))
            benchlib.append_jsonl(FLAGS.out, {"kind": "mosaic_registers_gpu", **row})
        return
    if not FLAGS.plugin_dir or not Path(FLAGS.plugin_dir, "jax_plugins").is_dir():
        raise app.UsageError("--plugin_dir: install the CUDA plugin there first (see the "
                             "docstring: pip install --no-deps --target=DIR ...)")  # fmt: skip
    ptxas = FLAGS.ptxas or shutil.which("ptxas")
    if not ptxas or not Path(ptxas).is_file():
        raise app.UsageError("--ptxas: no ptxas found on PATH")
    for name in FLAGS.cases:
        if name not in CASES:
            raise app.UsageError(f"--cases: unknown {name!r}; known: {', '.join(CASES)}")
    for variant in FLAGS.variants:
        variant_config(variant)  # refuse a bad variant before any work
    nvdisasm = FLAGS.nvdisasm or shutil.which("nvdisasm", path=str(Path(ptxas).parent))
    nvdisasm = nvdisasm or shutil.which("nvdisasm")
    versions = {"jax": jax.__version__, "ptxas": kernel_registers.ptxas_version(ptxas)}
    header = f"{'case':<24}{'variant':<22}{'kernel':<30}{'regs':>5}{'spill st/ld':>14}"
    print(header + ("  loop spills" if nvdisasm else "  (no nvdisasm: no loop spill counts)"))
    with tempfile.TemporaryDirectory() as tmp:
        env = _toolchain(Path(tmp), ptxas, nvdisasm)
        for name in FLAGS.cases:
            for variant in FLAGS.variants:
                for row in compile_case(name, variant, Path(tmp), env):
                    row |= versions
                    spills = f"{row['spill_stores']}/{row['spill_loads']}"
                    loop = f"{row['loop_spills']:>13}" if "loop_spills" in row else ""
                    print(f"{name:<24}{variant:<22}{row['kernel']:<30}"
                          f"{row['registers']:>5}{spills:>14}{loop}", flush=True)  # fmt: skip
                    benchlib.append_jsonl(FLAGS.out, row)


if __name__ == "__main__":
    define_flags()
    app.run(main)
