"""ONNX export (``torch.onnx.export(..., dynamo=True)`` with recopt's translations) and the ONNX runner.

:func:`export_onnx` translates a ``torch.export`` program, names its dynamic
dims (``batch``, ``seq``...), embeds the manifest in the model's
``metadata_props`` and saves it. An op with neither a torch nor a recopt
translation stops the export with the op's name, where it is in the model
and what to do (:func:`check_translatable`).

:class:`OnnxModel` is what :func:`recopt.export.load` returns for ``.onnx``
files: an onnxruntime session that checks the weights against the manifest
first and says which execution provider runs it.
"""
from __future__ import annotations

import linecache
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence

from ..errors import require
from .errors import ArtifactError, ExportError, TamperedArtifactError
from .manifest import onnx_weights_sha256

DEFAULT_OPSET = 18
FP8_OPSET = 21          # QuantizeLinear/DequantizeLinear with float8 and blocked scales
SEQUENCE_OPS = ("SequenceEmpty", "SequenceInsert", "SequenceAt", "SequenceConstruct", "SequenceLength",
                "SequenceErase", "ConcatFromSequence", "SplitToSequence", "SequenceMap")
_TORCH_INTERNAL = re.compile(r"/(torch|onnxscript|recopt/export|recopt/api|recopt/capture)/|<eval_with_key>")


# ----------------------------------------------------------------------------- untranslatable ops


def node_location(node, gm=None) -> str:
    """Where an exported-program node comes from: the user's source line, else the module path
    and the line of the (generated) graph code."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    user = [f for f in frames if not _TORCH_INTERNAL.search(f[0])]
    parts = []
    if user:
        file, line, func, code = user[-1]
        parts.append(f"{file}:{line} in {func}: {code.strip()}")
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        parts.append(f"module {path or '<root>'} ({cls_name.rsplit('.', 1)[-1]})")
    if not user:
        gen = [f for f in frames if "<eval_with_key>" in f[0]]
        if gen:
            file, line, func, code = gen[-1]
            code = code.strip() or linecache.getline(file, int(line)).strip()
            parts.append(f"graph code: {code}")
    return "; ".join(parts) if parts else f"graph node {node.name}"


_REGISTRY = []


def _registry():
    """torch's table of ATen→ONNX translations (built once; it takes about a second)."""
    if not _REGISTRY:
        from torch.onnx._internal.exporter._registration import ONNXRegistry

        _REGISTRY.append(ONNXRegistry.from_torchlib())
    return _REGISTRY[0]


def check_translatable(ep, table: Dict) -> None:
    """Raise ExportError for custom (non-aten) ops that have no ONNX translation.

    ATen ops without a direct translation are decomposed by the exporter, so
    only ops from other namespaces (``recopt::``, ``fbgemm::``, user
    libraries) are checked here; a failure inside the exporter is reported by
    :func:`_explain_exporter_error`.
    """
    import torch

    registry = _registry()
    missing = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        ns = node.target.namespace
        if ns in ("aten", "prims", "onnx") or node.target in table:
            continue
        if registry.is_registered(node.target):
            continue
        missing.append(node)
    if missing:
        lines = [f"  - {n.target} at {node_location(n)}" for n in missing[:8]]
        more = f"\n  ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        first = missing[0].target
        raise ExportError(
            "ONNX export: no ONNX translation for these ops:\n" + "\n".join(lines) + more + "\n"
            f"What to do: register one with recopt.export.register_translation({_op_expr(first)}, fn) "
            "(fn: an onnxscript function with the op's signature), or keep PyTorch's kernels with "
            "format='pt2' / 'aoti', or drop the pass that introduced the op (passes=[...] in recopt.optimize)."
        )


def _op_expr(op) -> str:
    ns, rest = str(op).split(".", 1) if "." in str(op) else ("?", str(op))
    return f"torch.ops.{ns}.{rest}"


