"""examples/serve_onnx.py scores a MovieLens batch with onnxruntime alone (no recopt, no torch)."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "serve_onnx.py")


def test_save_batch_npz_roundtrip(tmp_path):
    import torch

    from recopt.export.serving import save_batch_npz

    x = (torch.randn(3, 2), torch.arange(6).reshape(3, 2))
    path = save_batch_npz(str(tmp_path / "b.npz"), x, ["a", "b"], labels=torch.tensor([1.0, 0.0, 1.0]))
    z = np.load(path)
    assert sorted(z.files) == ["a", "b", "labels"] and z["b"].dtype == np.int64
    with pytest.raises(ValueError, match="2 inputs but 1 names"):
        save_batch_npz(str(tmp_path / "c.npz"), x, ["a"])


def test_serve_example_runs_without_torch(tmp_path, data_dir):
    if not os.path.isdir(os.path.join(data_dir, "ml-latest-small")):
        pytest.skip("ml-latest-small not available")
    from recopt.export.serving import prepare_movielens_demo

    out = prepare_movielens_demo(str(tmp_path), data_dir=data_dir, model="dlrm", batch_size=64, train_steps=0)
    assert out["manifest"]["parity"]["runs"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, EXAMPLE, "serve", "--model", out["model"], "--batch", out["batch"]],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "scored     64 examples" in proc.stdout
    assert "AUC" in proc.stdout and "provider   CPUExecutionProvider" in proc.stdout
    assert "torch imported: False" in proc.stdout
    # The served scores are the PyTorch model's.
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    try:
        import serve_onnx
    finally:
        sys.path.pop(0)
    served = serve_onnx._serve(out["model"], out["batch"])
    probs = 1 / (1 + np.exp(-out["torch_logits"]))
    np.testing.assert_allclose(served["probs"], probs, rtol=1e-4, atol=1e-6)
