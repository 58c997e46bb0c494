"""The benchmark harness (experiments/harness.py): points, rows, oracle, errors, statuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import harness


def _point(impl="blocked", n=12, **kw):
    fields = dict(heads=4, kv_heads=2, head_dim=8, value_dim=4)
    return harness.make_point(impl, n, **{**fields, **kw})


@pytest.mark.parametrize("masks", [{}, {"causal": True}, {"window": (3, 5), "causal": True}])
def test_oracle_matches_the_blocked_kernel(masks):
    """The float64 oracle of the harness agrees with blocked (grouped heads, Hv != H)."""
    point = _point(**masks)
    inputs = harness.make_inputs(point)
    out = np.asarray(harness.attention_fn(point)(*inputs), np.float64)
    np.testing.assert_allclose(harness.oracle(point, inputs), out, atol=2e-5)
    assert harness.result_errors(point, inputs, "oracle")[0] < 1e-4


def test_row_schema_and_a_measured_point():
    point = _point("polynomial", options={"degree": 2, "on_uncertified": "ignore"})
    point["pass"] = "fwd+grad"
    row = harness.measure(point, repeats=1, error_against="blocked")
    assert set(harness.ROW_FIELDS) <= set(row)
    assert row["status"] == "ok", row["reason"]
    assert row["median_ms"] > 0 and row["tflops"] > 0 and row["rank"] == 45
    assert 0 < row["relative_error"] < 0.2  # gradients of a degree-2 approximation
    assert row["device_kind"] and row["jax_version"]


def test_failures_are_rows():
    oom = harness.measure(_point(), repeats=1, memory_limit=1)
    assert oom["status"] == "oom" and oom["median_ms"] is None and "limit" in oom["reason"]
    bad = harness.measure(_point(options={"degree": 2}), repeats=1)  # blocked takes no degree
    assert bad["status"] == "error" and "degree" in bad["reason"]


def test_make_point_refuses_unknown_fields():
    with pytest.raises(ValueError, match="implementation"):
        harness.make_point("flash", 8)
    with pytest.raises(ValueError, match="unknown fields"):
        harness.make_point("blocked", 8, seq_len=8)
    with pytest.raises(ValueError, match="pass"):
        harness.make_point("blocked", 8, **{"pass": "fwd+bwd"})


def test_upgrade_row_reads_older_schemas():
    old = {"implementation": "blocked", "T": 64, "time_ms": 2.0, "flops_per_s": 3e12,
           "pass": "fwd+bwd", "head_dim": 8}  # fmt: skip
    row = harness.upgrade_row(old)
    assert (row["n"], row["median_ms"], row["tflops"], row["pass"]) == (64, 2.0, 3.0, "fwd+grad")
    assert row["value_dim"] == 8 and row["order"] == 3


def test_fit_slope_and_flops():
    ns = [64, 128, 256]
    assert harness.fit_slope(ns, [n**3 for n in ns]) == pytest.approx(3.0)
    p = _point(n=8, value_dim=8)
    assert harness.flops(p) == 4.0 * 8**3 * 8 * 4  # 4 query heads


def test_bench_functions_run_without_their_flags():
    from experiments import bench_kernels, bench_pallas

    row = bench_kernels.measure("blocked", 8, 4, grad=True, blocks=(8, 8, 8), repeats=1)
    assert row["status"] == "ok" and row["options"] == {
        "block_q": 8,
        "block_outer": 8,
        "block_inner": 8,
    }
    emitted = []
    rows = bench_pallas.time_case(
        "tiny", 8, 1.0, emitted.append, impls=("blocked",), bwd_impls=("blocked",), repeats=1
    )
    assert [r["pass"] for r in rows] == ["fwd", "fwd+grad"] and emitted == rows
    assert rows[1]["bwd_tflops"] > 0


def test_bench_pallas_variants():
    """Variant strings give the kernel config fields (and build valid configs)."""
    import tensorattn
    from experiments import bench_pallas

    mosaic = bench_pallas.variant_options("32:64:2:smem:nosched", "mosaic_gpu")
    assert mosaic == {
        "block_k1": 32,
        "block_k2": 64,
        "max_concurrent_steps": 2,
        "register_operands": False,
        "schedule_barrier": False,
    }
    tensorattn.MosaicGPUConfig(**mosaic)
    assert "schedule_barrier" not in bench_pallas.variant_options("32:64:2", "mosaic_gpu")
    for bad in ("32:64:2:fast", "32:64:2:smem:smem"):
        with pytest.raises(ValueError, match="block_k1:block_k2:steps"):
            bench_pallas.variant_options(bad, "mosaic_gpu")
    tensorattn.PallasConfig(**bench_pallas.variant_options("64:64:4"))
    assert bench_pallas.bwd_options("split") == {"bwd_fuse_k1": False}
    assert bench_pallas.bwd_options("default") == {}
    previous = bench_pallas.bwd_options(bench_pallas.PREVIOUS_BWD_TILES)
    assert previous == {"bwd_block_rows": 128, "bwd_block_k2": 64, "bwd_fuse_k1": False}
    for bad in ("rows", "bwd_block_rows=x", "=4"):
        with pytest.raises(ValueError, match="name=value"):
            bench_pallas.bwd_options(bad)


def test_kernel_registers_captures_the_triton_kernels():
    """The register report lowers a case for CUDA on any host and keeps each Triton kernel's
    IR and launch settings; compiling them (ptxas) needs the triton package."""
    from experiments import kernel_registers

    kernels = kernel_registers.lower_case("luc_16k_d64")
    assert [k["kernel"] for k in kernels] == ["_fwd_kernel", "_dqkv1_kernel", "_dkv2_kernel"]
    assert [k["num_warps"] for k in kernels] == [4, 8, 8]
    assert all("tt.func" in k["ttir"] for k in kernels)
    with pytest.raises(ValueError, match="takes no option variant.rows"):
        kernel_registers.variant_config("rows=64")


def test_tpu_compile_traces_its_cases_for_a_tpu():
    """The TPU compile report's cases lower to Mosaic on any host (compiling them needs
    libtpu), and a refused case says so before any work."""
    import tensorattn
    from experiments import tpu_compile
    from tensorattn.kernels import lowering

    with lowering.tpu_target():
        traced = tpu_compile.trace("g2-d5-short-masked", "gradient")
        text = traced.lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("@tpu_custom_call") == 4  # forward, dQ, dK1/dV1, dK2/dV2
        with pytest.raises(ValueError, match="float16 on TPU") as refused:
            tpu_compile.trace("g2-d64-f16", "forward")
    assert isinstance(refused.value.__cause__, tensorattn.Unsupported)


def test_mosaic_registers_lowers_and_reads_ptxas():
    """The Mosaic GPU register report lowers a case for CUDA on any host (one module per
    kernel: forward, dQ with dK1/dV1, dK2/dV2) and reads ptxas' report and the SASS; the
    compile itself needs the CUDA plugin, ptxas and a C compiler."""
    from experiments import mosaic_registers

    modules = mosaic_registers.lower_case("luc_16k_d64")
    assert len(modules) == 3 and all(isinstance(m, bytes) for m in modules)
    with pytest.raises(ValueError, match="block_k9"):
        mosaic_registers.variant_config("block_k9=64")
    report = """ptxas info : Compiling entry function 'tensor_attention_dq_mosaic_gpu_kernel'
    296 bytes stack frame, 316 bytes spill stores, 388 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers
        /*0010*/                   STL [R1+0x4], R2 ;
