"""Export optimized graphs for serving: ONNX (+ onnxruntime parity), ``torch.export`` .pt2, AOTInductor.

::

    opt = recopt.optimize(model, example_inputs, target="cpu")
    recopt.export.export(opt, example_inputs, "model.onnx")   # format from the suffix
    sess = recopt.export.load("model.onnx")                   # callable, with .manifest and .provider
    logits, = sess(*example_inputs)

Every artifact carries a manifest (:mod:`recopt.export.manifest`): versions,
target, passes and configs, input/output names, shapes, dtypes and dynamic
dims, and a SHA-256 of the weights that :func:`load` checks. With
``verify=True`` (default) the saved artifact is loaded back and compared
with PyTorch on the example inputs and on fresh random inputs with other
dynamic sizes (:mod:`recopt.export.parity`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from ..errors import InputError, MissingDependencyError
from .errors import ArtifactError, ExportError, ParityError, SignatureError, TamperedArtifactError
from .manifest import read_manifest
from .translations import register_translation, translated_ops

FORMATS = ("onnx", "pt2", "aoti")
RECOPT_BATCH_INPUTS = ("dense", "sparse_ids", "seq_ids", "seq_lengths", "seq_times")


@dataclass
class ExportResult:
    """What :func:`export` wrote: ``path``, ``format``, the ``manifest`` (a dict) and the parity runs."""

    path: str
    format: str
    manifest: dict
    parity: list = field(default_factory=list)

    def load(self, providers=None, **kwargs):
        return load(self.path, providers=providers, **kwargs)


def _format_for(path: str, fmt: Optional[str]) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
        return fmt
    p = str(path).lower()
    if p.endswith(".onnx"):
        return "onnx"
    if p.endswith(".pt2"):
        return "pt2"
    raise InputError(f"cannot tell the export format from {path!r}: use a .onnx or .pt2 suffix, "
                     "or pass format='onnx' | 'pt2' | 'aoti'")


def _model_spec(src):
    """recopt's FeatureSpec when the exported model is one of recopt.models (5-tensor batch format)."""
    spec = getattr(src.original, "spec", None)
    from ..data.batch import FeatureSpec

    if isinstance(spec, FeatureSpec) and tuple(src.input_names) == RECOPT_BATCH_INPUTS:
        return spec
    return None


