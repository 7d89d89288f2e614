"""Node metadata helpers (shapes, dtypes, parameters, constants) and the one
copy of the graph-module edits every pass needs (fetch an attribute, swap a
submodule, pick a free attribute name).

Every metadata helper takes an ``fx.Node`` whose ``meta`` holds ``tensor_meta``
(ShapeProp) or ``val`` (fake tensor from Dynamo/export) and returns ``None``
when the information is missing, never guesses.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx


def node_shape(node: Any) -> Optional[tuple]:
    """Static shape of a tensor-valued node, or None."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic sizes
            return None
    return None


def node_dtype(node: Any) -> Optional[torch.dtype]:
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype"):
        return tm.dtype
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    return None


def node_rank(node: Any) -> Optional[int]:
    s = node_shape(node)
    return None if s is None else len(s)


def get_module(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.nn.Module]:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def get_attr_value(gm: torch.nn.Module, node: Any) -> Any:
    """The object a ``get_attr`` node (or a dotted target string) fetches: parameter, buffer, constant.

    Raises ``AttributeError`` naming the missing part when the path does not exist.
    """
    target = str(node.target) if isinstance(node, fx.Node) else str(node)
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(gm).__name__} has no attribute {target!r} (no {part!r} on "
                                 f"{type(obj).__name__})")
        obj = getattr(obj, part)
    return obj


def set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, replacing what is there.

    The parent must exist (``nn.ModuleList`` / ``nn.Sequential`` children are
    addressed by index, ``blocks.0``); the last name need not. For a new
    top-level name use :func:`fresh_attr_name` first so nothing is overwritten.
    """
    if not path:
        raise ValueError("set_submodule needs a non-empty path (the root itself cannot be replaced)")
    parent_path, _, name = path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
    except AttributeError as e:
        raise AttributeError(f"cannot set submodule {path!r}: its parent {parent_path!r} does not exist ({e})") from None
    setattr(parent, name, module)  # ModuleList/Sequential keep children in _modules under "0", "1", ...


def fresh_attr_name(root: torch.nn.Module, base: str) -> str:
    """A name for a new direct attribute of ``root`` (submodule, parameter, buffer) that is not taken.

    Dots and other characters that cannot appear in an attribute name become
    ``_``; then ``base``, ``base_1``, ``base_2``, ... is the first one
    ``root`` does not have (as a module, parameter, buffer or any attribute).
    """
    clean = "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "_attr"
    if clean[0].isdigit():
        clean = "_" + clean
    name, i = clean, 0
    while hasattr(root, name):
        i += 1
        name = f"{clean}_{i}"
    return name


def is_parameter(gm: fx.GraphModule, node: Any) -> bool:
    """True for a get_attr of an ``nn.Parameter`` (a trained weight, shared by the batch)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        return isinstance(get_attr_value(gm, node), torch.nn.Parameter)
    except AttributeError:
        return False


def _is_shape_access(n: fx.Node) -> bool:
    """``x.shape`` / ``x.size(...)`` / ``x.dim()`` / ``x.ndim`` / ``x.device`` / ``x.dtype``:
    static metadata, not data."""
    if n.op == "call_function" and n.target is getattr and len(n.args) == 2:
        return n.args[1] in ("shape", "ndim", "device", "dtype")
    if n.op == "call_function" and n.target in _SYM_SIZE_OPS:
        return True
    return n.op == "call_method" and n.target in ("size", "dim")


# Dynamo's graphs read dynamic sizes with these (``torch.ops.aten.sym_size.int(x, 1)``).
_SYM_SIZE_OPS = tuple(
    op for op in (getattr(getattr(torch.ops.aten, "sym_size", None), "int", None),
                  getattr(getattr(torch.ops.aten, "sym_size", None), "default", None)) if op is not None)


def _shape_access_value(n: fx.Node) -> Any:
    x = n.args[0]
    if n.op == "call_function" and n.target in _SYM_SIZE_OPS:
        shape = node_shape(x)
        if shape is None:
            raise _TooBig()
        return shape[n.args[1]] if len(n.args) > 1 else torch.Size(shape)
    if n.op == "call_function" and n.args[1] == "device":
        # Constant masks are evaluated on the CPU only to recognise their
        # structure; the graph keeps computing them on the real device.
        return torch.device("cpu")
    if n.op == "call_function" and n.args[1] == "dtype":
        if node_dtype(x) is None:
            raise _TooBig()
        return node_dtype(x)
    shape = node_shape(x)
    if shape is None:
        raise _TooBig()
    if n.op == "call_function":
        return torch.Size(shape) if n.args[1] == "shape" else len(shape)
    if n.target == "dim":
        return len(shape)
    if len(n.args) > 1 or "dim" in n.kwargs:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
        return shape[dim]
    return torch.Size(shape)


def depends_on_inputs(node: Any) -> bool:
    """True if ``node``'s value depends on the *data* of a graph input.

    Reading an input's static shape (``x.shape``, ``x.size(1)``) does not count.
    """
    stack = [node]
    seen = set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        if _is_shape_access(n):
            continue
        stack.extend(n.all_input_nodes)
    return False


