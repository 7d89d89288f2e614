"""The CPU-safe parts of benchmarks/gpu_suite.py: arguments, dry run, report
writing, section isolation, and no torchrec import (the GPU image has none)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite as G  # noqa: E402


def test_dry_run_writes_json_and_markdown_without_torchrec(tmp_path):
    code = (
        "import sys; sys.modules['torchrec'] = None; sys.modules['fbgemm_gpu'] = None\n"
        "sys.argv = ['gpu_suite.py', '--dry-run', '--out', sys.argv[1], '--md', sys.argv[2]]\n"
        "sys.path.insert(0, 'benchmarks'); import gpu_suite; rc = gpu_suite.main()\n"
        "assert 'torchrec' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(rc)\n"
    )
    out, md = tmp_path / "s.json", tmp_path / "s.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, str(out), str(md)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["dry_run"] is True and list(rep["sections"]) == list(G.SECTIONS)
    assert all(s["planned"] for s in rep["sections"].values())
    assert "torch" in rep["environment"] and "date" in rep["environment"]
    assert "DRY RUN" in md.read_text()


def test_unknown_section_and_missing_gpu_are_argument_errors(capsys):
    with pytest.raises(SystemExit):
        G.main(["--sections", "nope", "--dry-run"])
    assert "unknown sections" in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            G.main(["--sections", "correctness"])
        assert "--dry-run" in capsys.readouterr().err


def test_a_failing_section_is_recorded_and_the_next_runs(monkeypatch):
    def boom(device, small=False):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(G, "correctness", boom)
    monkeypatch.setattr(G, "fp8_section", lambda device, deadline: {"rows": [1, 2]})
    rep = G.run_suite(["correctness", "fp8"], "cpu", dry_run=False, quick=True, batch=2, steps=1)
    assert "kernel exploded" in rep["sections"]["correctness"]["error"]
    assert rep["sections"]["fp8"]["result"] == {"rows": [1, 2]}
    md = G.markdown(rep)
    assert "FAILED: RuntimeError: kernel exploded" in md and "## fp8" in md


def test_markdown_tables_for_correctness_and_gdpa():
    rep = {"environment": {"card": "H100", "date": "d", "torch": "t", "triton": "3.6.0", "cuda": "12"},
           "sections": {
               "correctness": {"result": {"gdpa/dense/gelu/bf16": {"rel": 1e-3, "tol": 2e-2, "ok": True},
                                          "fp8/x": {"error": "E", "ok": False}}, "seconds": 1},
               "gdpa": {"result": {"pffn": {"rows": {"gdpa": {"fwd_ms": 1.5, "fwd_bwd_ms": 8.0},
                                                     "compile": {"error": "x"}}}}, "seconds": 2}}}
    md = G.markdown(rep)
    assert "1/2 cases within tolerance" in md and "**NO**" in md
    assert "| pffn | gdpa | 1.500 | 8.000 |" in md


def test_section_budgets_fit_the_six_minute_gpu_slot():
    # Every section has a budget, and together they leave room for a compile overrunning
    # its section inside the 6 minutes one device command gets.
    assert set(G.BUDGET_S) == set(G.SECTIONS)
    assert sum(G.BUDGET_S.values()) <= G.TOTAL_BUDGET_S <= 330.0