def export(
    opt_or_module: Any,
    example_inputs: Any,
    path: str,
    format: Optional[str] = None,
    verify: bool = True,
    dynamic_batch: bool = True,
    dynamic_dims: Optional[Dict[str, Any]] = None,
    *,
    output_names: Optional[Sequence[str]] = None,
    opset: Optional[int] = None,
    parity_inputs: Sequence[tuple] = (),
    n_random_inputs: int = 2,
    rtol: Optional[float] = None,
    inductor_configs: Optional[dict] = None,
    progress: bool = False,
    sign_key: Any = None,
) -> ExportResult:
    """Export ``opt_or_module`` (``recopt.optimize``'s result or any nn.Module) to ``path``.

    Args:
        example_inputs: the tuple of tensors ``forward`` takes (a real-looking batch).
        path: ``*.onnx`` or ``*.pt2``; ``format`` overrides the suffix
            (``"aoti"`` writes an AOTInductor package, usually named ``*.pt2``).
        verify: load the artifact back and check parity with PyTorch
            (example inputs + ``n_random_inputs`` fresh sets with other dynamic
            sizes + ``parity_inputs``); raises :class:`ParityError` naming the
            output and the largest difference (fp32: relative error ≤ 1e-4).
        dynamic_batch: axis 0 of every input is the dynamic dim ``batch``.
        dynamic_dims: more dynamic dims, ``{input name: {axis: dim name}}`` or
            ``{input name: [axes]}``; equal names mean equal sizes. ``None``:
            for recopt's models (5-tensor batch) the sequence length
            ``seq_ids``/``seq_times`` axis 2 is ``seq``; otherwise none.
        output_names: names of the flattened outputs (default ``output`` /
            ``output_0..``).
        opset: ONNX opset (default 18, or 21 when the graph has FP8 linears).
        sign_key: sign the artifact: an Ed25519 private key (``cryptography``,
            the ``[sign]`` extra) or a bytes/str secret (≥ 16 bytes) for
            HMAC-SHA256. :func:`load` checks it with ``verify_key=``.

    Returns:
        :class:`ExportResult` (``path``, ``format``, ``manifest``, ``parity``).

    Raises:
        ExportError: an op has no ONNX translation (names the op, its source
            line and what to do), or the exporter failed.
        ParityError: the artifact disagrees with PyTorch.
    """
    import torch

    from . import fp8_translation, manifest as mf, onnx_export, parity, program, pt2
    from .._progress import progress_bar

    fmt = _format_for(path, format)
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    steps = ["capture program", f"write {fmt}"] + (["verify parity"] if verify else [])
    bar = iter(progress_bar(steps, desc="recopt.export", disable=not progress))
    next(bar, None)

    src = program.resolve_source(opt_or_module, example_inputs)
    spec = _model_spec(src)
    if dynamic_dims is None and spec is not None:
        dynamic_dims = {"seq_ids": {2: "seq"}, "seq_times": {2: "seq"}}
    dims = program.normalise_dynamic_dims(dynamic_dims, src.input_names, src.args, dynamic_batch)
    try:
        ep = program.export_program(src, dims)
    except Exception as e:
        raise ExportError(
            f"torch.export could not capture the model: {type(e).__name__}: {str(e).strip()[:600]}. "
            "What to do: pass dynamic_batch=False / fewer dynamic_dims if a dim must stay fixed, or make the "
            "failing line export-friendly (see the torch.export message above)."
        ) from e
    desc = program.describe_program(ep, src, dims)
    ref_out = program.reference_outputs(src.module, src.args)
    outputs = program.output_entries(ref_out, output_names, program.program_output_shapes(ep, desc["symbols"]))
    out_names = [o["name"] for o in outputs]

    manifest = mf.base_manifest(fmt, src.report)
    manifest.update({
        "inputs": desc["inputs"], "outputs": outputs, "dynamic_dims": desc["dynamic_dims"],
        "specialized_dims": desc["specialized_dims"], "notes": list(src.notes),
    })
    next(bar, None)
    if fmt == "onnx":
        onnx_export.export_onnx(ep, src.args, path, src.input_names, out_names, desc["symbols"], manifest,
                                opset=opset, sign_key=sign_key)
    elif fmt == "pt2":
        manifest["lowerings"] = {}
        entries = pt2.save_pt2(ep, path, manifest, sign_key)
    else:
        manifest["lowerings"] = {}
        pt2.save_aoti(ep, path, manifest, inductor_configs, sign_key)

    runs = []
    if verify:
        next(bar, None)
        rtol_reason = None
        if fmt == "onnx" and rtol is None and fp8_translation.quantized():
            rtol = fp8_translation.FP8_PARITY_RTOL
            rtol_reason = ("FP8 linears: an upstream 1-ulp difference can move one activation across a float8 "
                           "rounding boundary")
        try:
            artifact = load(path)
        except ArtifactError as e:  # e.g. onnxruntime has no kernel for an op/dtype: the export is unusable
            raise ExportError(f"the {fmt} artifact was written to {path} but cannot be run: {e}") from None
        sets = [("the example inputs", src.args)]
        for k, sizes in enumerate(parity.choose_sizes(desc, src.args, n_random_inputs)):
            label = "random inputs " + ", ".join(f"{n}={v}" for n, v in sizes.items()) if sizes else "random inputs"
            sets.append((label, parity.fresh_inputs(src.args, desc, sizes, seed=1000 + k, model_spec=spec)))
        sets += [(f"parity_inputs[{i}]", tuple(x)) for i, x in enumerate(parity_inputs)]

        def reference(inputs):
            return program.reference_outputs(src.module, inputs)

        runs = parity.check_parity(lambda inputs: artifact(*inputs), reference, sets, out_names, rtol=rtol,
                                   what=f"{fmt} export ({getattr(artifact, 'provider', fmt)})", fmt=fmt)
        manifest["parity"] = {
            "rtol": rtol if rtol is not None else parity.DEFAULT_RTOL.get(torch.float32),
            "runtime": getattr(artifact, "provider", fmt),
            "runs": [r.to_dict() for r in runs],
        }
        if rtol_reason:
            manifest["parity"]["rtol_reason"] = rtol_reason
        if fmt == "onnx":
            import onnxruntime

            manifest["parity"]["onnxruntime_version"] = onnxruntime.__version__
            onnx_export.update_manifest_on_disk(path, manifest, sign_key)
        elif fmt == "pt2":
            pt2.save_pt2(ep, path, manifest, sign_key, entries=entries)
        else:
            pt2.seal_aoti(path, manifest, sign_key)
    for _ in bar:
        pass
    return ExportResult(path, fmt, manifest, runs)


