"""ONNX export keeps the source's fully-masked-row semantics (docs/gdpa.md), run by onnxruntime.

``F.scaled_dot_product_attention`` gives 0 for a query row with every key masked; torch's own
ONNX translation softmaxes a row of -inf. GDPA's softmax modes (zero / nan / uniform) follow
the model they replaced. Each is exported and compared on inputs with such rows.
"""
import importlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

rx = importlib.import_module("recopt.export")


class SDPA(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, keep):
        if self.kind == "bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        if self.kind == "float":
            add = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=add[:, None, None, :], scale=0.3)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class GDPASoftmax(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, q, k, v, keep):
        from recopt.ops import gdpa

        return gdpa(q, k, v, activation="softmax", pre_scale=0.5, attn_mask=keep[:, None, None, :],
                    masked_rows=self.rows)


@pytest.mark.parametrize("model", [SDPA("bool"), SDPA("float"), SDPA("causal"),
                                   GDPASoftmax("zero"), GDPASoftmax("nan"), GDPASoftmax("uniform")],
                         ids=["sdpa_bool", "sdpa_float", "sdpa_causal", "gdpa_zero", "gdpa_nan", "gdpa_uniform"])
def test_fully_masked_rows_survive_onnx_export(model, tmp_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 8) for _ in range(3))
    keep = torch.tensor([[True, False, True, True], [False] * 4, [True] * 4])      # sample 1: cold start
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rx.export(model.eval(), (q, k, v, keep), path, n_random_inputs=0)
    got = rx.load(path)(q, k, v, keep)
    got = got[0] if isinstance(got, (list, tuple)) else got
    want = model(q, k, v, keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    if isinstance(model, SDPA) and model.kind != "causal":
        assert torch.equal(want[1], torch.zeros_like(want[1]))      # the source's semantics: 0
