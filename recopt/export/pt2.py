"""``torch.export`` programs (``.pt2``) and AOTInductor packages, saved and loaded safely.

Saving: ``pt2`` is ``torch.export.save`` with the manifest as an extra file
inside the archive; ``aoti`` is ``torch._inductor.aoti_compile_and_package``
with the manifest in a sidecar JSON (``<path>.manifest.json``).

Loading never unpickles anything from the artifact. ``torch.export.load``
would: pickled weights/constants are read with ``weights_only=False``, and
the sample inputs fall back to ``weights_only=False`` when the safe load
fails. So :func:`check_archive_is_safe` reads the archive first (from one
in-memory copy, which is then what gets loaded) and refuses it when

- a weight or constant payload is marked ``use_pickle`` or is a custom /
  opaque object (those are pickles), or a legacy ``.pt`` weights file exists;
- the sample inputs do not load with ``torch.load(weights_only=True)``.

Weights are then checked against the manifest's checksum (SHA-256 over the
state dict and constants: name, dtype, shape, bytes) before the program is
returned. An AOTInductor package contains a compiled shared library, i.e.
native code by design: its whole archive is checksummed against the
sidecar manifest before it is opened — load packages only from sources
you trust.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any, Dict, Optional

import torch

from .errors import ArtifactError, ExportError, TamperedArtifactError
from .manifest import PT2_MANIFEST_NAME, archive_sha256, dumps, read_archive_manifest, read_sidecar, write_sidecar

_PICKLE_PREFIXES = ("custom_obj", "opaque_obj")


def _register_recopt_ops() -> None:
    """Import the modules that define recopt's custom ops, so programs using them deserialize."""
    for mod in ("recopt.ops", "recopt.fp8.linear"):
        try:
            __import__(mod)
        except Exception:
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


def save_pt2(ep, path: str, manifest: dict) -> None:
    manifest["checksums"] = {"weights_sha256": program_weights_sha256(ep)}
    torch.export.save(ep, path, extra_files={PT2_MANIFEST_NAME: dumps(manifest)})


def check_archive_is_safe(data: bytes, path: str) -> None:
    """Raise ArtifactError if loading this .pt2 archive could unpickle anything."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path} is not a .pt2 archive (not a zip file)") from None
    with zf:
        for name in zf.namelist():
            base = name.split("/", 1)[-1]
            if base.startswith(("data/weights/", "data/constants/")) and base.endswith(".pt"):
                raise ArtifactError(f"refusing to load {path}: {name} is a legacy pickled payload; "
                                    "re-export the model with recopt.export")
            if base.startswith("data/") and base.endswith("_config.json"):
                config = json.loads(zf.read(name).decode()).get("config", {})
                for fqn, meta in config.items():
                    pickled = meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(_PICKLE_PREFIXES)
                    if pickled:
                        raise ArtifactError(
                            f"refusing to load {path}: payload {fqn!r} ({name}) is a pickle, and recopt never "
                            "unpickles artifacts (it could run arbitrary code). Re-export without tensor "
                            "subclasses or script objects in the model's state.")
            if base.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(zf.read(name)), weights_only=True)
                except Exception as e:
                    raise ArtifactError(
                        f"refusing to load {path}: its sample inputs ({name}) do not load with "
                        f"torch.load(weights_only=True) ({type(e).__name__}), and torch.export.load would retry "
                        "them with full unpickling. Re-export the model with recopt.export.") from None


def load_pt2(path: str) -> "Pt2Program":
    with open(path, "rb") as f:
        data = f.read()
    try:
        check_archive_is_safe(data, path)
    except (zipfile.BadZipFile, EOFError) as e:
        raise TamperedArtifactError(f"refusing to load {path}: the archive is corrupted ({e}); re-export it") \
            from None
    manifest = read_archive_manifest(path)
    if manifest is None:
        raise ArtifactError(f"{path} has no recopt manifest ({PT2_MANIFEST_NAME}); it was not written by "
                            "recopt.export. Load it with torch.export.load only if you trust its source.")
    _register_recopt_ops()
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise ArtifactError(f"{path}: torch.export.load failed: {type(e).__name__}: {str(e)[:300]}") from None
    digest = program_weights_sha256(ep)
    want = manifest.get("checksums", {}).get("weights_sha256")
    if digest != want:
        raise TamperedArtifactError(
            f"refusing to use {path}: its weights' SHA-256 is {digest[:16]}… but the manifest records "
            f"{str(want)[:16]}…, so the archive was modified or corrupted after export. Re-export the model "
            "with recopt.export.")
    return Pt2Program(path, ep, manifest)


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


def save_aoti(ep, path: str, manifest: dict, inductor_configs: Optional[dict] = None) -> None:
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
    manifest["checksums"] = archive_sha256(path)
    manifest["checksums"]["weights_sha256_state_dict"] = program_weights_sha256(ep)
    write_sidecar(path, manifest)


def load_aoti(path: str, device_index: int = -1) -> "AotiPackage":
    manifest = read_sidecar(path)
    if manifest is None:
        raise ArtifactError(f"{path}: the AOTInductor package's manifest {path}.manifest.json is missing; "
                            "recopt checks a package against it before running its compiled code. Ship both files.")
    try:
        got = archive_sha256(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise TamperedArtifactError(f"refusing to load {path}: the package is corrupted ({e}); re-export it") \
            from None
    want = manifest.get("checksums", {})
    for key in ("weights_sha256", "archive_sha256"):
        if got[key] != want.get(key):
            raise TamperedArtifactError(
                f"refusing to load {path}: {key} is {got[key][:16]}… but the manifest records "
                f"{str(want.get(key))[:16]}…; the package was modified or corrupted after export. Re-export it.")
    _register_recopt_ops()
    from torch._inductor import aoti_load_package

    runner = aoti_load_package(path, device_index=device_index)
    return AotiPackage(path, runner, manifest)


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
