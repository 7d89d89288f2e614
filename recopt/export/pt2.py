"""``torch.export`` programs (``.pt2``) and AOTInductor packages, saved and loaded safely.

Saving: ``pt2`` is ``torch.export.save``'s archive with the sample inputs
emptied (torch writes them as a pickle), plus ``extra/recopt_manifest.json``
(which lists the SHA-256 of every other entry) and
``extra/recopt_integrity.json`` (the manifest's SHA-256, optionally signed):
see :mod:`recopt.export.integrity`. ``aoti`` is
``torch._inductor.aoti_compile_and_package`` with the manifest and record in
sidecar files (``<path>.manifest.json``, ``<path>.integrity.json``).

Loading never unpickles and never hands torch a file it has not checked:
:func:`check_pt2` takes the archive apart strictly
(:func:`recopt.export.archive.read_strict`), checks every entry against the
allow-list of :mod:`recopt.export.pt2_checks`, checks every entry's hash
(and the signature) *before* parsing any JSON, then the payload configs
(raw tensors only) and the program (allowed operators, plain shape
arithmetic). torch then reads a fresh archive built from exactly the
checked bytes. An AOTInductor package contains a compiled shared library,
i.e. native code by design: it is loaded only after every entry matched
its manifest — sign packages and load them with ``verify_key`` when they
cross a trust boundary.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any, Dict, Optional

import torch

from .errors import ArtifactError, ExportError, TamperedArtifactError
from .manifest import INTEGRITY_SUFFIX, sidecar_path


def _register_recopt_ops() -> None:
    """Import the modules that define recopt's custom ops, so programs using them deserialize.

    A module that cannot be imported (an optional dependency missing) is skipped: a program that
    uses its ops then fails to load with torch's message naming the op."""
    for mod in ("recopt.ops", "recopt.fp8.linear"):
        try:
            __import__(mod)
        except ImportError:
            pass


def tensors_sha256(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (name order): name, dtype, shape and the contiguous bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def program_weights_sha256(ep) -> str:
    tensors = dict(ep.state_dict)
    tensors.update({f"constant:{k}": v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return tensors_sha256(tensors)


# ----------------------------------------------------------------------------- pt2

MAX_BYTES = 8 << 30     # a .pt2 / AOTInductor archive larger than this is refused unless max_bytes= says otherwise


def _read_file(path: str, max_bytes: int) -> bytes:
    import os

    try:
        st = os.lstat(path)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror}") from None
    import stat as _stat

    if _stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"refusing to load {path}: it is a symlink; pass the real file's path")
    if not _stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"refusing to load {path}: not a regular file")
    if st.st_size > max_bytes:
        raise ArtifactError(f"refusing to load {path}: {st.st_size} bytes (limit {max_bytes}; pass max_bytes= "
                            "to recopt.load for a larger model)")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def _write_atomic(path: str, data: bytes) -> None:
    import os

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def program_entries(ep) -> Dict[str, bytes]:
    """``torch.export.save``'s archive as ``{entry: bytes}``, sample inputs emptied (they are a pickle)."""
    from . import archive, pt2_checks as pc

    buf = io.BytesIO()
    torch.export.save(ep, buf)
    entries = archive.read_strict(buf.getvalue(), "torch.export.save's archive", 1 << 62)
    root, files = pc.split_root(entries, "torch.export.save's archive")
    files[pc.SAMPLE_INPUTS] = b""
    return {"root": root, "files": files}


def save_pt2(ep, path: str, manifest: dict, sign_key=None, entries: Optional[dict] = None) -> dict:
    """Write ``ep`` to ``path`` with ``manifest`` (every entry hashed, optionally signed); return the entries
    (pass them back to re-write the manifest without saving the program again)."""
    from . import archive, integrity, pt2_checks as pc

    entries = entries or program_entries(ep)
    files = {k: v for k, v in entries["files"].items() if k not in (pc.MANIFEST_ENTRY, pc.INTEGRITY_ENTRY)}
    manifest.setdefault("checksums", {})["weights_sha256"] = program_weights_sha256(ep)
    text, record = integrity.seal(manifest, {k: integrity.sha256(v) for k, v in files.items()}, sign_key)
    files[pc.MANIFEST_ENTRY], files[pc.INTEGRITY_ENTRY] = text, record
    root = entries["root"]
    _write_atomic(path, archive.write({f"{root}/{k}": v for k, v in files.items()}))
    return entries