def _explain_exporter_error(e: BaseException, ep) -> ExportError:
    msg = str(e)
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", msg)
    where = ""
    if m:
        qual = f"{m.group(1).replace('::', '.')}.{m.group(2)}"
        for node in ep.graph.nodes:
            if node.op == "call_function" and str(node.target) == qual:
                where = f" at {node_location(node)}"
                break
        return ExportError(
            f"ONNX export: no ONNX translation for {qual}{where}. What to do: register one with "
            f"recopt.export.register_translation(torch.ops.{qual}, fn), or export with format='pt2'."
        )
    inner = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = str(inner).strip() or str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if inner is not e:
        first = f"{type(inner).__name__}: {first}"
    return ExportError(
        f"ONNX export failed inside torch.onnx: {first[:400]}. What to do: export with format='pt2' "
        "(keeps PyTorch's kernels), or report the model's op at fault with this message."
    )


# ----------------------------------------------------------------------------- export


def needs_fp8_opset(ep) -> bool:
    return any(node.op == "call_function" and str(node.target).startswith("recopt.fp8_linear")
               for node in ep.graph.nodes)


def export_onnx(ep, args: tuple, path: str, input_names: Sequence[str], output_names: Sequence[str],
                symbols: Dict[str, str], manifest: dict, opset: Optional[int] = None, sign_key=None):
    """Translate ``ep`` to ONNX, save to ``path`` with ``manifest`` embedded; return the ModelProto.

    Fills ``manifest["onnx_opset"]``, ``["lowerings"]`` and ``["checksums"]``.
    """
    require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnx", "ONNX export")
    import onnx
    import torch

    from . import fp8_translation, translations

    if opset is None:
        opset = FP8_OPSET if needs_fp8_opset(ep) else DEFAULT_OPSET
    fp8_translation.set_opset(opset)
    table = translations.translation_table()
    check_translatable(ep, table)
    used = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function" and n.target in table})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, args, dynamo=True, input_names=list(input_names), output_names=list(output_names),
                custom_translation_table=table, opset_version=opset, optimize=True, verbose=False,
            )
    except ExportError:
        raise
    except Exception as e:  # the exporter's own errors are long internal traces
        raise _explain_exporter_error(e, ep) from e
    model = program.model_proto
    rename_dims(model, symbols)
    wrapped = wrap_in_functions(model)
    seq = sorted({n.op_type for n in model.graph.node if n.op_type in SEQUENCE_OPS})
    if seq:
        warnings.warn(f"recopt ONNX export: the model still uses Sequence ops {seq}; some runtimes reject them",
                      stacklevel=3)
    digest, n = onnx_weights_sha256(model)
    manifest["onnx_opset"] = opset
    manifest["lowerings"] = {op: translations.describe(op) for op in used}
    manifest["lowerings"].update(fp8_translation.notes())
    for op, n in wrapped.items():
        if op in manifest["lowerings"]:
            manifest["lowerings"][op] += (f"; each of the {n} call site(s) is a model-local ONNX function "
                                          f"{FUNCTION_DOMAIN}::{FUNCTION_OPS[op]}_<k>")
    manifest["sequence_ops"] = seq
    manifest["checksums"] = {"weights_sha256": digest, "n_tensors": n}
    save_onnx(model, path, manifest, sign_key)
    return model


# Custom ops whose translated nodes are wrapped into one model-local ONNX function per call site.
FUNCTION_OPS = {"recopt.gdpa.default": "GDPA", "recopt.gdpa_jagged.default": "GDPAJagged",
                "recopt.fp8_linear.default": "FP8Linear"}
FUNCTION_DOMAIN = "recopt"


def _fx_origin(node):
    """(fx node name, fx target) that produced an ONNX node, from the exporter's metadata."""
    md = {p.key: p.value for p in node.metadata_props}
    fx = md.get("pkg.torch.onnx.fx_node", "")
    m = re.match(r"%(\S+) : .*?call_function\[target=torch\.ops\.([\w.]+)\]", fx)
    return (m.group(1), m.group(2)) if m else (None, None)


