"""Each recopt ONNX translation against its PyTorch reference, run by onnxruntime.

Small models of our own that call the ops directly, exported with
``recopt.export`` (which itself checks parity on the example inputs and on
fresh inputs with other dynamic sizes); the tests then also compare on
hand-written edge cases.
"""
import importlib

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

rx = importlib.import_module("recopt.export")  # noqa: E402  the package, even if recopt.export is the function


def _ops(path):
    """Op types in the graph and inside its model-local functions."""
    import onnx

    model = onnx.load(path)
    return {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}


def _functions(path):
    import onnx

    return sorted(f.name for f in onnx.load(path).functions)


# ----------------------------------------------------------------------------- embedding bags


class Bags(nn.Module):
    """Every embedding-bag spelling in one model: sum / mean / max, padding_idx,
    per-sample weights, and functional F.embedding_bag with include_last_offset."""

    def __init__(self):
        super().__init__()
        self.sum = nn.EmbeddingBag(20, 6, mode="sum")
        self.mean = nn.EmbeddingBag(20, 6, mode="mean", padding_idx=3)
        self.max = nn.EmbeddingBag(20, 6, mode="max")
        self.weighted = nn.EmbeddingBag(20, 6, mode="sum", padding_idx=0)
        self.table = nn.Parameter(torch.randn(20, 6))

    def forward(self, indices, offsets, weights):
        last = torch.cat([offsets, indices.shape[0] + torch.zeros_like(offsets[:1])])
        return (self.sum(indices, offsets), self.mean(indices, offsets), self.max(indices, offsets),
                self.weighted(indices, offsets, per_sample_weights=weights),
                torch.nn.functional.embedding_bag(indices, self.table, last, mode="mean", include_last_offset=True))


def test_embedding_bag_translation_has_no_sequence_ops(tmp_path):
    model = Bags().eval()
    indices = torch.tensor([1, 3, 0, 5, 7, 3, 3, 9, 2])
    offsets = torch.tensor([0, 2, 2, 6])          # bag 1 is empty, bag 3 is the tail
    weights = torch.rand(9) + 0.5
    path = str(tmp_path / "bags.onnx")
    # Random parity inputs would break the offsets' structure: pass valid sets explicitly.
    other = (torch.tensor([4, 4, 0, 19, 8]), torch.tensor([0, 1, 1, 1, 3]), torch.rand(5))
    res = rx.export(model, (indices, offsets, weights), path, dynamic_dims={"indices": [0], "weights": [0]},
                    n_random_inputs=0, parity_inputs=[other])
    ops = _ops(path)
    assert not ops & set(rx.onnx_export.SEQUENCE_OPS) and "Loop" not in ops
    assert {"Gather", "ReduceSum", "ReduceMax"} <= ops
    assert all("Gather" in text for op, text in res.manifest["lowerings"].items() if "embedding_bag" in op)
    assert [o["name"] for o in res.manifest["outputs"]] == [f"output_{i}" for i in range(5)]
    sess = rx.load(path)
    for args in ((indices, offsets, weights), other):
        for got, want in zip(sess(*args), model(*args)):
            np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GDPA


gdpa_mod = pytest.importorskip("recopt.ops")


GDPA_CASES = [
    dict(activation="raw"),
    dict(activation="gelu_tanh", qk_scale=0.25, pre_scale=0.5, window=2),
    dict(activation="silu", window=0),
    dict(activation="gelu"), dict(activation="relu_square", qk_scale=0.1), dict(activation="leaky_relu"),
    dict(activation="hardswish", pre_scale=2.0), dict(activation="relu"),
]


class DenseGDPA(nn.Module):
    """One GDPA call per case in GDPA_CASES (GQA: 4 query heads over 2 K/V heads)."""

    def forward(self, q, k, v, q_len, kv_len):
        return tuple(gdpa_mod.gdpa(q, k, v, q_lengths=q_len, kv_lengths=kv_len, **kw) for kw in GDPA_CASES)


def test_gdpa_translation_matches_reference(tmp_path):
    from recopt.ops.gdpa_ref import gdpa_ref

    B, H, Hkv, Tq, Tk, d = 3, 4, 2, 5, 7, 8
    q, k, v = torch.randn(B, H, Tq, d), torch.randn(B, Hkv, Tk, d), torch.randn(B, Hkv, Tk, d)
    q_len, kv_len = torch.tensor([5, 2, 0]), torch.tensor([7, 3, 1])
    path = str(tmp_path / "gdpa.onnx")
    dims = {"q": {2: "tq"}, "k": {2: "tk"}, "v": {2: "tk"}}
    res = rx.export(DenseGDPA(), (q, k, v, q_len, kv_len), path, dynamic_dims=dims, n_random_inputs=1,
                    parity_inputs=[(torch.randn(2, H, 3, d), torch.randn(2, Hkv, 4, d), torch.randn(2, Hkv, 4, d),
                                    torch.tensor([3, 1]), torch.tensor([4, 0]))])
    assert set(res.manifest["dynamic_dims"]) == {"batch", "tq", "tk"}
    ops = _ops(path)
    assert {"MatMul", "Where", "Tanh", "Erf", "Sigmoid", "LeakyRelu", "HardSwish"} <= ops
    # One model-local ONNX function per GDPA call site.
    assert _functions(path) == sorted(f"GDPA_{i}" for i in range(len(GDPA_CASES)))
    assert "ONNX function recopt::GDPA" in res.manifest["lowerings"]["recopt.gdpa.default"]
    got = rx.load(path)(q, k, v, q_len, kv_len)
    for g, kw in zip(got, GDPA_CASES):
        want = gdpa_ref(q, k, v, q_len, kv_len, kw.get("activation"), kw.get("qk_scale", 1.0),
                        kw.get("pre_scale", 1.0), kw.get("window", -1))
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