def check_pt2(data: bytes, path: str, verify_key=None) -> tuple:
    """Every check, in order, on the bytes of a .pt2; returns (manifest, record, files under the root).

    Container (strict zip) → layout allow-list → integrity of every entry (and the signature) → payload
    configs → program lint. Nothing is handed to torch before all of them pass.
    """
    from . import archive, integrity, pt2_checks as pc

    entries = archive.read_strict(data, path, len(data) * 4 + (64 << 20))
    _, files = pc.split_root(entries, path)
    pc.check_layout(files, path)
    archive.check_canonical(data, entries, path)
    hashed = {k: integrity.sha256(v) for k, v in files.items() if k not in (pc.MANIFEST_ENTRY, pc.INTEGRITY_ENTRY)}
    manifest, record = integrity.verify(files.get(pc.MANIFEST_ENTRY), files.get(pc.INTEGRITY_ENTRY), hashed,
                                        path, verify_key)
    if manifest.get("format") != "pt2":
        raise ArtifactError(f"refusing to load {path}: its manifest says format {manifest.get('format')!r}, "
                            "not 'pt2'")
    pc.check_payloads(files, path)
    pc.lint_program(files, path)
    return manifest, record, files


def load_pt2(path: str, verify_key=None, max_bytes: int = MAX_BYTES) -> "Pt2Program":
    from . import archive, pt2_checks as pc

    data = _read_file(path, max_bytes)
    manifest, record, files = check_pt2(data, path, verify_key)
    # torch reads a fresh archive of exactly the checked bytes (no manifest, no second read of the file).
    clean = archive.write({f"model/{k}": v for k, v in files.items()
                           if k not in (pc.MANIFEST_ENTRY, pc.INTEGRITY_ENTRY)})
    _register_recopt_ops()
    try:
        ep = torch.export.load(io.BytesIO(clean))
    except Exception as e:
        raise ArtifactError(f"{path}: torch.export.load failed on the checked program: {type(e).__name__}: "
                            f"{str(e)[:300]}") from None
    digest = program_weights_sha256(ep)
    want = manifest.get("checksums", {}).get("weights_sha256")
    if digest != want:
        raise TamperedArtifactError(
            f"refusing to use {path}: its weights' SHA-256 is {digest[:16]}… but the manifest records "
            f"{str(want)[:16]}…, so the archive was modified or corrupted after export. Re-export the model "
            "with recopt.export.")
    prog = Pt2Program(path, ep, manifest)
    prog.signature = record["signature"]
    prog.signature_verified = verify_key is not None
    return prog


class Pt2Program:
    """A loaded ``.pt2`` program: ``program(*inputs)`` -> list of output tensors.

    ``exported_program`` is the ``torch.export.ExportedProgram``;
    ``module()`` the callable module; ``manifest`` the manifest.
    """

    provider = "torch (eager)"

    def __init__(self, path: str, ep, manifest: dict):
        self.path, self.exported_program, self.manifest = str(path), ep, manifest
        self._module = ep.module()
        self.input_names = [i["name"] for i in manifest.get("inputs", [])]
        self.output_names = [o["name"] for o in manifest.get("outputs", [])]

    def module(self):
        return self._module

    def __call__(self, *inputs):
        import torch.utils._pytree as pytree

        with torch.no_grad():
            out = self._module(*inputs)
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def __repr__(self) -> str:
        return f"Pt2Program({self.path!r}, inputs={self.input_names})"


# ----------------------------------------------------------------------------- AOTInductor


