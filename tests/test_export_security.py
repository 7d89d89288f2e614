"""Loading never runs code and never accepts an edited artifact.

Every planted payload would create a marker file if anything unpickled or
evaluated it; each case asserts the load is refused with ArtifactError and
the marker never appears. Payloads are planted twice where that makes
sense: as is (the digests catch them) and "resealed" — the attacker
recomputes every digest in the manifest, as anyone can without a signing
key — so the deeper checks (layout allow-list, payload configs, program
lint, ONNX domains and external data) must catch them on their own.
"""
import importlib
import io
import json
import os
import pickle
import random
import stat
import zipfile

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

rx = importlib.import_module("recopt.export")  # noqa: E402
from recopt.export import archive, integrity, onnx_checks, pt2_checks as pc  # noqa: E402

KEY = b"a-test-secret-of-32-bytes-length"


class Evil:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker) -> bytes:
    return pickle.dumps(Evil(marker))


def evil_torch_save(marker) -> bytes:
    buf = io.BytesIO()
    torch.save(Evil(marker), buf)  # a zip holding data.pkl: a pickle inside a zip
    return buf.getvalue()


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)).eval()


X = (torch.randn(3, 4),)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    out = {}
    for name, key in (("plain", None), ("signed", KEY)):
        out[name + ".pt2"] = rx.export(build(), X, str(d / f"{name}.pt2"), sign_key=key).path
        out[name + ".onnx"] = rx.export(build(), X, str(d / f"{name}.onnx"), sign_key=key).path
    return out


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a payload ran"


def refused(path, exc=rx.ArtifactError, match=None, **kw):
    with pytest.raises(exc, match=match) as e:
        rx.load(str(path), **kw)
    return str(e.value)


# ----------------------------------------------------------------------------- pt2 helpers


def pt2_files(path):
    with open(path, "rb") as f:
        entries = archive.read_strict(f.read(), path, 1 << 40)
    return pc.split_root(entries, path)


def write_pt2(dst, root, files, reseal=False):
    files = dict(files)
    if reseal:  # what an attacker without the key can do: recompute every digest
        manifest = json.loads(files[pc.MANIFEST_ENTRY])
        digests = {k: integrity.sha256(v) for k, v in files.items() if k not in (pc.MANIFEST_ENTRY,
                                                                                pc.INTEGRITY_ENTRY)}
        files[pc.MANIFEST_ENTRY], files[pc.INTEGRITY_ENTRY] = integrity.seal(manifest, digests)
    with open(dst, "wb") as f:
        f.write(archive.write({f"{root}/{k}": v for k, v in files.items()}))
    return str(dst)


def _cfg(files, name):
    return json.loads(files[name])


def plant_pickled_sample_inputs(files, marker):
    files[pc.SAMPLE_INPUTS] = evil_torch_save(marker)


def plant_pickled_weight(files, marker):
    cfg = _cfg(files, pc.WEIGHTS_CONFIG)
    first = next(iter(cfg["config"]))
    cfg["config"][first]["use_pickle"] = True
    files[pc.WEIGHTS_CONFIG] = json.dumps(cfg).encode()
    files["data/weights/" + cfg["config"][first]["path_name"]] = evil_torch_save(marker)


def plant_opaque_constant(files, marker):
    files[pc.CONSTANTS_CONFIG] = json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                              "use_pickle": True, "tensor_meta": None}}}).encode()
    files["data/constants/opaque_obj_0"] = evil_pickle(marker)


def plant_custom_obj_constant(files, marker):
    files[pc.CONSTANTS_CONFIG] = json.dumps({"config": {"c": {"path_name": "custom_obj_0", "is_param": False,
                                                              "use_pickle": True, "tensor_meta": None}}}).encode()
    files["data/constants/custom_obj_0"] = evil_pickle(marker)


def plant_legacy_weights(files, marker):
    files["data/weights/model.pt"] = evil_torch_save(marker)


def plant_zip_in_zip(files, marker):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("data.pkl", evil_pickle(marker))
    files["extra/inner.zip"] = inner.getvalue()


def plant_reduce_in_json_entry(files, marker):
    files[pc.PROGRAM] = evil_pickle(marker)


def plant_aoti_code(files, marker):
    files["data/aotinductor/model/model.so"] = b"\x7fELF" + b"\0" * 60


