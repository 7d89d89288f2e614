"""What a ``.pt2`` program archive may contain, checked before torch reads any of it.

The allow-list is written for the archive layout of the pinned torch (2.13,
``archive_version`` 0); every entry lives under one root folder:

=====================================  =========================================================
``archive_format``                     exactly ``pt2``
``archive_version``                    exactly torch's ``ARCHIVE_VERSION_VALUE``
``byteorder``                          exactly ``little``
``.data/version``, ``.data/serialization_id``  digits
``models/model.json``                  the program (JSON), linted by :func:`lint_program`
``data/weights/model_weights_config.json``, ``data/constants/model_constants_config.json``
                                       payload configs: every payload raw (``use_pickle`` false),
                                       named ``weight_<n>`` / ``tensor_<n>``, its strided view inside
                                       the payload's bytes
``data/weights/weight_<n>``, ``data/constants/tensor_<n>``  raw little-endian tensor bytes
``data/sample_inputs/model.pt``        must be empty (torch would unpickle it)
``extra/recopt_manifest.json``, ``extra/recopt_integrity.json``  recopt's manifest and record
=====================================  =========================================================

Anything else — torch's older layout (a top-level pickled state dict, which
``torch.export.load`` falls back to and unpickles), legacy ``.pt`` weights,
custom or opaque objects (pickles), AOTInductor code — is refused.

:func:`lint_program` walks the program JSON: every node target must be an
operator of an allowed namespace (``torch.ops.aten|prims|recopt|...``) or one
of the symbolic-shape helpers, since torch resolves targets by attribute
lookup (``torch.load`` or ``torch.ops.load_library`` would become callable
graph nodes), and every symbolic expression must be plain arithmetic over
shape symbols, since torch parses them with ``sympy.sympify`` (which
evaluates Python).
"""
from __future__ import annotations

import json
import re
from typing import Dict, Optional

from .errors import ArtifactError

MANIFEST_ENTRY = "extra/recopt_manifest.json"
INTEGRITY_ENTRY = "extra/recopt_integrity.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"

_FIXED = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little"}
_DIGITS = {".data/version": re.compile(rb"^\d{1,6}\n?$"), ".data/serialization_id": re.compile(rb"^\d{1,64}$")}
_PAYLOAD = {"weights": ("data/weights/", re.compile(r"^weight_\d{1,9}$")),
            "constants": ("data/constants/", re.compile(r"^tensor_\d{1,9}$"))}
_JSON_ENTRIES = (PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG)

_ALLOWED_NAMESPACES = ("aten", "prims", "recopt", "recopt_test", "fbgemm", "higher_order")
_TARGET = re.compile(r"^torch\.ops\.(" + "|".join(_ALLOWED_NAMESPACES) + r")\.(?!__)[A-Za-z_][A-Za-z0-9_]*"
                     r"(\.(?!__)[A-Za-z_][A-Za-z0-9_]*)?$")
# Higher-order ops that only run subgraphs of the same program (no side tables, no Python callables).
_HIGHER_ORDER = {"cond", "while_loop", "map_impl", "scan", "associative_scan", "invoke_subgraph",
                 "wrap_with_set_grad_enabled", "wrap_with_autocast", "auto_functionalized", "auto_functionalized_v2",
                 "with_effects"}
_SYM_TARGETS = {
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
    "_operator.truediv", "_operator.mod", "_operator.neg", "_operator.pow", "_operator.eq", "_operator.ne",
    "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge", "_operator.and_", "_operator.or_",
    "_operator.not_", "torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not",
    "torch.sym_ite", "torch.sym_sqrt", "torch.sym_sum", "math.ceil", "math.floor", "math.trunc", "math.sqrt",
    "torch._sym_sqrt",
}
_SYM_FUNCS = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "IsNonOverlappingAndDenseIndicator", "RoundToInt", "RoundDecimal", "ToFloat", "OpaqueUnaryFn_sqrt",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "floor", "ceiling", "Piecewise", "True", "False", "oo", "zoo", "nan",
    "sqrt", "Integer", "Rational", "Float", "Symbol", "ITE", "Add", "Mul", "Pow", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "Equality", "Unequality", "BooleanTrue", "BooleanFalse", "Half", "One",
    "Zero", "NegativeOne", "Infinity", "NegativeInfinity", "true", "false", "S",
}
_SYMBOL = re.compile(r"^[a-z]{1,4}\d+$")
_DTYPE_SIZES = {1: 1, 2: 1, 28: 2, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
                29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}


def _refuse(path: str, what: str) -> ArtifactError:
    return ArtifactError(f"refusing to load {path}: {what}. recopt loads only .pt2 archives it wrote itself "
                         "(re-export the model with recopt.export)")


