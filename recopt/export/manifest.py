"""The manifest every exported artifact carries, and the weight checksums it holds.

A manifest is a JSON object (``MANIFEST_VERSION`` 1)::

    format            "onnx" | "pt2" | "aoti"
    recopt_version, torch_version, onnx_opset (onnx only), created_utc
    target            the target profile the model was optimized for (Target.to_dict()), or null
    capture_method    how the graph was captured ("symbolic_trace", "dynamo", "none")
    passes            [{name, semantics, status, config}] from the OptimizationReport
    inputs, outputs   [{name, dtype, shape}] — shape entries are ints or dim names ("batch")
    dynamic_dims      {dim name: {"min": int, "max": int | null, "uses": [[tensor name, axis], ...]}}
    specialized_dims  [{"input", "axis", "size", "reason"}] dims asked to be dynamic that export fixed
    lowerings         {op name: how it was lowered} for recopt translations used (GDPA, FP8, bags)
    checksums         {"weights_sha256": hex, ...} — see below
    parity            {"rtol", "runs": [{"label", "max_abs", "rel", "output"}]} after verify=True

Integrity (see :mod:`recopt.export.integrity`):

    files             {file name: SHA-256 hex} of every file of the artifact but the manifest
                      and the integrity record: .pt2 entries, the ONNX model (serialized without
                      recopt's metadata), ONNX external-data files, AOTInductor package entries
    checksums         {"weights_sha256": hex} — a second, content-level digest of the weights
                      (ONNX: initializers and Constant tensors; pt2: state dict and constants)

The manifest's own bytes are hashed (and optionally signed) in the
integrity record stored beside it: metadata key ``recopt.integrity`` in
ONNX, ``extra/recopt_integrity.json`` in a .pt2, ``<path>.integrity.json``
beside an AOTInductor package.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
from typing import Any, Dict, Iterable, Optional, Tuple

# Size limits of what is read from an artifact (integrity and onnx_checks use them too).
MAX_MANIFEST_BYTES = 16 << 20   # a manifest (sidecar JSON, .pt2 entry, integrity-checked bytes)
MAX_ONNX_BYTES = 8 << 30        # an ONNX file, unless load(max_bytes=) says otherwise

MANIFEST_VERSION = 1
ONNX_METADATA_KEY = "recopt.manifest"
ONNX_INTEGRITY_KEY = "recopt.integrity"
INTEGRITY_SUFFIX = ".integrity.json"          # beside an AOTInductor package
PT2_MANIFEST_NAME = "recopt_manifest.json"     # extra file inside a .pt2 archive
SIDECAR_SUFFIX = ".manifest.json"              # beside an AOTInductor package


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str)


def base_manifest(fmt: str, report: Any = None) -> dict:
    """Versions, target and passes; the caller adds inputs/outputs/checksums."""
    import torch

    try:
        import recopt

        recopt_version = recopt.__version__
    except Exception:  # pragma: no cover - partial checkouts
        recopt_version = "unknown"
    m: Dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "recopt_version": recopt_version,
        "torch_version": torch.__version__,
        "created_utc": now_utc(),
        "target": None,
        "capture_method": None,
        "passes": [],
    }
    if report is not None:
        m["target"] = dict(report.target) if report.target else None
        m["capture_method"] = report.capture_method or None
        m["passes"] = [
            {"name": p.name, "semantics": p.semantics, "status": p.status, "config": dict(p.config or {})}
            for p in report.passes
        ]
    return m


# ----------------------------------------------------------------------------- ONNX checksums


def _tensor_digest_items(model) -> Iterable[Tuple[str, int, tuple, bytes]]:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        yield init.name, int(init.data_type), tuple(init.dims), arr.tobytes()
    nodes = list(_all_nodes(model.graph))
    for fn in model.functions:
        for node in fn.node:
            nodes.append(node)
    for node in nodes:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.HasField("t"):
                arr = numpy_helper.to_array(attr.t)
                yield f"{node.output[0]}:{attr.name}", int(attr.t.data_type), tuple(attr.t.dims), arr.tobytes()


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def onnx_weights_sha256(model) -> Tuple[str, int]:
    """(hex digest, number of tensors) over an ONNX model's weights (external data must be loaded)."""
    h = hashlib.sha256()
    items = sorted(_tensor_digest_items(model), key=lambda t: t[0])
    for name, dtype, dims, raw in items:
        h.update(name.encode())
        h.update(f"|{dtype}|{dims}|{len(raw)}|".encode())
        h.update(raw)
    return h.hexdigest(), len(items)