def test_gdpa_jagged_translation(tmp_path):
    from recopt.ops.gdpa_ref import gdpa_jagged_ref

    H, d = 2, 4
    q_off, kv_off = torch.tensor([0, 3, 3, 7]), torch.tensor([0, 2, 6, 8])
    q, k, v = torch.randn(7, H, d), torch.randn(8, H, d), torch.randn(8, H, d)

    class M(nn.Module):
        def forward(self, q, k, v, qo, ko):
            return gdpa_mod.gdpa_jagged(q, k, v, qo, ko, 3, 4, activation="gelu_tanh", window=1)

    path = str(tmp_path / "jagged.onnx")
    rx.export(M(), (q, k, v, q_off, kv_off), path, dynamic_batch=False, n_random_inputs=0)
    got = rx.load(path)(q, k, v, q_off, kv_off)[0]
    want = gdpa_jagged_ref(q, k, v, q_off, kv_off, 3, 4, "gelu_tanh", 1.0, 1.0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- FP8 linear


fp8_linear_mod = pytest.importorskip("recopt.fp8.linear")


class FP8Net(nn.Module):
    """One FP8 linear per forward recipe (dims not multiples of 128, to cover ragged blocks)."""

    def __init__(self):
        super().__init__()
        self.t = fp8_linear_mod.FP8Linear(160, 136, recipes={"forward": "tensorwise"})
        self.r = fp8_linear_mod.FP8Linear(136, 72, recipes={"forward": "rowwise"})
        self.b = fp8_linear_mod.FP8Linear(72, 130, recipes={"forward": "blockwise"})
        self.h = fp8_linear_mod.FP8Linear(130, 3, recipes={"forward": "bf16"})

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.r(torch.relu(self.t(x)))))))


@pytest.mark.parametrize("opset,expect", [(None, "QuantizeLinear"), (19, "Cast"), (18, "Round")])
def test_fp8_linear_translation_is_exact(tmp_path, opset, expect):
    model = FP8Net().eval()
    x = torch.randn(4, 5, 160) * 3
    path = str(tmp_path / "fp8.onnx")
    res = rx.export(model, (x,), path, opset=opset, n_random_inputs=1)
    assert expect in _ops(path)
    assert _functions(path) == ["FP8Linear_0", "FP8Linear_1", "FP8Linear_2", "FP8Linear_3"]
    assert res.manifest["onnx_opset"] == (opset or 21)
    assert "recopt.fp8_linear.default" in res.manifest["lowerings"]
    got = rx.load(path)(x)[0]
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)
    if opset is None:
        import onnx

        q_types = {a.i for f in onnx.load(path).functions for n in f.node if n.op_type == "QuantizeLinear"
                   for a in n.attribute if a.name == "output_dtype"}
        assert q_types == {onnx.TensorProto.FLOAT8E4M3FN}


# ----------------------------------------------------------------------------- no translation


def _untranslatable_lib():
    lib_op = getattr(getattr(torch.ops, "recopt_test", None), "mystery", None)
    if lib_op is None:
        @torch.library.custom_op("recopt_test::mystery", mutates_args=())
        def mystery(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @mystery.register_fake
        def _(x):
            return torch.empty_like(x)
    return torch.ops.recopt_test.mystery


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return torch.ops.recopt_test.mystery(self.lin(x))  # the line the error must name


def test_untranslated_op_fails_with_name_line_and_fix(tmp_path):
    _untranslatable_lib()
    with pytest.raises(rx.ExportError) as ei:
        rx.export(Mystery(), (torch.randn(2, 3),), str(tmp_path / "m.onnx"))
    msg = str(ei.value)
    assert "recopt_test.mystery" in msg
    assert "test_export_translations.py" in msg and "the line the error must name" in msg
    assert "register_translation" in msg and "format='pt2'" in msg


def test_registered_translation_is_used(tmp_path):
    _untranslatable_lib()
    from onnxscript import opset18 as op

    def mystery_onnx(x):
        return op.Mul(x, op.Constant(value_float=2.0))

    rx.register_translation(torch.ops.recopt_test.mystery.default, mystery_onnx, replace=True)
    try:
        res = rx.export(Mystery(), (torch.randn(2, 3),), str(tmp_path / "m.onnx"))
        assert "user translation" in res.manifest["lowerings"]["recopt_test.mystery.default"]
    finally:
        rx.translations._USER_TRANSLATIONS.pop(torch.ops.recopt_test.mystery.default, None)


@pytest.mark.parametrize("fmt,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_float8_rounding_emulation_matches_torch_cast(fmt, dtype):
    """The opset<19 lowering rounds to the float8 grid with float arithmetic: it must equal the cast,
    across magnitudes (subnormals to saturation) and on ties."""
    from recopt.export import fp8_translation as F

    F.set_opset(18)
    m = F.FP8_MAX[fmt]
    g = np.random.default_rng(0)
    x = np.concatenate([g.standard_normal(20000).astype(np.float32) * s for s in (1e-4, 1e-2, 1.0, 30.0, 1e3)])
    edges = [0.0, -0.0, m, -m, 1.1 * m, -1e9, 2.0**-9, 2.0**-10, 3 * 2.0**-11, 1.0625, 1.1875, 17.0, 2.0**-16,
             2.0**-17, 3 * 2.0**-18, 0.875, 1.125]
    x = np.concatenate([x, np.array(edges, np.float32)])
    got = F._round_to_fp8(x, fmt).value
    want = torch.from_numpy(x).clamp(-m, m).to(dtype).float().numpy()
    np.testing.assert_array_equal(got, want)