def const_value(gm: fx.GraphModule, node: Any, max_nodes: int = 64) -> Any:
    """Evaluate ``node`` if it depends on no input data (buffers, arange over shapes, ...).

    Shapes of inputs come from the node metadata (so the value holds for the
    captured shapes). Returns the value, or None if the node depends on input
    data, the subgraph is larger than ``max_nodes``, or evaluation fails. Used
    to recognise constant masks (a band built from index differences) and
    scale factors computed from shapes (``1 / sqrt(d)``).
    """
    if not isinstance(node, fx.Node):
        return node
    if depends_on_inputs(node):
        return None
    env: dict = {}
    count = [0]

    def ev(x):
        if isinstance(x, fx.Node):
            if x in env:
                return env[x]
            count[0] += 1
            if count[0] > max_nodes:
                raise _TooBig()
            if _is_shape_access(x):
                val = _shape_access_value(x)
                env[x] = val
                return val
            args = fx.node.map_aggregate(x.args, ev)
            kwargs = fx.node.map_aggregate(x.kwargs, ev)
            if x.op == "get_attr":
                val = get_attr_value(gm, x)
            elif x.op == "call_function":
                val = x.target(*args, **kwargs)
            elif x.op == "call_method":
                val = getattr(args[0], x.target)(*args[1:], **kwargs)
            elif x.op == "call_module":
                val = gm.get_submodule(str(x.target))(*args, **kwargs)
            else:
                raise _TooBig()
            env[x] = val
            return val
        return x

    try:
        with torch.no_grad():
            return ev(node)
    except Exception:
        return None


def is_shape_scalar(node: Any) -> bool:
    """True for a non-tensor scalar computed from input shapes only (``q.size(-1) ** 0.5``)."""
    if not isinstance(node, fx.Node) or node_shape(node) is not None:
        return False
    if isinstance(node.meta.get("val"), torch.Tensor):
        return False
    if depends_on_inputs(node):
        return False
    return node.op in ("call_function", "call_method")


class _TooBig(Exception):
    pass


def single_user(node: fx.Node) -> Optional[fx.Node]:
    """The only user of ``node``, or None if it has zero or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_getitem(node: Any, index: Optional[int] = None) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is operator.getitem
            and (index is None or node.args[1] == index))


# --------------------------------------------------------------------------- dead code

_RANDOM_NAMES = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
                 "bernoulli", "multinomial", "normal", "poisson", "dropout", "native_dropout",
                 "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
                 "uniform_", "normal_", "exponential_", "geometric_", "log_normal_", "cauchy_", "random_"}


_OPERATOR_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                     operator.ilshift, operator.irshift, operator.imatmul}


def _inactive_dropout(node: fx.Node, name: str) -> bool:
    """A dropout call that draws nothing: ``training=False`` or ``p=0`` as constants (and not in place)."""
    if not name.endswith("dropout") or node.kwargs.get("inplace") is True:
        return False
    if node.op == "call_function" and len(node.args) > 3 and node.args[3] is True:
        return False  # F.dropout(x, p, training, inplace=True)
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else None)
    train = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else None))
    if node.op == "call_method":  # Tensor has no dropout method; be safe
        return False
    return train is False or (isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0)


def has_side_effects(node: fx.Node) -> bool:
    """Whether removing ``node`` could change behaviour even if nobody uses its result.

    fx's notion of impure (placeholders, outputs, ops it knows mutate), plus
    in-place methods and functions (``x.add_(y)``, ``x += y``, ``out=``,
    mutable op schemas) and random draws (an unused draw still advances the
    generator, so every later draw would change). A dropout with a constant
    ``training=False`` or ``p=0`` draws nothing and is not a side effect.
    This is the dead-code rule of the ``dead_code`` pass and of the pass
    manager's clean-up after every pass (:func:`tidy_graph`).
    """
    if node.is_impure():
        return True
    if node.op == "call_module":  # nn.Dropout and friends draw when their module is training
        owner = node.graph.owning_module
        mod = owner.get_submodule(node.target) if owner is not None else None
        return isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p != 0
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target._schema.name.split("::")[-1]
        if node.target._schema.is_mutable:
            return True
    if name.endswith("_") and not name.endswith("__"):
        return True
    if node.target in _OPERATOR_INPLACE:  # x += y on a tensor is x.add_(y)
        return True
    if name in _RANDOM_NAMES:
        return not _inactive_dropout(node, name)
    return bool(node.kwargs.get("out") is not None)


def _draws_or_pure(node: fx.Node) -> bool:
    """Whether erasing ``node`` when its consumer is replaced loses nothing but its draw:
    no side effect, or a random draw that does not write into its input."""
    if not has_side_effects(node):
        return True
    if node.op == "call_module":
        return True  # a dropout module (the only call_module with a side effect above)
    if node.op != "call_function" or node.kwargs.get("inplace") is True:
        return False
    if len(node.args) > 3 and node.args[3] is True:   # F.dropout(x, p, training, inplace=True)
        return False
    name = getattr(node.target, "__name__", "")
    return name in _RANDOM_NAMES and not name.endswith("_")


def erase_absorbed(graph: fx.Graph, root: fx.Node) -> None:
    """Erase ``root`` (whose uses were replaced) and every node that only fed it.

    A fusing pass replaces a region by one call that does the region's work,
    random draws included (a fused dropout draws inside the new call). The
    pass manager's dead-code clean-up keeps unused random draws, so the
    region's draws would survive and shift every later draw; this erases
    them, with the rest of the region, walking back from ``root`` through
    nodes left without users. In-place ops and other side effects are kept.
    """
    if root.users:
        raise ValueError(f"erase_absorbed: {root.name} still has users {list(root.users)}")
    work = [root]
    while work:
        node = work.pop()
        if node.graph is not graph or node.users or node.op not in ("call_function", "call_method",
                                                                    "call_module"):
            continue
        if node is not root and not _draws_or_pure(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        work.extend(inputs)


def tidy_graph(gm: fx.GraphModule) -> None:
    """Remove dead nodes (never those with :func:`has_side_effects`), lint, recompile.

    What the pass manager does once after every pass that changed the graph;
    a pass that prunes modules or parameters after removing dead nodes calls
    it first itself.
    """
    gm.graph.eliminate_dead_code(is_impure_node=has_side_effects)
    gm.graph.lint()
    gm.recompile()
