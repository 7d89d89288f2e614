"""benchmarks/gpu_suite.py's softmax section on the CPU (TRITON_INTERPRET=1): the dry run's
correctness cases run the kernels and pass at small shapes, every timing variant runs once,
and the markdown names the section's result."""
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gdpa_bench as GB  # noqa: E402
import gpu_suite as G  # noqa: E402


def test_dry_run_checks_the_softmax_kernels_on_cpu():
    """--dry-run under TRITON_INTERPRET=1 runs the small correctness cases (no timing)."""
    rep = G.run_suite(["softmax"], "cpu", dry_run=True, quick=True, batch=2, steps=1)
    sec = rep["sections"]["softmax"]
    assert sec["planned"] and len(sec["cpu_check"]) == 3
    assert all(v["ok"] for v in sec["cpu_check"].values()), sec["cpu_check"]


def test_softmax_timing_runs_every_variant(monkeypatch):
    calls = []

    def once(fn, grad_tensors=(), cuda=True):   # run each variant once instead of timing it
        fn()
        calls.append(1)
        return 1.0

    monkeypatch.setattr(GB, "_bench", once)
    monkeypatch.setattr(G, "softmax_correctness", lambda device, small=False: {"c": {"ok": True, "rel": 0.0,
                                                                                       "tol": 1e-5}})
    res = G.softmax_section("cpu", time.time() + 600, small=True)
    rows = res["timing"]["cpu_smoke"]["rows"]
    assert set(rows) == {"recopt_kernel_lengths", "recopt_kernel_float_mask", "sdpa_flash_padded_no_mask",
                         "sdpa_bool_mask", "model_math_float_mask"}
    assert all(r == {"fwd_ms": 1.0, "fwd_bwd_ms": 1.0} for r in rows.values()), rows
    assert len(calls) == 10
    md = "\n".join(G._softmax_markdown(res))
    assert "1/1 softmax cases within tolerance" in md and "| cpu_smoke | recopt_kernel_lengths | 1.000 |" in md


def test_softmax_timing_is_skipped_when_correctness_fails(monkeypatch):
    monkeypatch.setattr(G, "softmax_correctness", lambda device, small=False: {"x": {"ok": False}})
    res = G.softmax_section("cpu", time.time() + 10, small=True)
    assert "correctness failed" in res["timing"]["skipped"]
    assert "timing skipped" in "\n".join(G._softmax_markdown(res))
