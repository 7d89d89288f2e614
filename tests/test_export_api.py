"""recopt.export / load: manifest, formats, dynamic dims, parity failures, tampering, unsafe archives."""
import importlib
import io
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import recopt  # noqa: E402
rx = importlib.import_module("recopt.export")  # noqa: E402  the package, even if recopt.export is the function
from recopt.errors import InputError  # noqa: E402


class Tower(nn.Module):
    """dense [B, 4] + tokens [B, T, 4] -> (score [B], pooled [B, 4])."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, dense, tokens):
        pooled = tokens.mean(dim=1)
        return self.b(torch.relu(self.a(dense + pooled))).squeeze(-1), pooled


ARGS = (torch.randn(3, 4), torch.randn(3, 5, 4))


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    model = Tower().eval()
    opt = recopt.optimize(model, ARGS, target="cpu", backend="eager")
    path = str(tmp_path_factory.mktemp("onnx") / "tower.onnx")
    res = rx.export(opt, ARGS, path, dynamic_dims={"tokens": {1: "seq"}}, output_names=["score", "pooled"])
    return opt, res


def test_manifest_records_everything(onnx_artifact):
    opt, res = onnx_artifact
    m = rx.read_manifest(res.path)
    assert m == res.manifest
    assert m["recopt_version"] == recopt.__version__ and m["torch_version"] == torch.__version__
    assert m["target"]["name"] == "cpu" and m["capture_method"] == opt.report.capture_method
    assert [p["name"] for p in m["passes"]] == [p.name for p in opt.report.passes]
    assert all("config" in p for p in m["passes"])
    assert m["inputs"] == [{"name": "dense", "dtype": "float32", "shape": ["batch", 4]},
                           {"name": "tokens", "dtype": "float32", "shape": ["batch", "seq", 4]}]
    assert m["outputs"] == [{"name": "score", "dtype": "float32", "shape": ["batch"]},
                            {"name": "pooled", "dtype": "float32", "shape": ["batch", 4]}]
    assert m["dynamic_dims"]["batch"]["uses"] == [["dense", 0], ["tokens", 0]]
    assert m["dynamic_dims"]["seq"]["uses"] == [["tokens", 1]]
    assert m["onnx_opset"] == 18
    assert len(m["parity"]["runs"]) == 6  # 3 input sets x 2 outputs
    sizes = [r["label"] for r in m["parity"]["runs"]]
    assert "random inputs batch=6, seq=7" in sizes


def test_onnx_dims_are_named(onnx_artifact):
    import onnx

    _, res = onnx_artifact
    g = onnx.load(res.path).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims == {"dense": ["batch", 4], "tokens": ["batch", "seq", 4]}


def test_load_runs_numpy_and_torch_and_names_provider(onnx_artifact):
    opt, res = onnx_artifact
    sess = rx.load(res.path)
    assert sess.provider == "CPUExecutionProvider"
    x = (torch.randn(7, 4), torch.randn(7, 2, 4))
    out_t = sess(*x)
    out_n = sess(*(t.numpy() for t in x))
    assert isinstance(out_t[0], torch.Tensor) and isinstance(out_n[0], np.ndarray)
    torch.testing.assert_close(out_t[0], opt.original(*x)[0].detach(), rtol=1e-5, atol=1e-6)
    assert sess.run({"dense": x[0].numpy(), "tokens": x[1].numpy()})[1].shape == (7, 4)


def test_missing_cuda_provider_falls_back_to_cpu_with_a_warning(onnx_artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.warns(UserWarning, match="onnxruntime-gpu"):
        sess = rx.load(onnx_artifact[1].path, providers=["cuda"])
    assert sess.provider == "CPUExecutionProvider"


def test_tampered_onnx_weights_are_refused(onnx_artifact, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_artifact[1].path)
    init = model.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = str(tmp_path / "tampered.onnx")
    onnx.save(model, bad)
    with pytest.raises(rx.TamperedArtifactError, match="modified or corrupted"):
        rx.load(bad)


def test_onnx_without_manifest_is_refused(onnx_artifact, tmp_path):
    import onnx

    model = onnx.load(onnx_artifact[1].path)
    del model.metadata_props[:]
    plain = str(tmp_path / "plain.onnx")
    onnx.save(model, plain)
    with pytest.raises(rx.ArtifactError, match="no recopt manifest"):
        rx.load(plain)


# ----------------------------------------------------------------------------- pt2


@pytest.fixture(scope="module")
def pt2_artifact(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pt2") / "tower.pt2")
    return rx.export(Tower().eval(), ARGS, path, dynamic_dims={"tokens": [1]})


def test_pt2_roundtrip(pt2_artifact):
    prog = rx.load(pt2_artifact.path)
    assert prog.manifest["format"] == "pt2"
    assert prog.manifest["dynamic_dims"]["tokens_dim1"]["uses"] == [["tokens", 1]]
    out = prog(torch.randn(9, 4), torch.randn(9, 3, 4))
    assert out[0].shape == (9,) and out[1].shape == (9, 4)


def _rewrite_zip(src: str, dst: str, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item.filename))
            zout.writestr(item, data)


def test_tampered_pt2_weights_are_refused(pt2_artifact, tmp_path):
    bad = str(tmp_path / "tampered.pt2")

    def flip(name, data):
        if name.endswith("data/weights/weight_0"):
            arr = bytearray(data)
            arr[0] ^= 0x40
            return bytes(arr)
        return data

    _rewrite_zip(pt2_artifact.path, bad, flip)
    with pytest.raises(rx.TamperedArtifactError, match="modified or corrupted"):
        rx.load(bad)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pt2_with_pickled_sample_inputs_is_refused_without_unpickling(pt2_artifact, tmp_path, monkeypatch):
    import pickle

    bad = str(tmp_path / "evil.pt2")
    evil = io.BytesIO()
    torch.save((_Evil(),), evil, _use_new_zipfile_serialization=True, pickle_module=pickle)
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))  # would record an unpickling
    _rewrite_zip(pt2_artifact.path, bad,
                 lambda name, data: evil.getvalue() if "sample_inputs" in name else data)
    with pytest.raises(rx.ArtifactError, match="torch.export.load would unpickle"):
        rx.load(bad)
    assert calls == []


def test_pt2_with_pickled_weight_payload_is_refused(pt2_artifact, tmp_path):
    bad = str(tmp_path / "pickled.pt2")

    def mark(name, data):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"]))
            cfg["config"][first]["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    _rewrite_zip(pt2_artifact.path, bad, mark)
    with pytest.raises(rx.TamperedArtifactError, match="model_weights_config.json has SHA-256"):
        rx.load(bad)  # more payloads, also with recomputed digests: tests/test_export_security.py


# ----------------------------------------------------------------------------- errors and options


def test_parity_failure_names_output_and_difference(tmp_path):
    from onnxscript import opset18 as op

    @torch.library.custom_op("recopt_test::plus_one", mutates_args=())
    def plus_one(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    @plus_one.register_fake
    def _(x):
        return torch.empty_like(x)

    def wrong(x):  # a broken translation: +1.01 instead of +1
        return op.Add(x, op.Constant(value_float=1.01))

    class M(nn.Module):
        def forward(self, x):
            return torch.ops.recopt_test.plus_one(x) * 2

    rx.register_translation(torch.ops.recopt_test.plus_one.default, wrong)
    try:
        with pytest.raises(rx.ParityError, match=r"output 'output' differs from PyTorch on the example inputs: "
                                                 r"largest difference 0.02"):
            rx.export(M(), (torch.rand(4, 3),), str(tmp_path / "bad.onnx"))
        res = rx.export(M(), (torch.rand(4, 3),), str(tmp_path / "unchecked.onnx"), verify=False)
        assert "parity" not in res.manifest
    finally:
        rx.translations._USER_TRANSLATIONS.pop(torch.ops.recopt_test.plus_one.default, None)


def test_dim_the_model_fixes_is_reported(tmp_path):
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 12).sum(1)  # needs x.shape[1] * x.shape[2] == 12

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = rx.export(Fixed(), (torch.randn(2, 3, 4),), str(tmp_path / "f.onnx"), dynamic_dims={"x": [1]})
    spec = res.manifest["specialized_dims"]
    assert spec == [{"input": "x", "axis": 1, "size": 3, "reason": spec[0]["reason"]}]
    assert any("asked to be dynamic" in str(x.message) for x in w)


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(InputError, match="cannot tell the export format"):
        rx.export(Tower(), ARGS, str(tmp_path / "m.bin"))
    with pytest.raises(InputError, match="unknown export format"):
        rx.export(Tower(), ARGS, str(tmp_path / "m.onnx"), format="tflite")
    with pytest.raises(InputError, match="dynamic_dims names input 'nope'"):
        rx.export(Tower(), ARGS, str(tmp_path / "m.onnx"), dynamic_dims={"nope": [1]})
    with pytest.raises(rx.ArtifactError, match="no such artifact"):
        rx.load(str(tmp_path / "missing.onnx"))


@pytest.mark.slow
def test_aoti_package_roundtrip(tmp_path):
    path = str(tmp_path / "tower_aoti.pt2")
    res = rx.export(Tower().eval(), ARGS, path, format="aoti")
    assert os.path.exists(path + ".manifest.json")
    pkg = rx.load(path)
    assert pkg.manifest["format"] == "aoti" and pkg.manifest == res.manifest
    assert pkg(torch.randn(6, 4), torch.randn(6, 5, 4))[0].shape == (6,)
    with open(path, "r+b") as f:  # corrupt one byte of the package
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(rx.ArtifactError):  # a digest mismatch, or a broken zip header: refused either way
        rx.load(path)
