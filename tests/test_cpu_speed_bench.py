"""Smoke test of benchmarks/cpu_speed.py (the --quick path, tiny budget): every variant runs,
matches the model's output, and the table/summary are produced. Speed is not asserted here
(CI machines are noisy); docs/benchmarks.md holds the measured numbers."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cpu_speed", os.path.join(ROOT, "benchmarks", "cpu_speed.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cpu_speed"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("cpu_speed", None)


def test_quick_run_covers_every_pass_and_matches_outputs(bench, capsys):
    rows = bench.main(["--quick", "--models", "dlrm_style", "--batches", "1", "3", "--seconds", "0.02"])
    assert [r.batch for r in rows] == [1, 3]
    from recopt.passes.registry import default_pipeline

    want = {"default", "all eager"} | {f"{p} only" for p in default_pipeline("cpu")}
    for r in rows:
        assert set(r.speedup) == want
        assert all(v > 0 for v in r.speedup.values()) and r.noise > 0 and r.rounds >= 5
        assert max(r.max_abs_diff.values()) < 1e-4
    out = capsys.readouterr().out
    assert "| model | batch | model ms |" in out and "noise band" in out and "default: worst" in out


def test_public_style_models_run(bench):
    import torch

    for name in ("seqrec_transformer", "dlrm_style", "din_style", "autoint_style"):
        case = bench.model_cases(20)[name]
        torch.manual_seed(0)
        model = case.build().eval()
        for b in (1, 5):
            out = model(*case.inputs(b, 0))
            assert out.shape == (b,) and torch.isfinite(out).all()


def test_cpu_clock_needs_one_thread(bench):
    with pytest.raises(SystemExit, match="--threads 1"):
        bench.run(["dlrm_style"], [1], threads=2, inductor="none", clock="cpu")


def test_site_cost_runs_and_checks_outputs(bench):
    med = bench.site_cost(repeats=2, calls=5, log=lambda s: None)
    assert set(med) == {"model ops", "lean site function", "gdpa()"} and all(v > 0 for v in med.values())
