"""Smoke runs of the examples (small sizes), as a user would run them."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, RECOPT_QUIET="1")
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_custom_pass_example():
    out = _run("examples/custom_pass.py")
    assert "fuse_silu" in out and "silu" in out


def test_demo_smoke(data_dir):
    if not os.path.isdir(os.path.join(data_dir, "ml-latest-small")):
        pytest.skip("MovieLens data not found")
    out = _run("examples/demo.py", "--models", "kunlun", "--batch", "32", "--repeats", "2", "--seq-len", "16",
               "--serve-batches", "1", "--serve-repeats", "2")
    assert "max |optimized - original|" in out and "recopt" in out
    assert "signature verified" in out and "onnxruntime" in out and "serving summary" in out


def test_pipeline_overhead_benchmark_smoke(tmp_path):
    out = _run("benchmarks/pipeline_overhead.py", "--layers", "2", "--repeats", "1", "--json", str(tmp_path / "b.json"))
    assert "total" in out


def _need_movielens(data_dir):
    if not os.path.isdir(os.path.join(data_dir, "ml-latest-small")):
        pytest.skip("MovieLens data not found")


def test_train_movielens_smoke(data_dir):
    _need_movielens(data_dir)
    out = _run("examples/train_movielens.py", "--model", "dlrm", "--max-steps", "20", "--no-progress")
    assert "AUC" in out and "NE" in out


def test_exfm_stream_smoke(data_dir):
    _need_movielens(data_dir)
    out = _run("examples/exfm_stream.py", "--smoke")
    assert "NE" in out


def test_sparse2d_train_smoke():
    pytest.importorskip("torchrec")
    out = _run("examples/sparse2d_train.py", "--data", "synthetic", "--epochs", "1", "--world-size", "2",
               "--sharding-group-size", "2")
    assert '"n"' in out