def load(path: str, providers: Optional[Sequence] = None, *, verify_key: Any = None,
         max_bytes: Optional[int] = None, **kwargs):
    """Load an artifact written by :func:`export`, after checking all of it.

    - ``.onnx``: an :class:`~recopt.export.onnx_export.OnnxModel` (onnxruntime
      session). ``providers``: ``None`` (CPU), ``"cuda"`` (CUDA execution
      provider, needs the ``[gpu]`` extra's onnxruntime-gpu; falls back to CPU
      with a warning), or onnxruntime provider names/tuples. ``.provider``
      says which one runs.
    - ``.pt2`` program: a :class:`~recopt.export.pt2.Pt2Program`.
    - AOTInductor package (sidecar manifest ``<path>.manifest.json``): an
      :class:`~recopt.export.pt2.AotiPackage`.

    Guarantees (docs/export.md): nothing from the file is unpickled or
    executed as Python; every file of the artifact matches the SHA-256 its
    manifest records, checked before anything else is parsed; with
    ``verify_key`` (Ed25519 public key or the HMAC secret) the artifact must
    carry a valid signature from that key. ``max_bytes`` caps the file size
    (default 8 GiB). Every refusal is an :class:`ArtifactError` (a
    :class:`TamperedArtifactError` when a digest does not match, a
    :class:`SignatureError` when the signature does not verify).
    """
    from . import manifest as mf, onnx_export, pt2

    path = str(path)
    if not os.path.lexists(path):
        raise ArtifactError(f"no such artifact: {path}")
    limit = {"max_bytes": max_bytes} if max_bytes is not None else {}
    try:
        if os.path.lexists(mf.sidecar_path(path)) or os.path.lexists(pt2.integrity_path(path)):
            return pt2.load_aoti(path, verify_key=verify_key, **limit, **kwargs)
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):  # zip: a torch.export archive
            return pt2.load_pt2(path, verify_key=verify_key, **limit)
        return onnx_export.OnnxModel(path, providers=providers, verify_key=verify_key, **limit, **kwargs)
    except (ArtifactError, MissingDependencyError, TypeError):
        raise
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # any other failure while checking untrusted bytes is a refusal, with its reason
        raise ArtifactError(f"refusing to load {path}: checking it failed with {type(e).__name__}: "
                            f"{str(e)[:300]}") from None


__all__ = ["export", "load", "ExportResult", "read_manifest", "register_translation", "translated_ops",
           "ExportError", "ParityError", "ArtifactError", "TamperedArtifactError", "SignatureError", "FORMATS"]


class _CallableModule(__import__("types").ModuleType):
    """``recopt.export`` is this package *and* callable as :func:`export`.

    ``recopt.export(opt, inputs, "m.onnx")`` and ``recopt.export.export(...)``,
    ``recopt.export.load(...)``, ``import recopt.export as rx`` all work: the
    package and the function no longer fight over one name.
    """

    def __call__(self, *args, **kwargs) -> ExportResult:
        return export(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