.L_x_3:
        /*0020*/                   LDL R2, [R1+0x4] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0040*/                   LDL.64 R4, [R1+0x8] ;
        /*0050*/              @P1 BRA `(.L_x_3) ;
        /*0060*/                   STL [R1+0xc], R2 ;
"""
    row = mosaic_registers.parse_report(report)
    assert row == {
        "kernel": "tensor_attention_dq", "stack_bytes": 296, "spill_stores": 316,
        "spill_loads": 388, "registers": 168, "wgmma": 1, "loop_spills": 2,
        "loop_instructions": [3],
    }  # fmt: skip
    # A GPU run's log (MOSAIC_GPU_DUMP_PTXAS=1): the reports among other output, in order.
    first = report.split("        /*0010*/")[0]
    log = "rows\n" + first + "table\n" + report.replace("dq", "dk2_dv2")
    rows = mosaic_registers.reports_in_log(log)
    assert [r["kernel"] for r in rows] == ["tensor_attention_dq", "tensor_attention_dk2_dv2"]
    assert "loop_spills" not in rows[0] and rows[1]["spill_stores"] == 316


def test_bench_polynomial_fused_quick_preset(tmp_path):
    """The GPU benchmark of the fused polynomial kernels runs on CPU (interpret mode) at its
    quick preset: time rows with compiled memory, then a slope row per series."""
    from experiments import bench_polynomial_fused as bench

    out = tmp_path / "rows.jsonl"
    args = ["--preset=quick", "--lengths=16,32", "--causal=1", "--passes=fwd"]
    rows, summary = bench.main(args + ["--kernels=fused", "--repeats=1", f"--out={out}"])
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["temp_bytes"] > 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["table"] for r in lines] == ["time", "time", "slope"]
    assert lines[0]["options"]["fused"] and lines[0]["pass"] == "fwd" and lines[0]["causal"]
    assert summary[0]["slope_lengths"] == [16, 32] and summary[0]["meets_targets"] is False
    args = ["--preset=quick", "--lengths=16", "--causal=0", "--kernels=xla,xla_autodiff"]
    rows, _ = bench.main(args + ["--repeats=1", "--out="])
    got = [(r["kernel"], r["pass"], r["status"], r["options"].get("gradient")) for r in rows]
    assert got == [
        ("xla", "fwd", "ok", None),
        ("xla", "fwd+grad", "ok", None),
        ("xla_autodiff", "fwd+grad", "ok", "autodiff"),
    ]
    with pytest.raises(SystemExit):
        bench.main(["--kernels=fused,flash"])


def test_kernel_registers_compiles_with_triton(tmp_path):
    """With the triton package (GPU machines have it): registers and spills from ptxas."""
    pytest.importorskip("triton")
    from experiments import kernel_registers

    kernel = kernel_registers.lower_case("luc_16k_d64")
    row = kernel_registers.compile_kernel(kernel[0], tmp_path)
    assert 0 < row["registers"] <= 255 and row["spill_stores"] >= 0 and row["wgmma"] > 0


def test_bench_polynomial_says_where_the_rank_is_too_wide(tmp_path, monkeypatch, capsys):
    """Issue 14's wide-head run: degrees whose feature rank is over `polynomial.MAX_RANK`
    (here lowered to 100: H=8 has rank 45 at degree 2, 165 at degree 3) are named in the
    degree search and the crossover table instead of failing the benchmark."""
    from experiments import bench_polynomial as bench
    from tensorattn.kernels import polynomial

    monkeypatch.setattr(polynomial, "MAX_RANK", 100)
    too_wide = polynomial.rank_over_limit
    assert too_wide(8, 2) is None and too_wide(8, 3).endswith("165 > 100")
    out = str(tmp_path / "rows.jsonl")
    measured, _ = bench.pick_degree(8, False, 1e-12, out, {})  # unreachable by degrees 1-2
    assert measured is None

    def row(n, pass_, status="ok", ms=None):
        return {"n": n, "pass": pass_, "status": status, "median_ms": ms}

    exact = [row(n, p, ms=n**3 / 1e6) for n in (256, 512, 1024) for p in harness.PASSES]
    poly = [row(n, "fwd", ms=n / 10) for n in (256, 512, 1024)]  # faster from n ~ 316
    poly += [row(256, "fwd+grad", ms=100.0), row(512, "fwd+grad", "oom")]
    bench.crossover([("degree 2", 2, poly), ("degree 3", 3, [])], exact, out, {}, 1.0, 8)
    lines = [json.loads(line) for line in open(out)][1:]
    assert [(r["degree"], r["pass"], r["crossover_n"], r["note"]) for r in lines] == [
        (2, "fwd", 316, None),
        (2, "fwd+grad", None, "oom from n=512"),
        (3, "fwd", None, "rank C(8+3, 3) = 165 > 100"),
        (3, "fwd+grad", None, "rank C(8+3, 3) = 165 > 100"),
    ]
    assert "165 > 100" in capsys.readouterr().out
    # A cut run's rows: the table again from them.
    common = {"entry_bound": 1.0, "head_dim": 8}
    rows = [dict(r, table="exact", **common) for r in exact]
    rows += [dict(r, table="time", options={"degree": 2}, **common) for r in poly]
    bench.crossover_from_rows(rows)
    assert "oom from n=512" in capsys.readouterr().out