def _program_edit(files, old, new):
    text = files[pc.PROGRAM].decode()
    assert old in text
    files[pc.PROGRAM] = text.replace(old, new, 1).encode()


def plant_torch_load_target(files, marker):
    _program_edit(files, '"torch.ops.aten.linear.default"', '"torch.load"')


def plant_load_library_target(files, marker):
    _program_edit(files, '"torch.ops.aten.linear.default"', '"torch.ops.load_library"')


def plant_dunder_op(files, marker):
    _program_edit(files, '"torch.ops.aten.linear.default"', '"torch.ops.aten.linear.__globals__"')


def plant_side_table_hop(files, marker):
    _program_edit(files, '"torch.ops.aten.linear.default"', '"torch.ops.higher_order.triton_kernel_wrapper_mutation"')


def plant_extension_target(files, marker):
    _program_edit(files, '"torch.ops.aten.linear.default"', '"#evil"')


def plant_sympy_eval(files, marker):
    prog = json.loads(files[pc.PROGRAM])
    payload = f"__import__('builtins').open({str(marker)!r}, 'w')"

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "expr_str":
                    o[k] = payload
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(prog)
    assert payload in json.dumps(prog)
    files[pc.PROGRAM] = json.dumps(prog).encode()


def plant_sympy_call(files, marker):
    text = files[pc.PROGRAM].decode()
    import re

    new = re.sub(r'"expr_str": "[^"]*"', '"expr_str": "open(s0)"', text, count=1)
    assert new != text
    files[pc.PROGRAM] = new.encode()


def plant_out_of_bounds_view(files, marker):
    cfg = _cfg(files, pc.WEIGHTS_CONFIG)
    first = next(iter(cfg["config"]))
    cfg["config"][first]["tensor_meta"]["storage_offset"] = {"as_int": 10 ** 6}
    files[pc.WEIGHTS_CONFIG] = json.dumps(cfg).encode()


PT2_PAYLOADS = [plant_pickled_sample_inputs, plant_pickled_weight, plant_opaque_constant, plant_custom_obj_constant,
                plant_legacy_weights, plant_zip_in_zip, plant_reduce_in_json_entry, plant_aoti_code,
                plant_torch_load_target, plant_load_library_target, plant_dunder_op, plant_extension_target,
                plant_side_table_hop,
                plant_sympy_eval, plant_sympy_call, plant_out_of_bounds_view]


@pytest.mark.parametrize("reseal", [False, True], ids=["as-is", "resealed"])
@pytest.mark.parametrize("plant", PT2_PAYLOADS, ids=lambda f: f.__name__[6:])
def test_planted_pt2_payload_is_refused_and_never_runs(artifacts, tmp_path, marker, plant, reseal):
    root, files = pt2_files(artifacts["plain.pt2"])
    plant(files, marker)
    bad = write_pt2(tmp_path / "bad.pt2", root, files, reseal=reseal)
    refused(bad)
    # even the key holder's check refuses the resealed copy: it is not signed
    refused(bad, verify_key=KEY)


def _raw_zip(dst, items):
    with open(dst, "wb") as f:
        with zipfile.ZipFile(f, "w") as z:
            for name, data in items:
                z.writestr(name, data)
    return str(dst)


def test_older_layout_with_top_level_pickle_is_refused(tmp_path, marker):
    bad = _raw_zip(tmp_path / "old.pt2", [("version", b"8.0"), ("serialized_exported_program.json", b"{}"),
                                          ("serialized_state_dict.pt", evil_torch_save(marker)),
                                          ("serialized_constants.pt", evil_torch_save(marker)),
                                          ("serialized_example_inputs.pt", evil_torch_save(marker))])
    assert "one folder" in refused(bad)