def split_root(entries: Dict[str, bytes], path: str) -> tuple:
    """(root folder, {name under the root: bytes}); one root folder for every entry."""
    roots = {n.split("/", 1)[0] for n in entries}
    if len(roots) != 1 or any("/" not in n for n in entries):
        raise _refuse(path, f"entries must all sit in one folder, found top-level names {sorted(roots)[:4]} "
                            "(torch's older layout keeps a pickled state dict at the top level)")
    root = roots.pop()
    return root, {n[len(root) + 1:]: b for n, b in entries.items()}


def check_layout(files: Dict[str, bytes], path: str) -> None:
    """Every entry is on the allow-list, with the content format it must have."""
    for name, blob in files.items():
        if name in _FIXED:
            if blob != _FIXED[name]:
                raise _refuse(path, f"{name} is {blob[:20]!r}, torch 2.13 writes {_FIXED[name]!r}")
        elif name in _DIGITS:
            if not _DIGITS[name].match(blob):
                raise _refuse(path, f"{name} is not a version number")
        elif name in _JSON_ENTRIES or name in (MANIFEST_ENTRY, INTEGRITY_ENTRY):
            pass  # parsed (and checked) after the integrity check
        elif name == SAMPLE_INPUTS:
            if blob:
                raise _refuse(path, f"{name} holds {len(blob)} bytes; it is a pickle that torch.export.load "
                                    "would unpickle, and recopt writes it empty")
        elif any(name.startswith(d) and rx.match(name[len(d):]) for d, rx in _PAYLOAD.values()):
            pass
        else:
            hint = ""
            if name.endswith((".pt", ".pkl", ".pickle")) or "custom_obj" in name or "opaque_obj" in name:
                hint = " (a pickled payload)"
            elif name.startswith("data/aotinductor/"):
                hint = " (compiled code: load AOTInductor packages with format 'aoti' and their sidecar manifest)"
            raise _refuse(path, f"unexpected entry {name!r}{hint}")
    for name in (PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG, "archive_format", "archive_version", SAMPLE_INPUTS):
        if name not in files:
            raise _refuse(path, f"the entry {name!r} is missing")


def _json(files: Dict[str, bytes], name: str, path: str):
    try:
        return json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _refuse(path, f"{name} is not valid JSON ({e})") from None


def _int(v, what: str, path: str) -> int:
    if not (isinstance(v, dict) and set(v) == {"as_int"} and isinstance(v["as_int"], int)
            and not isinstance(v["as_int"], bool) and v["as_int"] >= 0):
        raise _refuse(path, f"{what} is not a plain non-negative integer")
    return v["as_int"]


def check_payloads(files: Dict[str, bytes], path: str) -> None:
    """Payload configs: raw tensors only, each view inside its bytes; no payload without a config."""
    used = set()
    for kind, cfg_name in (("weights", WEIGHTS_CONFIG), ("constants", CONSTANTS_CONFIG)):
        folder, pattern = _PAYLOAD[kind]
        cfg = _json(files, cfg_name, path)
        if not (isinstance(cfg, dict) and set(cfg) == {"config"} and isinstance(cfg["config"], dict)):
            raise _refuse(path, f"{cfg_name} is not a payload config")
        for fqn, meta in cfg["config"].items():
            if not isinstance(meta, dict) or set(meta) != {"path_name", "is_param", "use_pickle", "tensor_meta"}:
                raise _refuse(path, f"{cfg_name}: payload {fqn!r} has unexpected fields")
            if meta["use_pickle"] is not False:
                raise _refuse(path, f"payload {fqn!r} ({cfg_name}) is a pickle, and recopt never unpickles "
                                    "artifacts (it could run arbitrary code)")
            pname = meta["path_name"]
            if not isinstance(pname, str) or not pattern.match(pname) or folder + pname not in files:
                raise _refuse(path, f"payload {fqn!r} names {str(pname)[:60]!r}, which is not a raw "
                                    f"{kind} entry of the archive")
            tm = meta["tensor_meta"]
            if not isinstance(tm, dict) or tm.get("dtype") not in _DTYPE_SIZES:
                raise _refuse(path, f"payload {fqn!r} has no tensor dtype recopt knows")
            dev = tm.get("device")
            if not (isinstance(dev, dict) and dev.get("type") in ("cpu", "cuda", "meta")):
                raise _refuse(path, f"payload {fqn!r} has an unexpected device {dev!r}")
            sizes = [_int(s, f"payload {fqn!r} size", path) for s in tm.get("sizes") or []]
            strides = [_int(s, f"payload {fqn!r} stride", path) for s in tm.get("strides") or []]
            offset = _int(tm.get("storage_offset"), f"payload {fqn!r} storage offset", path)
            if len(sizes) != len(strides):
                raise _refuse(path, f"payload {fqn!r} has {len(sizes)} sizes but {len(strides)} strides")
            nbytes = len(files[folder + pname])
            esize = _DTYPE_SIZES[tm["dtype"]]
            if nbytes % esize:
                raise _refuse(path, f"payload {pname} is {nbytes} bytes, not a whole number of elements")
            if all(sizes) and sizes:
                last = offset + sum((s - 1) * st for s, st in zip(sizes, strides))
                if (last + 1) * esize > nbytes:
                    raise _refuse(path, f"payload {fqn!r} reaches past the end of {pname}")
            used.add(folder + pname)
    unused = sorted(n for n in files if any(n.startswith(d) and rx.match(n[len(d):]) for d, rx in _PAYLOAD.values())
                    and n not in used)
    if unused:
        raise _refuse(path, f"payload entries no config refers to: {unused[:3]}")