def wrap_in_functions(model) -> Dict[str, int]:
    """Move the nodes each recopt op was translated to into a model-local ONNX function
    (domain ``recopt``, e.g. ``GDPA_0``) called by one node; returns {op: call sites wrapped}.

    A site is left inline when its nodes interleave with others in a way one
    call node cannot keep in topological order.
    """
    from onnx import helper

    g = model.graph
    nodes = list(g.node)
    groups: Dict[str, list] = {}
    target_of: Dict[str, str] = {}
    for idx, n in enumerate(nodes):
        name, target = _fx_origin(n)
        if target in FUNCTION_OPS:
            groups.setdefault(name, []).append(idx)
            target_of[name] = target
    if not groups:
        return {}
    graph_outputs = {o.name for o in g.output}
    consumers: Dict[str, list] = {}
    for idx, n in enumerate(nodes):
        for v in n.input:
            consumers.setdefault(v, []).append(idx)
    replace_at: Dict[int, Any] = {}
    drop = set()
    counts: Dict[str, int] = {}
    for fx_name, idxs in groups.items():
        members = set(idxs)
        produced = {o for i in idxs for o in nodes[i].output if o}
        inputs, seen = [], set()
        for i in idxs:
            for v in nodes[i].input:
                if v and v not in produced and v not in seen:
                    seen.add(v)
                    inputs.append(v)
        outputs = [o for i in idxs for o in nodes[i].output
                   if o and (o in graph_outputs or any(c not in members for c in consumers.get(o, [])))]
        last = max(idxs)
        if not outputs or any(c < last for o in outputs for c in consumers.get(o, []) if c not in members):
            continue
        op_name = FUNCTION_OPS[target_of[fx_name]]
        k = counts.get(op_name, 0)
        counts[op_name] = k + 1
        fname = f"{op_name}_{k}"
        fn = helper.make_function(FUNCTION_DOMAIN, fname, inputs, outputs, [nodes[i] for i in sorted(idxs)],
                                  opset_imports=list(model.opset_import))
        fn.doc_string = f"recopt translation of torch.ops.{target_of[fx_name]} (graph node {fx_name})"
        model.functions.append(fn)
        replace_at[last] = helper.make_node(fname, inputs, outputs, name=f"{FUNCTION_DOMAIN}_{fname}",
                                            domain=FUNCTION_DOMAIN)
        drop |= members - {last}
    if not replace_at:
        return {}
    new_nodes = [replace_at.get(i, n) for i, n in enumerate(nodes) if i not in drop]
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(o.domain == FUNCTION_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
    return {FUNCTION_OPS_INV.get(k.rsplit("_", 1)[0], k): v for k, v in counts.items()}


FUNCTION_OPS_INV = {v: k for k, v in FUNCTION_OPS.items()}


def save_onnx(model, path: str, manifest: dict, sign_key=None) -> None:
    """Seal (every part hashed, optionally signed) and save; weights over ~1.8 GB go to an external-data
    file ``<name>.data`` beside the model."""
    import onnx
    from onnx import external_data_helper

    from . import onnx_checks

    folder = os.path.dirname(os.path.abspath(path))
    if model.ByteSize() > onnx_checks.EXTERNAL_DATA_THRESHOLD:
        external_data_helper.convert_model_to_external_data(
            model, all_tensors_to_one_file=True, location=os.path.basename(path) + ".data",
            size_threshold=onnx_checks.EXTERNAL_TENSOR_MIN_BYTES)
        external_data_helper.write_external_data_tensors(model, folder)
    onnx_checks.seal(model, folder, manifest, sign_key)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    os.replace(tmp, path)


def update_manifest_on_disk(path: str, manifest: dict, sign_key=None) -> None:
    """Re-seal the model at ``path`` (just written by :func:`save_onnx`) with an updated manifest."""
    from . import onnx_checks

    with open(path, "rb") as f:
        model = onnx_checks.parse(f.read(), path)
    onnx_checks.seal(model, os.path.dirname(os.path.abspath(path)), manifest, sign_key)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    os.replace(tmp, path)


def rename_dims(model, symbols: Dict[str, str]) -> None:
    """Replace torch's symbol names (``s0``) in dim_params by the dim names (``batch``)."""
    if not symbols:
        return
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.dim_param = symbols[d.dim_param]
            elif d.HasField("dim_param"):
                d.dim_param = _substitute(d.dim_param, symbols)


def _substitute(expr: str, symbols: Dict[str, str]) -> str:
    return re.sub(r"\b[su]\d+\b", lambda m: symbols.get(m.group(0), m.group(0)), expr)


# ----------------------------------------------------------------------------- load


def resolve_providers(providers: Optional[Sequence]) -> List:
    """Execution providers to ask for: None -> CPU; "cuda"/"gpu" -> CUDA then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    out = []
    for p in providers:
        name = p[0] if isinstance(p, (tuple, list)) else p
        alias = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}.get(str(name).lower(), name)
        if alias not in available:
            warnings.warn(f"recopt.load: execution provider {alias} is not available in this onnxruntime "
                          f"(available: {available}); for CUDA install the [gpu] extra (onnxruntime-gpu). "
                          "Falling back to the next provider.", stacklevel=3)
            continue
        out.append((alias, p[1]) if isinstance(p, (tuple, list)) else alias)
    if not any((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in out):
        out.append("CPUExecutionProvider")
    return out


class OnnxModel:
    """A loaded ONNX artifact: ``model(*inputs)`` -> list of outputs.

    Inputs may be numpy arrays or torch tensors (positional, in the
    manifest's input order, or by name via :meth:`run`); outputs are numpy
    arrays, or torch tensors when the inputs were torch tensors.
    ``provider`` is the execution provider that runs the model;
    ``manifest`` the artifact's manifest.
    """

    def __init__(self, path: str, providers: Optional[Sequence] = None, session_options: Any = None,
                 verify_key=None, max_bytes: Optional[int] = None):
        require("onnx", "onnx", "loading an ONNX artifact")
        ort = require("onnxruntime", "onnx", "loading an ONNX artifact")
        from . import onnx_checks

        self.path = str(path)
        model, manifest, record = onnx_checks.check_onnx(self.path, verify_key,
                                                         max_bytes or onnx_checks.MAX_BYTES)
        digest, _ = onnx_weights_sha256(model)
        want = manifest.get("checksums", {}).get("weights_sha256")
        if digest != want:
            raise TamperedArtifactError(
                f"refusing to load {self.path}: its weights' SHA-256 is {digest[:16]}… but the manifest records "
                f"{str(want)[:16]}…, so the file was modified or corrupted after export. Re-export the model "
                "with recopt.export."
            )
        self.manifest = manifest
        self.signature, self.signature_verified = record["signature"], verify_key is not None
        if model.ByteSize() >= 2_000_000_000:
            raise ArtifactError(f"{self.path}: the model with its weights is over protobuf's 2 GB limit; recopt "
                                "hands onnxruntime only bytes it checked, so such models cannot be loaded yet")
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options,
                                                providers=resolve_providers(providers))
        except Exception as e:  # onnxruntime rejects the (checked) graph: say so with its reason
            raise ArtifactError(explain_session_error(e, model, self.path)) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> List[str]:
        return self.session.get_providers()

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (the first one the session accepted)."""
        return self.providers[0]

    def run(self, feeds: Dict[str, Any]) -> list:
        return self.session.run(None, {k: _as_numpy(v) for k, v in feeds.items()})

    def __call__(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise ArtifactError(f"the model takes {len(self.input_names)} inputs {self.input_names}, "
                                f"got {len(inputs)}")
        torch_in = any(type(x).__module__.startswith("torch") for x in inputs)
        outs = self.session.run(None, {n: _as_numpy(x) for n, x in zip(self.input_names, inputs)})
        if torch_in:
            import torch

            return [torch.from_numpy(o) for o in outs]
        return outs

    def __repr__(self) -> str:
        return f"OnnxModel({self.path!r}, provider={self.provider}, inputs={self.input_names})"


def explain_session_error(e: BaseException, model, path: str) -> str:
    """One line for an onnxruntime session that would not build: the op, its opset, the dtype, what to do."""
    text = " ".join(str(e).split())
    m = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", text)
    if not m:
        return f"onnxruntime cannot run {path}: {type(e).__name__}: {text[:300]}"
    op, version, node = m.groups()
    bf16 = any(i.type.tensor_type.elem_type == 16 for i in model.graph.input) or any(
        t.data_type == 16 for t in model.graph.initializer)
    why = ("the model computes in bfloat16, and onnxruntime's CPU provider has no bfloat16 kernel for it"
           if bf16 else "onnxruntime has no kernel for it with this model's dtypes")
    todo = ("export a float32 copy for ONNX (model.float() with float32 example inputs; cast at the server), or "
            "keep bfloat16 with format='pt2'" if bf16 else "export with format='pt2', or change the op's dtype")
    return (f"onnxruntime cannot run {path}: op {op} (opset {version}, node {node!r}): {why}. What to do: {todo}")


def _as_numpy(x):
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return x
