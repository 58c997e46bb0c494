"""experiments.gpu_targets on synthetic rows: speed-ups, shares of the matmul rate, the
backward's rate from the time beyond the forward, and targets without rows."""

import json

from experiments import gpu_targets


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut by a kil')


def _time(case, pass_, ms, tflops=None, impl="tensorattn"):
    return dict(kind="time", case=case, impl=impl, **{"pass": pass_}, ms=ms, tflops=tflops)


def test_targets_from_a_run(tmp_path):
    _write(
        tmp_path / "peers_torch.jsonl",
        [
            _time("fb_4k_h64", "fwd", 2.0, impl="fbgemm_triton"),
            _time("paper_16k_512x32", "fwd", 3.0, impl="fbgemm_triton"),
            _time("luc_16k_d64", "fwd+bwd", 9.0, impl="lucidrains_triton"),
        ],
    )
    ours = [
        {"kind": "matmul", "tflops": 500.0},
        _time("fb_4k_h64", "fwd", 1.0, 100.0),
        _time("paper_16k_512x32", "fwd", 2.0, 100.0),
        _time("paper_16k_512x32", "fwd+bwd", 4.0, 87.5),
        _time("paper_16k_512x32_h128", "fwd", 1.0, 300.0),
        _time("luc_16k_d64", "fwd+bwd", 2.0, 50.0),
    ]
    _write(tmp_path / "tensorattn_jax.jsonl", ours)
    _write(
        tmp_path / "bench_pallas.jsonl",
        [
            dict(kind="time", case="full4096", head_dim=128, variant="default", status="ok",
                 implementation="pallas", frac_matmul=0.4, **{"pass": "fwd"}),
            dict(kind="time", case="full4096", head_dim=128, variant="default", status="ok",
                 implementation="pallas", bwd_layout="default", bwd_frac_matmul=0.4,
                 **{"pass": "fwd+grad"}),
            dict(kind="time", case="full4096", head_dim=64, variant="default", status="ok",
                 implementation="pallas", frac_matmul=0.9, **{"pass": "fwd"}),
        ],
    )  # fmt: skip
    got = {(r["run"], r["target"], r["case"]): r for r in gpu_targets.check(str(tmp_path))}
    fb = got["default", "fwd speed-up over FBGEMM", "fb_4k_h64"]
    assert fb["measured"] == 2.0 and fb["threshold"] == 1.0 and fb["met"]
    paper = got["default", "fwd speed-up over FBGEMM", "paper_16k_512x32"]
    assert paper["measured"] == 1.5 and paper["threshold"] == 1.5 and paper["met"]
    assert got["default", "fwd share of matmul", "paper_16k_512x32_h128"]["measured"] == 0.6
    assert got["default", "fwd+bwd speed-up over lucidrains", "luc_16k_d64"]["measured"] == 4.5
    # forward: 100 TFLOP/s for 2 ms = 2e11 FLOP; backward 2.5x that in the 2 ms beyond it.
    bwd = got["default", "bwd share of matmul", "paper_16k_512x32"]
    assert abs(bwd["measured"] - 250.0 / 500.0) < 1e-9 and bwd["met"]
    assert not got["pallas", "fwd share of matmul", "full4096_h128"]["met"]
    assert got["pallas", "bwd share of matmul (default)", "full4096_h128"]["met"]
    # Every target is listed, measured or not (None); no mosaic_gpu/ run: no peer targets of it.
    fbgemm = [case for run, target, case in got if target == "fwd speed-up over FBGEMM"]
    assert fbgemm == list(gpu_targets.FORWARD_CASES)
    assert got["default", "fwd speed-up over FBGEMM", "fb_16k_h64"]["met"] is None
    assert not any(run == "mosaic_gpu" and "FBGEMM" in target for run, target, _ in got)
    assert got["mosaic_gpu", "fwd share of matmul", "full4096_h128"]["measured"] is None
    # A run repeated into the same folder: its last rows count.
    _write(tmp_path / "tensorattn_jax.jsonl", ours + [_time("fb_4k_h64", "fwd", 4.0, 25.0)])
    rows = gpu_targets.check(str(tmp_path))
    (fb,) = [r for r in rows if r["run"] == "default" and r["case"] == "fb_4k_h64"]
    assert fb["measured"] == 0.5 and not fb["met"]
    (tmp_path / "peers_torch.jsonl").unlink()
    rows = gpu_targets.check(str(tmp_path))
    assert [r["met"] for r in rows if r["target"].startswith("fwd+bwd")] == [None]


def test_choices_name_the_fastest_configuration_and_the_defaults_gap(tmp_path, capsys):
    def bench(impl, variant, pass_, ms, layout=None, status="ok"):
        row = dict(kind="time", case="group64", head_dim=128, implementation=impl,
                   variant=variant, status=status, median_ms=ms, **{"pass": pass_})  # fmt: skip
        return row | ({} if layout is None else {"bwd_layout": layout})

    rows = [
        {"kind": "matmul", "tflops": 500.0},
        bench("pallas", "default", "fwd", 4.0),
        bench("pallas", "64:64:4", "fwd", 3.0),
        bench("mosaic_gpu", "default", "fwd", 2.0),
        bench("mosaic_gpu", "32:128:2", "fwd", 1.0, status="error"),  # failed: not a choice
        bench("pallas", "default", "fwd+grad", 9.0, layout="default"),
        bench("pallas", "default", "fwd+grad", 8.0, layout="split"),
        bench("pallas", "default", "fwd+grad", 10.0, layout="fused"),
        bench("pallas", "default", "fwd+grad", 12.0, layout="default"),  # a rerun: the last row
    ]
    _write(tmp_path / "bench_pallas.jsonl", rows)
    _write(tmp_path / "tensorattn_jax.jsonl", [_time("fb_4k_h64", "fwd", 2.0, 100.0)])
    _write(tmp_path / "mosaic_gpu" / "tensorattn_jax.jsonl", [_time("fb_4k_h64", "fwd", 1.0)])
    got = {(r["source"], r["case"], r["pass"]): r for r in gpu_targets.choices(
        gpu_targets._read(tmp_path, "bench_pallas.jsonl"),
        {run: gpu_targets._read(tmp_path, name) for run, name in gpu_targets.RUNS.items()},
    )}  # fmt: skip
    fwd = got["bench_pallas", "group64", "fwd"]
    assert (fwd["fastest"], fwd["default_ms"], fwd["default_over_fastest"]) == (
        "mosaic_gpu default", 4.0, 2.0)  # fmt: skip
    both = got["bench_pallas", "group64", "fwd+grad"]
    assert both["fastest"] == "pallas default split" and both["default_over_fastest"] == 1.5
    peers = got["peers harness", "fb_4k_h64", "fwd"]
    assert peers["fastest"] == "mosaic_gpu" and peers["default_over_fastest"] == 2.0
    gpu_targets.main([f"--dir={tmp_path}"])
    printed = capsys.readouterr().out.splitlines()
    assert any("mosaic_gpu default" in line for line in printed)
    assert printed[-1].endswith("not measured)")  # gpu_checks.sh reads the last line
