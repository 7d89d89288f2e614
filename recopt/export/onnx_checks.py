"""Sealing an ONNX model with its manifest, and checking one before onnxruntime sees it.

The ONNX artifact is one protobuf file (plus external-data files beside it
for models over protobuf's 2 GB limit). Its manifest and integrity record
are ``metadata_props`` entries (``recopt.manifest``, ``recopt.integrity``);
the file digest ``model`` is the SHA-256 of the model serialized
(deterministically) *without* those two entries — graph, functions,
Constants, initializers, everything else. External-data files are hashed as
``external/<location>``.

:func:`check_onnx` reads the file once (size-limited, no symlink), decodes
the protobuf (a data format: decoding runs no code), checks every digest
and the signature, then checks what a runtime could be asked to do:

- external data: a relative location inside the model's folder, no ``..``,
  no symlink, inside the file's size; the checked bytes are put into the
  model in memory, so the runtime never reads another file;
- operators: every node's domain is the standard ONNX one, onnxruntime's
  ``com.microsoft``, or a model-local function — a custom-op domain would
  need a native library, which recopt never registers.

onnxruntime then gets the checked bytes (not the path).
"""
from __future__ import annotations

import os
import stat
from typing import Dict, Iterator, List, Optional, Tuple

from . import integrity
from .archive import check_name
from .errors import ArtifactError
from .manifest import MAX_ONNX_BYTES, ONNX_INTEGRITY_KEY, ONNX_METADATA_KEY

MAX_BYTES = MAX_ONNX_BYTES
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
EXTERNAL_DATA_THRESHOLD = 1_800_000_000   # bytes; models above it keep weights in an external file
EXTERNAL_TENSOR_MIN_BYTES = 1024           # ... for tensors of at least this size


def _tensors(model) -> Iterator:
    """Every TensorProto of the model: initializers, sparse initializers, tensor attributes (graph,
    subgraphs, functions)."""
    def graph_tensors(g):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            yield from node_tensors(node)

    def node_tensors(node):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from graph_tensors(sub)

    yield from graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from node_tensors(node)


def _nodes(model) -> Iterator[Tuple[str, object]]:
    def walk(nodes, where):
        for node in nodes:
            yield where, node
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from walk(attr.g.node, where)
                for sub in attr.graphs:
                    yield from walk(sub.node, where)

    yield from walk(model.graph.node, "the graph")
    for fn in model.functions:
        yield from walk(fn.node, f"function {fn.domain}::{fn.name}")


def _external_info(t) -> Dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def strip_props(model) -> Tuple[Optional[bytes], Optional[bytes]]:
    """Remove recopt's metadata entries from ``model``; return (manifest, record) bytes (None if absent)."""
    found: Dict[str, List[str]] = {}
    keep = []
    for p in model.metadata_props:
        if not isinstance(p.key, str) or not isinstance(p.value, str):
            raise ArtifactError("a metadata entry is not valid UTF-8 text; the file is corrupted")
        if p.key in (ONNX_METADATA_KEY, ONNX_INTEGRITY_KEY):
            found.setdefault(p.key, []).append(p.value)
        else:
            keep.append((p.key, p.value))
    if any(len(v) > 1 for v in found.values()):
        raise ArtifactError("the model has several recopt manifests or integrity records; it was crafted")
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    m = found.get(ONNX_METADATA_KEY, [None])[0]
    r = found.get(ONNX_INTEGRITY_KEY, [None])[0]
    return (m.encode() if m is not None else None), (r.encode() if r is not None else None)


