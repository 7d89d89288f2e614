"""benchmarks/fp8_bench.py: the CPU dry run of run_suite (what gpu_suite calls) and the target checks."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fp8_bench", os.path.join(ROOT, "benchmarks", "fp8_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_suite_dry_run_on_cpu(bench):
    rows = bench.run_suite("cpu", dry_run=True)
    sites = [r for r in rows if r["kind"] == "site"]
    towers = [r for r in rows if r["kind"] == "tower"]
    assert {tuple(r["shape"]) for r in sites} == set(bench.TINY_SHAPES)
    assert {r["mode"] for r in sites} == {"inference", "training"} == {r["mode"] for r in towers}
    for r in sites:
        t = r["recopt:rowwise"]
        assert t["bf16_s"] > 0 and t["fp8_s"] > 0 and t["speedup"] == pytest.approx(t["bf16_s"] / t["fp8_s"])
        assert r["chosen"] in ("bf16", "recopt:rowwise") and r["dry_run"] is True
    for r in towers:
        assert r["bf16_compiled_s"] > 0 and r["recopt_fp8_s"] > 0 and r["dry_run"] is True


def test_check_targets_reads_measured_rows(bench):
    rows = [
        {"kind": "tower", "mode": "inference", "d": 4096, "speedup": 1.35, "fp8_sites": [("l", "recopt", "m")]},
        {"kind": "tower", "mode": "inference", "d": 1024, "speedup": 0.98, "fp8_sites": []},
        {"kind": "tower", "mode": "training", "d": 4096, "speedup": 1.1, "fp8_sites": [("l", "recopt", "m")]},
        {"kind": "site", "shape": [4096, 256, 256], "mode": "inference", "chosen": "bf16", "chosen_speedup": 1.0},
        {"kind": "site", "shape": [16384, 512, 512], "mode": "training", "chosen": "recopt:rowwise",
         "chosen_speedup": 0.9},
    ]
    v = bench.check_targets(rows)
    assert "tower d=4096 inference: 1.35× (target ≥ 1.3×): met" in v
    assert any(s.startswith("tower d=1024 inference") and s.endswith(": met") for s in v)  # FP8 not chosen
    assert "tower d=4096 training: 1.10× (target ≥ 1.2×): NOT met" in v
    assert "site 4096×256×256 inference: stays bf16" in v
    assert any("slower than bf16" in s for s in v)


def test_run_suite_refuses_cuda_without_a_gpu(bench):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="dry_run=True"):
        bench.run_suite("cuda")