def read_onnx_manifest(model) -> Optional[dict]:
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return json.loads(prop.value)
    return None


def write_onnx_manifest(model, manifest: dict) -> None:
    """Set (or replace) the manifest in the model's ``metadata_props``."""
    keep = [p for p in model.metadata_props if p.key != ONNX_METADATA_KEY]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=dumps(manifest))


# ----------------------------------------------------------------------------- reading


def read_archive_manifest(path: str) -> Optional[dict]:
    """The manifest stored inside a .pt2 archive (None if there is none). Not verified: use :func:`load`.

    An entry declaring more than the manifest limit (16 MiB), or inflating to more than it
    declares, is refused before it is decompressed in full (a zip bomb would otherwise take
    the memory it asks for)."""
    from .errors import ArtifactError

    limit = MAX_MANIFEST_BYTES
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.endswith("/extra/" + PT2_MANIFEST_NAME):
                if info.file_size > limit:
                    raise ArtifactError(f"refusing to read the manifest of {path}: {info.filename} declares "
                                        f"{info.file_size} bytes (limit {limit})")
                with zf.open(info) as f:
                    data = f.read(limit + 1)
                if len(data) > limit:
                    raise ArtifactError(f"refusing to read the manifest of {path}: {info.filename} inflates past "
                                        f"{limit} bytes")
                return json.loads(data.decode())
    return None


def sidecar_path(path: str) -> str:
    return str(path) + SIDECAR_SUFFIX


def read_sidecar(path: str) -> Optional[dict]:
    import os

    from .errors import ArtifactError

    p = sidecar_path(path)
    if not os.path.exists(p):
        return None
    limit = MAX_MANIFEST_BYTES
    if os.path.getsize(p) > limit:
        raise ArtifactError(f"refusing to read {p}: {os.path.getsize(p)} bytes, larger than a manifest can be "
                            f"(limit {limit})")
    with open(p, "rb") as f:
        return json.loads(f.read(limit + 1).decode("utf-8"))


def write_sidecar(path: str, manifest: dict) -> str:
    p = sidecar_path(path)
    with open(p, "w") as f:
        f.write(dumps(manifest) + "\n")
    return p


def read_manifest(path: str) -> dict:
    """The manifest of an exported artifact (ONNX metadata, .pt2 entry or sidecar JSON), for reading.

    It is *not* checked against the artifact (:func:`recopt.export.load` does that). Raises
    :class:`~recopt.export.errors.ArtifactError` when there is none or it cannot be read.
    """
    from .errors import ArtifactError

    path = str(path)
    try:
        m = read_sidecar(path)
        if m is None and zipfile.is_zipfile(path):
            m = read_archive_manifest(path)
        elif m is None:
            import os

            import onnx

            if os.path.getsize(path) > MAX_ONNX_BYTES:
                raise ArtifactError(f"refusing to read the manifest of {path}: {os.path.getsize(path)} bytes "
                                    f"(limit {MAX_ONNX_BYTES})")
            model = onnx.load(path, load_external_data=False)
            m = read_onnx_manifest(model)
    except ArtifactError:
        raise
    except Exception as e:  # corrupted JSON, protobuf or zip: one error type, with the reason
        raise ArtifactError(f"cannot read the manifest of {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(m, dict):
        raise ArtifactError(
            f"{path} has no recopt manifest, so it was not written by recopt.export (or the manifest was "
            "stripped); load it with onnxruntime / torch.export.load directly, or re-export it with recopt.export"
        )
    return m