def model_digest(model) -> str:
    """SHA-256 of the model serialized without recopt's metadata entries (``model`` is not changed)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    strip_props(copy)
    return integrity.sha256(copy.SerializeToString(deterministic=True))


def seal(model, folder: str, manifest: dict, sign_key=None) -> None:
    """Hash the model (and its external-data files in ``folder``), store manifest + record in the model."""
    digests = {"model": model_digest(model)}
    for loc in sorted({_external_info(t).get("location") for t in _tensors(model)
                       if t.data_location == 1} - {None}):
        with open(os.path.join(folder, loc), "rb") as f:
            digests[f"external/{loc}"] = integrity.sha256(f.read())
    text, record = integrity.seal(manifest, digests, sign_key)
    strip_props(model)
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=text.decode())
    model.metadata_props.add(key=ONNX_INTEGRITY_KEY, value=record.decode())


def read_bytes(path: str, max_bytes: int) -> bytes:
    try:
        st = os.lstat(path)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"refusing to load {path}: a symlink or not a regular file; pass the real file's path")
    if st.st_size > max_bytes:
        raise ArtifactError(f"refusing to load {path}: {st.st_size} bytes (limit {max_bytes}; pass max_bytes=)")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def parse(data: bytes, path: str):
    import onnx

    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise ArtifactError(f"refusing to load {path}: it is a zip archive or a pickle, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # google.protobuf DecodeError and friends: a truncated or corrupted file
        raise ArtifactError(f"refusing to load {path}: not a valid ONNX protobuf ({type(e).__name__}: "
                            f"{str(e)[:120]}); the file is truncated or corrupted") from None
    return model


def check_onnx(path: str, verify_key=None, max_bytes: int = MAX_BYTES):
    """Every check on an ONNX artifact; returns (model with external data inlined, manifest, record)."""
    data = read_bytes(path, max_bytes)
    model = parse(data, path)
    if model.SerializeToString(deterministic=True) != data:
        raise ArtifactError(f"refusing to load {path}: the protobuf is not in the exact form recopt writes "
                            "(fields re-encoded, reordered or unknown); the file was modified or corrupted "
                            "after export. Re-export it with recopt.export")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        manifest_bytes, record_bytes = strip_props(model)
    except ArtifactError as e:
        raise ArtifactError(f"refusing to load {path}: {e}") from None
    digests = {"model": integrity.sha256(model.SerializeToString(deterministic=True))}
    external: Dict[str, bytes] = {}
    ext_tensors = [t for t in _tensors(model) if t.data_location == 1]
    budget = max_bytes
    for t in ext_tensors:
        info = _external_info(t)
        loc = info.get("location", "")
        if loc in external:
            continue
        check_name(loc, path)
        full = os.path.join(folder, loc)
        if os.path.realpath(full) != os.path.join(os.path.realpath(folder), loc):
            raise ArtifactError(f"refusing to load {path}: external data {loc!r} resolves outside the model's folder")
        blob = read_bytes(full, budget)
        budget -= len(blob)
        external[loc] = blob
        digests[f"external/{loc}"] = integrity.sha256(blob)
    manifest, record = integrity.verify(manifest_bytes, record_bytes, digests, path, verify_key)
    if manifest.get("format") != "onnx":
        raise ArtifactError(f"refusing to load {path}: its manifest says format {manifest.get('format')!r}")
    for t in ext_tensors:
        info = _external_info(t)
        blob = external[info["location"]]
        try:
            off, length = int(info.get("offset", 0)), int(info.get("length", len(blob) - int(info.get("offset", 0))))
        except ValueError:
            raise ArtifactError(f"refusing to load {path}: external data of {t.name!r} has a bad offset") from None
        if off < 0 or length < 0 or off + length > len(blob):
            raise ArtifactError(f"refusing to load {path}: external data of {t.name!r} lies outside its file")
        t.raw_data = blob[off:off + length]
        del t.external_data[:]
        t.data_location = 0
    local = {(fn.domain, fn.name) for fn in model.functions}
    for where, node in _nodes(model):
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            raise ArtifactError(
                f"refusing to load {path}: {where} uses operator {node.domain}::{node.op_type}, a custom-op domain "
                "that would need a native library; recopt runs only standard ONNX operators and model-local "
                "functions")
    fn_domains = {d for d, _ in local}
    for imp in model.opset_import:
        if imp.domain not in STANDARD_DOMAINS and imp.domain not in fn_domains:
            raise ArtifactError(f"refusing to load {path}: it imports operator set {imp.domain!r}, a custom-op "
                                "domain recopt does not run")
    return model, manifest, record
