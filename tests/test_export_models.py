"""recopt's models, optimized, exported to ONNX and pt2 with parity (the issue's "done when")."""
import importlib

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import recopt  # noqa: E402
rx = importlib.import_module("recopt.export")  # noqa: E402  the package, even if recopt.export is the function
from recopt.data import FeatureSpec, example_batch  # noqa: E402
from recopt.models import build_model  # noqa: E402

SPEC = FeatureSpec(n_dense=3, sparse_cardinalities=(50, 40, 7), seq_feature_tables=(1, 2), max_seq_len=6,
                   event_names=("liked", "not_liked"))
SMALL = {"interformer": dict(n_layers=1), "kunlun": dict(), "dlrm": dict()}


@pytest.fixture(scope="module", params=sorted(SMALL))
def optimized(request):
    name = request.param
    torch.manual_seed(0)
    model = build_model(name, SPEC, **SMALL[name]).eval()
    args = example_batch(SPEC, 5).inputs()
    # cpu_sites="all": on the cpu target gdpa would leave Kunlun's sites alone (not_faster_on_target);
    # this test exports them, so it asks for every site.
    opt = recopt.optimize(model, args, target="cpu", backend="eager", configs={"gdpa": {"cpu_sites": "all"}})
    return name, opt, args


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_optimized_model_exports_with_parity(tmp_path, optimized, fmt):
    name, opt, args = optimized
    path = str(tmp_path / f"{name}.{fmt}")
    res = rx.export(opt, args, path)
    m = res.manifest
    assert m["format"] == fmt and m["torch_version"] == torch.__version__
    assert m["target"]["name"] == "cpu"
    assert [p["name"] for p in m["passes"]] == [p.name for p in opt.report.passes]
    assert [i["name"] for i in m["inputs"]] == ["dense", "sparse_ids", "seq_ids", "seq_lengths", "seq_times"]
    assert m["inputs"][2]["shape"] == ["batch", 2, "seq", 2]
    assert m["outputs"][0]["shape"] == ["batch"]
    assert {"batch", "seq"} <= set(m["dynamic_dims"])
    labels = [r["label"] for r in m["parity"]["runs"]]
    assert labels[0] == "the example inputs" and len(labels) == 3
    assert all(r["rel"] <= 1e-4 for r in m["parity"]["runs"])
    assert len(m["checksums"]["weights_sha256"]) == 64
    loaded = rx.load(path)
    assert loaded.manifest == rx.read_manifest(path)
    big = example_batch(SPEC, 17, seq_len=9, seed=5).inputs()
    with torch.no_grad():
        want = opt.original(*big)  # the unoptimized model: exact passes keep its function
    torch.testing.assert_close(torch.as_tensor(loaded(*big)[0]), want, rtol=1e-4, atol=1e-5)
    if fmt == "onnx":
        import onnx

        model = onnx.load(path)
        ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
        assert not ops & set(rx.onnx_export.SEQUENCE_OPS)
        if name == "dlrm":
            assert any("embedding_bag" in k for k in m["lowerings"])
        if name != "dlrm":
            assert opt.report.pass_run("gdpa").status == "applied"
            assert "recopt.gdpa.default" in m["lowerings"]


def test_torchrec_dlrm_exports_to_onnx_without_sequence_ops(tmp_path):
    pytest.importorskip("torchrec")
    import onnx

    torch.manual_seed(0)
    model = build_model("dlrm_torchrec", SPEC).eval()
    args = example_batch(SPEC, 5).inputs()
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    path = str(tmp_path / "trec.onnx")
    res = rx.export(opt, args, path)
    assert "fbgemm.asynchronous_complete_cumsum.default" in res.manifest["lowerings"]
    assert all(r["rel"] <= 1e-4 for r in res.manifest["parity"]["runs"])
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & set(rx.onnx_export.SEQUENCE_OPS) and "Loop" not in ops


def test_fp8_pass_output_exports_with_qdq(tmp_path):
    """A graph rewritten by the fp8 pass (LoKA) keeps its FP8 linears in ONNX as Q/DQ around MatMul."""
    import onnx

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 1)).eval()
    x = torch.randn(128, 64)
    opt = recopt.optimize(model, (x,), target="h100", passes=["fp8"], backend="eager",
                          configs={"fp8": {"ignore_speed": True, "mode": "inference"}})
    if not opt.report.sites_for("fp8", "rewritten"):
        pytest.skip("the fp8 pass rewrote no site in this checkout")
    path = str(tmp_path / "fp8.onnx")
    res = rx.export(opt, (x,), path)
    assert res.manifest["onnx_opset"] == 21
    assert "QuantizeLinear" in res.manifest["lowerings"]["recopt.fp8_linear.default"]
    m = onnx.load(path)
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= {n.op_type for f in m.functions for n in f.node}
    assert res.manifest["parity"]["rtol"] == 1e-2 and "float8" in res.manifest["parity"]["rtol_reason"]
    assert all(r["rel"] <= 1e-2 for r in res.manifest["parity"]["runs"])