def _check_target(target, where: str, path: str) -> None:
    ok = isinstance(target, str) and (_TARGET.match(target) or target in _SYM_TARGETS)
    if ok and target.startswith("torch.ops.higher_order."):
        ok = target.split(".")[3] in _HIGHER_ORDER
    if not ok:
        raise _refuse(path, f"{where} calls {str(target)[:80]!r}, which is not an operator recopt allows in a "
                            f"program (namespaces {', '.join(_ALLOWED_NAMESPACES)} and shape arithmetic)")


_SYM_KWARGS = {"positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite", "zero",
               "nonzero", "even", "odd", "evaluate"}
_AST_OPS = None


def _ast_ok(node) -> bool:
    import ast

    global _AST_OPS
    if _AST_OPS is None:
        _AST_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd,
                    ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
                    ast.BitAnd, ast.BitOr, ast.Invert)
    if isinstance(node, ast.Expression):
        return _ast_ok(node.body)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, bool)) or (
            isinstance(node.value, str) and bool(_SYMBOL.match(node.value)))
    if isinstance(node, ast.Name):
        return bool(_SYMBOL.match(node.id)) or node.id in _SYM_FUNCS
    if isinstance(node, ast.Call):
        return (isinstance(node.func, ast.Name) and node.func.id in _SYM_FUNCS and all(map(_ast_ok, node.args))
                and all(k.arg in _SYM_KWARGS and isinstance(k.value, ast.Constant)
                        and isinstance(k.value.value, bool) for k in node.keywords))
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _AST_OPS) and _ast_ok(node.left) and _ast_ok(node.right)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _AST_OPS) and _ast_ok(node.operand)
    if isinstance(node, ast.BoolOp):
        return isinstance(node.op, _AST_OPS) and all(map(_ast_ok, node.values))
    if isinstance(node, ast.Compare):
        return all(isinstance(o, _AST_OPS) for o in node.ops) and _ast_ok(node.left) and all(
            map(_ast_ok, node.comparators))
    return False


def check_sym_expr(expr, path: str) -> None:
    """A symbolic shape expression must be plain arithmetic over shape symbols and known shape functions
    (torch hands it to ``sympy.sympify``, which evaluates it as Python)."""
    import ast

    if not isinstance(expr, str) or len(expr) > 4000 or "__" in expr:
        raise _refuse(path, f"symbolic expression {str(expr)[:80]!r} is not plain shape arithmetic")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _refuse(path, f"symbolic expression {expr[:80]!r} is not plain shape arithmetic") from None
    if not _ast_ok(tree):
        raise _refuse(path, f"symbolic expression {expr[:80]!r} uses something other than shape symbols, "
                            "numbers and known shape functions")


def lint_program(files: Dict[str, bytes], path: str) -> None:
    prog = _json(files, PROGRAM, path)

    def walk(obj, key: Optional[str] = None, depth: int = 0):
        if depth > 200:
            raise _refuse(path, "the program JSON nests too deeply")
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "target" and key == "node":
                    _check_target(v, "a graph node", path)
                elif k == "as_operator":
                    _check_target(v, "an operator argument", path)
                elif k == "expr_str":
                    check_sym_expr(v, path)
                elif k == "range_constraints" and isinstance(v, dict):
                    for sym in v:
                        check_sym_expr(sym, path)
                if k == "nodes" and isinstance(v, list):
                    for n in v:
                        walk(n, "node", depth + 1)
                else:
                    walk(v, k, depth + 1)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, key, depth + 1)

    walk(prog)