@pytest.mark.parametrize("evil_first", [True, False])
def test_duplicate_entry_names_are_refused(artifacts, tmp_path, marker, evil_first):
    root, files = pt2_files(artifacts["plain.pt2"])
    evil = dict(files)
    plant_pickled_weight(evil, marker)
    name = f"{root}/{pc.WEIGHTS_CONFIG}"
    items = [(f"{root}/{k}", v) for k, v in files.items()]
    dup = (name, evil[pc.WEIGHTS_CONFIG])
    items = ([dup] + items) if evil_first else (items + [dup])
    w = f"{root}/data/weights/weight_0"
    items.append((w, evil[f"data/weights/weight_0"]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        bad = _raw_zip(tmp_path / "dup.pt2", items)
    assert "duplicate entry names" in refused(bad)


@pytest.mark.parametrize("name", ["archive/../../evil", "/abs/evil", "archive/a\\b", "archive//x", "archive/./x"])
def test_unsafe_entry_names_are_refused(artifacts, tmp_path, marker, name):
    root, files = pt2_files(artifacts["plain.pt2"])
    items = [(f"{root}/{k}", v) for k, v in files.items()] + [(name, evil_pickle(marker))]
    bad = _raw_zip(tmp_path / "names.pt2", items)
    refused(bad)


def test_symlink_entry_is_refused(artifacts, tmp_path, marker):
    root, files = pt2_files(artifacts["plain.pt2"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in files.items():
            z.writestr(f"{root}/{k}", v)
        info = zipfile.ZipInfo(f"{root}/extra/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    bad = tmp_path / "link.pt2"
    bad.write_bytes(buf.getvalue())
    assert "symlink" in refused(bad)


@pytest.mark.parametrize("where", ["prepended", "appended"])
def test_unaccounted_bytes_are_refused(artifacts, tmp_path, where):
    data = open(artifacts["plain.pt2"], "rb").read()
    junk = b"\x80\x04junk" * 4
    bad = tmp_path / "junk.pt2"
    bad.write_bytes(junk + data if where == "prepended" else data + junk)
    refused(bad)


def test_size_limit_and_symlinked_artifact_are_refused(artifacts, tmp_path):
    assert "limit" in refused(artifacts["plain.pt2"], max_bytes=1000)
    link = tmp_path / "link.onnx"
    os.symlink(artifacts["plain.onnx"], link)
    assert "symlink" in refused(link)


# ----------------------------------------------------------------------------- ONNX


def onnx_model(path):
    import onnx

    return onnx.load(path)



def write_onnx(model, dst, reseal=False, weights_digest=None):
    if reseal:
        from recopt.export.manifest import onnx_weights_sha256

        manifest = json.loads(next(p.value for p in model.metadata_props if p.key == "recopt.manifest"))
        manifest["checksums"]["weights_sha256"] = weights_digest or onnx_weights_sha256(model)[0]
        onnx_checks.seal(model, os.path.dirname(str(dst)), manifest)
    with open(dst, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    return str(dst)


def test_custom_op_domain_is_refused(artifacts, tmp_path):
    from onnx import helper

    m = onnx_model(artifacts["plain.onnx"])
    out = m.graph.output[0].name
    last = m.graph.node[-1]
    last.output[0] = "pre"
    m.graph.node.append(helper.make_node("LoadMyLibrary", ["pre"], [out], domain="com.evil.native"))
    m.opset_import.append(helper.make_opsetid("com.evil.native", 1))
    assert "SHA-256" in refused(write_onnx(m, tmp_path / "custom.onnx"))
    assert "custom-op domain" in refused(write_onnx(m, tmp_path / "custom2.onnx", reseal=True))


def _to_external(m, location):
    from onnx import TensorProto
    from recopt.export.manifest import onnx_weights_sha256

    digest = onnx_weights_sha256(m)[0]

    init = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    raw = init.raw_data
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        init.external_data.add(key=k, value=v)
    return raw, digest


@pytest.mark.parametrize("location", ["../outside.bin", "/tmp/recopt_abs_outside.bin", "sub/../../outside.bin"])
def test_external_data_outside_the_folder_is_refused(artifacts, tmp_path, location):
    m = onnx_model(artifacts["plain.onnx"])
    raw, digest = _to_external(m, location)
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    target = os.path.normpath(os.path.join(str(folder), location))
    with open(target, "wb") as f:
        f.write(raw)
    try:
        msg = refused(write_onnx(m, folder / "ext.onnx", reseal=True, weights_digest=digest))
        assert "unsafe entry name" in msg or "outside" in msg
    finally:
        os.remove(target)


def test_external_data_symlink_is_refused_and_inside_file_loads(artifacts, tmp_path):
    m = onnx_model(artifacts["plain.onnx"])
    raw, digest = _to_external(m, "w.bin")
    outside = tmp_path / "secret.bin"
    outside.write_bytes(raw)
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(outside, folder / "w.bin")
    bad = write_onnx(m, folder / "ext.onnx", reseal=True, weights_digest=digest)
    assert "symlink" in refused(bad)
    # the same external file as a real file inside the folder is fine (and hashed: editing it is refused)
    os.remove(folder / "w.bin")
    (folder / "w.bin").write_bytes(raw)
    good = write_onnx(m, folder / "ext.onnx", reseal=True, weights_digest=digest)
    out = rx.load(good)(*X)[0]
    torch.testing.assert_close(out, build()(*X).detach())
    flipped = bytearray(raw)
    flipped[5] ^= 1
    (folder / "w.bin").write_bytes(bytes(flipped))
    assert "external/w.bin" in refused(good, rx.TamperedArtifactError)


@pytest.mark.parametrize("kind", ["pickle", "zip", "truncated", "empty", "garbage"])
def test_non_onnx_bytes_are_refused(artifacts, tmp_path, marker, kind):
    data = open(artifacts["plain.onnx"], "rb").read()
    body = {"pickle": evil_pickle(marker), "zip": evil_torch_save(marker), "truncated": data[: len(data) // 2],
            "empty": b"", "garbage": bytes(range(256)) * 4}[kind]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(body)
    refused(bad)


def test_duplicate_onnx_manifests_are_refused(artifacts, tmp_path):
    m = onnx_model(artifacts["plain.onnx"])
    m.metadata_props.add(key="recopt.manifest", value="{}")
    assert "several recopt manifests" in refused(write_onnx(m, tmp_path / "two.onnx"))


# ----------------------------------------------------------------------------- named tampers


def _pt2_tamper(path, dst, change):
    root, files = pt2_files(path)
    change(files)
    return write_pt2(dst, root, files)


def _onnx_unary(m, new_type):
    node = next(n for n in m.graph.node if n.op_type in ("Relu", "Sigmoid", "Tanh") and n.op_type != new_type)
    node.op_type = new_type


def _flip_json(files, name, key, value):
    d = json.loads(files[name])
    d[key] = value
    files[name] = json.dumps(d, indent=2, sort_keys=True).encode()


PT2_TAMPERS = {
    "silu_to_relu": lambda f: _program_edit(f, '"torch.ops.aten.silu.default"', '"torch.ops.aten.relu.default"'),
    "relu_to_sigmoid": lambda f: _program_edit(f, '"torch.ops.aten.relu.default"', '"torch.ops.aten.sigmoid.default"'),
    "weight_byte": lambda f: f.__setitem__("data/weights/weight_0", b"\x01" + f["data/weights/weight_0"][1:]),
    "manifest_field": lambda f: _flip_json(f, pc.MANIFEST_ENTRY, "torch_version", "9.9"),
    "manifest_files_list": lambda f: _flip_json(f, pc.MANIFEST_ENTRY, "files", {}),
    "integrity_record": lambda f: f.__setitem__(pc.INTEGRITY_ENTRY, f[pc.INTEGRITY_ENTRY].replace(b"null", b"{}")),
    "removed_weight": lambda f: f.pop("data/weights/weight_4"),
    "added_file": lambda f: f.__setitem__("data/weights/weight_99", b"\0" * 16),
    "removed_manifest": lambda f: f.pop(pc.MANIFEST_ENTRY),
    "removed_integrity": lambda f: f.pop(pc.INTEGRITY_ENTRY),
    "sample_inputs_filled": lambda f: f.__setitem__(pc.SAMPLE_INPUTS, b"\0"),
    "weights_config_shape": lambda f: f.__setitem__(pc.WEIGHTS_CONFIG, f[pc.WEIGHTS_CONFIG].replace(
        b'{"as_int": 8}', b'{"as_int": 7}', 1)),
}


@pytest.mark.parametrize("name", sorted(PT2_TAMPERS))
def test_named_pt2_tamper_is_refused(artifacts, tmp_path, name):
    bad = _pt2_tamper(artifacts["plain.pt2"], tmp_path / "t.pt2", PT2_TAMPERS[name])
    refused(bad)


def _onnx_initializer(m):
    from onnx import numpy_helper

    init = m.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.25
    init.CopyFrom(numpy_helper.from_array(arr, init.name))


def _onnx_manifest(m, key, value):
    p = next(p for p in m.metadata_props if p.key == key)
    p.value = value(p.value)


ONNX_TAMPERS = {
    "op_type": lambda m: _onnx_unary(m, "Sigmoid"),
    "initializer": _onnx_initializer,
    "attribute": lambda m: m.graph.node[0].attribute.add().CopyFrom(
        __import__("onnx").helper.make_attribute("alpha", 2.0)),
    "node_removed": lambda m: m.graph.node.remove(m.graph.node[-1]),
    "manifest_field": lambda m: _onnx_manifest(m, "recopt.manifest", lambda v: v.replace('"onnx_opset": 18',
                                                                                       '"onnx_opset": 17')),
    "manifest_checksums": lambda m: _onnx_manifest(m, "recopt.manifest", lambda v: v.replace('"weights_sha256": "',
                                                                                           '"weights_sha256": "0')),
    "integrity_record": lambda m: _onnx_manifest(m, "recopt.integrity", lambda v: v.replace('"version":1',
                                                                                          '"version":2')),
    "manifest_removed": lambda m: m.metadata_props.remove(next(p for p in m.metadata_props
                                                               if p.key == "recopt.manifest")),
    "extra_metadata": lambda m: m.metadata_props.add(key="note", value="hello"),
    "doc_string": lambda m: setattr(m.graph, "doc_string", "edited"),
}


@pytest.mark.parametrize("name", sorted(ONNX_TAMPERS))
def test_named_onnx_tamper_is_refused(artifacts, tmp_path, name):
    m = onnx_model(artifacts["plain.onnx"])
    ONNX_TAMPERS[name](m)
    refused(write_onnx(m, tmp_path / "t.onnx"))


def test_constant_inside_an_onnx_function_is_covered(artifacts, tmp_path):
    """A model with a model-local function (as recopt's GDPA/FP8 translations make): editing the Constant
    inside the function is refused, while the untouched function model loads and runs."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx_model(artifacts["plain.onnx"])
    out = m.graph.output[0].name
    m.graph.node[-1].output[0] = "pre"
    k = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(__import__("numpy").float32([2.0])))
    fn = helper.make_function("recopt", "Scale_0", ["x"], ["y"], [k, helper.make_node("Mul", ["x", "k"], ["y"])],
                              opset_imports=[helper.make_opsetid("", 18)])
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("recopt", 1))
    m.graph.node.append(helper.make_node("Scale_0", ["pre"], [out], domain="recopt"))
    good = write_onnx(m, tmp_path / "fn.onnx", reseal=True)
    torch.testing.assert_close(rx.load(good)(*X)[0], 2 * build()(*X).detach())
    m2 = onnx.load(good)
    m2.functions[0].node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(__import__("numpy").float32([2.3])))
    assert "SHA-256" in refused(write_onnx(m2, tmp_path / "fn_bad.onnx"), rx.TamperedArtifactError)


# ----------------------------------------------------------------------------- signing


def test_hmac_signature(artifacts, tmp_path):
    for fmt in ("pt2", "onnx"):
        art = rx.load(artifacts[f"signed.{fmt}"], verify_key=KEY)
        assert art.signature["alg"] == "hmac-sha256" and art.signature_verified
        assert "does not match this key" in refused(artifacts[f"signed.{fmt}"], rx.SignatureError,
                                                     verify_key=KEY[::-1])
        assert "not signed" in refused(artifacts[f"plain.{fmt}"], rx.SignatureError, verify_key=KEY)
        assert not rx.load(artifacts[f"signed.{fmt}"]).signature_verified  # integrity still checked
    # an attacker edits the program and reseals every digest (keeping the old signature or none)
    root, files = pt2_files(artifacts["signed.pt2"])
    sig = json.loads(files[pc.INTEGRITY_ENTRY])["signature"]
    PT2_TAMPERS["silu_to_relu"](files)
    bad = write_pt2(tmp_path / "resealed.pt2", root, files, reseal=True)
    rx.load(bad)  # loads without a key: integrity alone does not authenticate...
    refused(bad, rx.SignatureError, verify_key=KEY)  # ...the signature does
    rec = json.loads(open_entry(bad, pc.INTEGRITY_ENTRY))
    rec["signature"] = sig
    root, files = pt2_files(bad)
    files[pc.INTEGRITY_ENTRY] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    assert "does not match" in refused(write_pt2(tmp_path / "copied_sig.pt2", root, files), rx.SignatureError,
                                       verify_key=KEY)
    with pytest.raises(rx.ArtifactError, match="at least 16 bytes"):
        rx.export(build(), X, str(tmp_path / "short.pt2"), sign_key=b"short", verify=False)


def open_entry(path, name):
    return pt2_files(path)[1][name]


def test_ed25519_signature(tmp_path):
    ed = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    priv = ed.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    other = ed.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    path = rx.export(build(), X, str(tmp_path / "ed.onnx"), sign_key=priv, verify=False).path
    art = rx.load(path, verify_key=priv.public_key())
    assert art.signature["alg"] == "ed25519" and art.signature_verified
    assert "does not verify" in refused(path, rx.SignatureError, verify_key=other.public_key())
    assert "HMAC secret" in refused(path, rx.SignatureError, verify_key=KEY)


# ----------------------------------------------------------------------------- random byte flips


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_random_byte_flips_never_load(artifacts, tmp_path, fmt):
    data = open(artifacts[f"plain.{fmt}"], "rb").read()
    rng = random.Random(17)
    bad = tmp_path / f"flip.{fmt}"
    for _ in range(30):
        b = bytearray(data)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(b))
        with pytest.raises(rx.ArtifactError):
            rx.load(str(bad))


def test_corrupted_manifest_reads_as_artifact_error(artifacts, tmp_path):
    root, files = pt2_files(artifacts["plain.pt2"])
    files[pc.MANIFEST_ENTRY] = files[pc.MANIFEST_ENTRY][:-20]
    bad = write_pt2(tmp_path / "m.pt2", root, files)
    with pytest.raises(rx.ArtifactError, match="cannot read the manifest"):
        rx.read_manifest(bad)
    refused(bad, rx.TamperedArtifactError)
    trunc = tmp_path / "t.onnx"
    trunc.write_bytes(open(artifacts["plain.onnx"], "rb").read()[:300])
    with pytest.raises(rx.ArtifactError):
        rx.read_manifest(str(trunc))


def test_export_with_external_data_roundtrips_and_hashes_the_data_file(tmp_path, monkeypatch):
    """The >2 GB path (weights in ``<name>.data`` beside the model), forced on a small model."""
    monkeypatch.setattr(onnx_checks, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(onnx_checks, "EXTERNAL_TENSOR_MIN_BYTES", 0)
    path = str(tmp_path / "ext.onnx")
    res = rx.export(build(), X, path, n_random_inputs=1)
    assert os.path.exists(path + ".data") and "external/ext.onnx.data" in res.manifest["files"]
    torch.testing.assert_close(rx.load(path)(*X)[0], build()(*X).detach())
    data = bytearray(open(path + ".data", "rb").read())
    data[len(data) // 2] ^= 4
    open(path + ".data", "wb").write(bytes(data))
    assert "external/ext.onnx.data" in refused(path, rx.TamperedArtifactError)


def test_read_manifest_refuses_oversize_manifests_before_reading_them(tmp_path):
    """read_manifest (public, unverified reading) caps what it reads: a deflate bomb in the .pt2
    manifest entry and an oversize sidecar are refused, never inflated or read in full."""

    from recopt.export.integrity import MAX_MANIFEST_BYTES
    from recopt.export.manifest import PT2_MANIFEST_NAME, SIDECAR_SUFFIX

    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open(f"m/extra/{PT2_MANIFEST_NAME}", "w", force_zip64=True) as f:
            chunk = b" " * (1 << 20)
            for _ in range((MAX_MANIFEST_BYTES >> 20) + 2):
                f.write(chunk)
    assert bomb.stat().st_size < 200_000          # ~17 MiB of spaces deflate to a few KiB
    with pytest.raises(rx.ArtifactError, match="declares .* bytes \\(limit"):
        rx.read_manifest(str(bomb))
    big = tmp_path / "model.onnx"
    big.write_bytes(b"")
    with open(str(big) + SIDECAR_SUFFIX, "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)         # sparse: no disk used
    with pytest.raises(rx.ArtifactError, match="larger than a manifest can be"):
        rx.read_manifest(str(big))