def save_aoti(ep, path: str, manifest: dict, inductor_configs: Optional[dict] = None, sign_key=None) -> None:
    try:
        from torch._inductor import aoti_compile_and_package
    except ImportError as e:  # pragma: no cover - very old torch
        raise ExportError(f"format='aoti' needs torch._inductor.aoti_compile_and_package ({e})") from None
    try:
        aoti_compile_and_package(ep, package_path=path, inductor_configs=inductor_configs or {})
    except Exception as e:
        raise ExportError(
            f"AOTInductor compilation failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}. "
            "It needs a working C++ compiler (CPU) or CUDA toolchain (GPU); format='pt2' needs neither."
        ) from e
    manifest.setdefault("checksums", {})["weights_sha256_state_dict"] = program_weights_sha256(ep)
    seal_aoti(path, manifest, sign_key)


def seal_aoti(path: str, manifest: dict, sign_key=None) -> None:
    """Hash every entry of the package into the sidecar manifest; write the integrity record beside it."""
    from . import archive, integrity

    with open(path, "rb") as f:
        entries = archive.read_strict(f.read(), path, 1 << 62)
    _write_atomic(path, archive.write(entries))   # the canonical form, which load_aoti insists on
    text, record = integrity.seal(manifest, {k: integrity.sha256(v) for k, v in entries.items()}, sign_key)
    _write_atomic(sidecar_path(path), text)  # exactly the bytes the record hashes
    _write_atomic(integrity_path(path), record)


def integrity_path(path: str) -> str:
    return str(path) + INTEGRITY_SUFFIX


def _read_small(p: str, what: str) -> Optional[bytes]:
    import os

    if not os.path.exists(p):
        return None
    if os.path.islink(p) or os.path.getsize(p) > (16 << 20):
        raise ArtifactError(f"refusing to load: {p} ({what}) is a symlink or larger than 16 MiB")
    with open(p, "rb") as f:
        return f.read()


def load_aoti(path: str, device_index: int = -1, verify_key=None, max_bytes: int = MAX_BYTES) -> "AotiPackage":
    """Check an AOTInductor package against its sidecar manifest, then load a private copy of the checked bytes.

    The package holds a compiled shared library (native code by design): it is opened only after every
    entry matched the manifest (and the signature, with ``verify_key``).
    """
    import tempfile

    from . import archive, integrity

    text = _read_small(sidecar_path(path), "manifest")
    if text is None:
        raise ArtifactError(f"{path}: the AOTInductor package's manifest {sidecar_path(path)} is missing; "
                            "recopt checks a package against it before running its compiled code. Ship both files.")
    record = _read_small(integrity_path(path), "integrity record")
    data = _read_file(path, max_bytes)
    entries = archive.read_strict(data, path, len(data) * 4 + (64 << 20))
    archive.check_canonical(data, entries, path)
    manifest, rec = integrity.verify(text, record, {k: integrity.sha256(v) for k, v in entries.items()}, path,
                                     verify_key)
    if manifest.get("format") != "aoti":
        raise ArtifactError(f"refusing to load {path}: its manifest says format {manifest.get('format')!r}")
    _register_recopt_ops()
    from torch._inductor import aoti_load_package

    tmpdir = tempfile.TemporaryDirectory(prefix="recopt-aoti-")
    private = f"{tmpdir.name}/package.pt2"
    with open(private, "wb") as f:
        f.write(archive.write(entries))
    runner = aoti_load_package(private, device_index=device_index)
    pkg = AotiPackage(path, runner, manifest)
    pkg._tmpdir = tmpdir
    pkg.signature, pkg.signature_verified = rec["signature"], verify_key is not None
    return pkg


class AotiPackage:
    """A loaded AOTInductor package: ``package(*inputs)`` -> list of output tensors."""

    provider = "AOTInductor"

    def __init__(self, path: str, runner: Any, manifest: dict):
        self.path, self.runner, self.manifest = str(path), runner, manifest
        self.input_names = [i["name"] for i in manifest.get("inputs", [])]
        self.output_names = [o["name"] for o in manifest.get("outputs", [])]

    def __call__(self, *inputs):
        import torch.utils._pytree as pytree

        with torch.no_grad():
            out = self.runner(*inputs)
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def __repr__(self) -> str:
        return f"AotiPackage({self.path!r}, inputs={self.input_names})"
