"""ExFM auxiliary-head pass: an ``architecture`` pass.

``aux_head`` rewrites a student's traced graph that returns one logit tensor
into one that returns ``(serving_logit, distill_logit[, distill2_logit])``:

* the **serving head** ``S`` is the last ``head_layers`` linear layers before
  the output (with the activations, dropouts and shape ops between them and
  after the last one, e.g. ``squeeze(-1)``);
* each **distillation head** ``D_k`` is a copy of ``S`` (same weights at
  initialisation, separate parameters afterwards) applied to
  ``GS_β(x)``, where ``x`` is the backbone output that feeds ``S`` and GS_β
  is :func:`recopt.ops.grad_scale.grad_scale` (identity forward,
  gradient × β backward).

The serving path is left untouched, so output 0 is bit-identical to the
original model's output; at initialisation so are the distillation outputs.
Training applies ``L_s + w·L_d`` (:mod:`recopt.distill.losses`): the serving
head sees only true labels, the distillation head only the teacher's
label-scaled prediction. :func:`strip_distill_heads` removes the
distillation heads again for serving and export.

Why there is no ``student_adapter`` pass: the student adapter of Algorithm 1
is a separate tiny MLP on the *teacher's* logged prediction, trained with its
own optimizer on fresh labels; its stop-gradient output is a training target.
It adds nothing to the student's forward graph except a second distillation
head, which ``aux_head`` builds with ``n_distill_heads=2``. Adding the
adapter to the student graph would put a teacher-prediction input into the
served model's signature, which serving must not need. The adapter lives in
:mod:`recopt.distill.adapter`.

Graph spellings handled: ``call_module`` ``nn.Linear`` and functional
``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear`` with ``get_attr``
weights (Dynamo graphs); activations as modules, functions or methods.
A graph whose output is not a single tensor (multi-task models), whose head
is not made of linear layers, or whose head's intermediate values are used
elsewhere is rejected with a reason code.

The pass appends outputs, so it declares ``output_contract = "prefix"``: the
:class:`~recopt.PassManager` checks that the serving output (the first) is
unchanged and the distillation outputs are finite. :func:`apply_aux_head`
runs it outside a pipeline with the same check, made stricter (the serving
output must be bit-identical).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph import canon as C
from ..graph.nodes import fresh_attr_name, get_attr_value
from ..ops.grad_scale import GRAD_SCALE_OP, is_grad_scale_node
from .base import Pass, PassConfig, PassContext, PassResult, Semantics
from .registry import register_pass

#: ``gm.meta`` key describing the heads the pass added.
META_KEY = "exfm"
#: Prefix of the submodules / parameters that hold distillation-head copies.
DISTILL_PREFIX = "exfm_distill"

_ACTIVATION_MODULES = (nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
                       nn.Hardswish, nn.Dropout, nn.Identity, nn.PReLU)
_ACTIVATION_FUNCTIONS = {F.relu, F.silu, F.gelu, F.leaky_relu, F.elu, F.mish, F.hardswish, F.dropout,
                         torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.tanh,
                         torch.ops.aten.relu.default, torch.ops.aten.silu.default, torch.ops.aten.gelu.default}
_ACTIVATION_METHODS = {"relu", "sigmoid", "tanh"}
# Shape-only ops allowed after the last linear layer (e.g. ``squeeze(-1)``), by canonical kind.
_TAIL_KINDS = ("view", "identity", "cast")


@dataclass
class AuxHeadConfig(PassConfig):
    """Options of the ``aux_head`` pass.

    - ``beta``: gradient scale β of GS_β on the distillation branch.
    - ``head_layers``: how many trailing linear layers form the serving head
      (1 = just the output projection).
    - ``n_distill_heads``: 1 (aux head) or 2 (aux head + a second head for
      the student adapter's target, Eq. 7).
    - ``copy_weights``: start each distillation head as a copy of the
      serving head (True) or re-initialise it (False).
    """

    beta: float = 1.0
    head_layers: int = 1
    n_distill_heads: int = 1
    copy_weights: bool = True

    def __post_init__(self):
        if self.head_layers < 1:
            raise ValueError(f"aux_head: head_layers must be >= 1, got {self.head_layers}")
        if self.n_distill_heads not in (1, 2):
            raise ValueError(f"aux_head: n_distill_heads must be 1 or 2, got {self.n_distill_heads}")


# ----------------------------------------------------------------------------- head discovery

def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``nn.Linear`` or any spelling of ``F.linear`` (``recopt.graph.canon``)."""
    return C.op_kind(node, gm) == "linear"


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _is_tail(node: fx.Node) -> bool:
    """A shape-only op (view/reshape/squeeze/flatten ..., contiguous/clone, dtype casts)."""
    return node.op in ("call_method", "call_function") and C.op_kind(node) in _TAIL_KINDS


def _chain_input(node: fx.Node) -> Optional[fx.Node]:
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


@dataclass
class HeadMatch:
    """The serving head found in a graph: ``chain`` runs from the first head
    node to the node the output returns; ``backbone`` feeds ``chain[0]``."""

    backbone: fx.Node
    chain: list
    linears: list


def find_serving_head(gm: fx.GraphModule, head_layers: int = 1):
    """``(HeadMatch, None)`` or ``(None, (reason_code, reason, anchor node))``."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    if not isinstance(result, fx.Node):
        return None, ("multi_output", "the graph returns several values (a multi-task model?); "
                      "aux_head needs a model that returns one logit tensor", output)
    chain: list = []
    linears: list = []
    node = result
    while True:
        if _is_linear(gm, node):
            linears.append(node)
            chain.append(node)
            if len(linears) == head_layers:
                break
        elif _is_tail(node) and not linears or _is_activation(gm, node) and linears:
            chain.append(node)
        else:
            what = node.format_node()
            if not linears:
                return None, ("no_linear_head", f"the output is not computed by a linear layer "
                              f"(followed only by shape ops); it comes from {what}", node)
            return None, ("head_too_shallow", f"asked for head_layers={head_layers} but only "
                          f"{len(linears)} linear layer(s) precede the output before {what}", node)
        prev = _chain_input(node)
        if prev is None:
            return None, ("no_backbone_input", f"{node.name} has no tensor input to follow", node)
        node = prev
    backbone = _chain_input(chain[-1])
    if backbone is None:
        return None, ("no_backbone_input", f"{chain[-1].name} has no tensor input", chain[-1])
    chain.reverse()
    for n in chain[:-1]:
        if len(n.users) != 1:
            return None, ("head_fanout", f"{n.name} inside the head is also used by "
                          f"{[u.name for u in n.users if u not in chain]}, so the head cannot be "
                          f"duplicated on its own", n)
    return HeadMatch(backbone, chain, list(reversed(linears))), None


# ----------------------------------------------------------------------------- rewrite

def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def add_distill_heads(gm: fx.GraphModule, head: HeadMatch, config: AuxHeadConfig) -> list:
    """Duplicate ``head`` ``config.n_distill_heads`` times behind one GS_β node.

    Mutates ``gm``; returns the distillation output nodes. The output becomes
    ``(serving, distill_1[, distill_2])``.
    """
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    serving = head.chain[-1]
    with graph.inserting_after(serving):
        gs = graph.call_function(GRAD_SCALE_OP, (head.backbone, float(config.beta)))
    gs.meta["exfm_role"] = "grad_scale"
    outs = []
    last = gs
    for k in range(1, config.n_distill_heads + 1):
        env = {head.backbone: gs}
        n_param = 0
        for i, node in enumerate(head.chain):
            def remap(a: Any) -> Any:
                nonlocal n_param, last
                if not isinstance(a, fx.Node):
                    return a
                if a in env:
                    return env[a]
                if a.op == "get_attr":
                    value = get_attr_value(gm, a)
                    name = fresh_attr_name(gm, f"{DISTILL_PREFIX}{k}_p{n_param}")
                    n_param += 1
                    if isinstance(value, nn.Parameter):
                        new = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
                        if not config.copy_weights:
                            with torch.no_grad():
                                new.uniform_(-(1.0 / max(1, new.shape[-1])) ** 0.5,
                                             (1.0 / max(1, new.shape[-1])) ** 0.5)
                        gm.register_parameter(name, new)
                    else:
                        gm.register_buffer(name, value.detach().clone() if torch.is_tensor(value) else value)
                    with graph.inserting_after(last):
                        ga = graph.get_attr(name)
                    ga.meta["exfm_role"] = f"distill{k}"
                    last = ga
                    env[a] = ga
                    return ga
                return a  # a value computed elsewhere (e.g. a size): shared, forward only

            args = fx.node.map_arg(node.args, remap)
            kwargs = fx.node.map_arg(node.kwargs, remap)
            target = node.target
            if node.op == "call_module":
                module = copy.deepcopy(gm.get_submodule(node.target))
                if not config.copy_weights:
                    _reset(module)
                target = fresh_attr_name(gm, f"{DISTILL_PREFIX}{k}_l{i}")
                gm.add_submodule(target, module)
            with graph.inserting_after(last):
                new = graph.create_node(node.op, target, args, kwargs, name=f"{DISTILL_PREFIX}{k}_{node.name}")
            new.meta = {key: v for key, v in node.meta.items() if key in ("tensor_meta", "val", "type")}
            new.meta["exfm_role"] = f"distill{k}"
            env[node] = new
            last = new
        outs.append(env[serving])
    _set_outputs(gm, output, [serving, *outs])
    gm.meta[META_KEY] = {
        "outputs": ["serving"] + [f"distill{k}" for k in range(1, len(outs) + 1)],
        "beta": float(config.beta),
        "head_nodes": [n.name for n in head.chain],
        "backbone": head.backbone.name,
    }
    graph.lint()
    gm.recompile()
    return outs


def _set_outputs(gm: fx.GraphModule, output: fx.Node, values: list) -> None:
    """Make the graph return ``values[0]`` alone (one value) or the tuple ``values``.

    Dynamo graphs return a flat list of leaves that a pytree output spec
    reassembles; the spec is rewritten to match.
    """
    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        import torch.utils._pytree as pytree

        output.args = (list(values),)
        shape = tuple(range(len(values))) if len(values) > 1 else 0
        codegen.pytree_info = info._replace(out_spec=pytree.tree_structure(shape))
    else:
        output.args = (tuple(values) if len(values) > 1 else values[0],)


@register_pass
class AuxHeadPass(Pass):
    """Add ExFM distillation head(s) fed through gradient scaling (architecture)."""

    name = "aux_head"
    semantics = Semantics.ARCHITECTURE
    output_contract = "prefix"
    config_cls = AuxHeadConfig
    description = ("ExFM auxiliary head: duplicate the serving head into a distillation head behind "
                   "GS_beta; the graph then returns (serving_logit, distill_logit[, distill2_logit])")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        existing = [n for n in gm.graph.nodes if is_grad_scale_node(n)]
        if existing:
            return PassResult(gm, [self.rejected(existing[0], "already_applied",
                                                 "the graph already has a gradient-scaling node "
                                                 "(aux_head ran before); strip_distill_heads() first")])
        head, problem = find_serving_head(gm, self.config.head_layers)
        if head is None:
            code, reason, node = problem
            return PassResult(gm, [self.rejected(node, code, reason)])
        anchor = head.linears[-1]
        site = self.rewritten(
            anchor,
            f"duplicated the {len(head.chain)}-node serving head into {self.config.n_distill_heads} "
            f"distillation head(s) behind grad_scale(beta={self.config.beta:g})",
            details={"backbone": head.backbone.name, "head_nodes": [n.name for n in head.chain],
                     "n_distill_heads": self.config.n_distill_heads, "beta": self.config.beta},
        )
        add_distill_heads(gm, head, self.config)
        return PassResult(gm, [site])


# ----------------------------------------------------------------------------- serving/export

def serving_output_index(gm: fx.GraphModule) -> int:
    """Which output of an aux-head graph is the serving logit (the one not behind GS_β)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)):
        return 0
    for i, o in enumerate(outs):
        if isinstance(o, fx.Node) and not _depends_on_grad_scale(o):
            return i
    raise ValueError("every output of this graph depends on a gradient-scaling node; "
                     "there is no serving head to keep")


def _depends_on_grad_scale(node: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_grad_scale_node(n):
            return True
        stack.extend(n.all_input_nodes)
    return False


def strip_distill_heads(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """The serving graph: only the serving head's output, no GS_β, no distillation weights.

    Works on graphs produced by ``aux_head`` (and on any graph whose extra
    outputs hang off a gradient-scaling node). The result returns one tensor,
    like the model before the pass, and can be exported. Unless ``inplace``,
    ``gm`` is left as it is (the trained weights are copied).
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"strip_distill_heads expects a torch.fx.GraphModule, got {type(gm).__name__}")
    if not any(is_grad_scale_node(n) for n in gm.graph.nodes):
        raise ValueError("this graph has no distillation head (no grad_scale node); nothing to strip. "
                         "Pass the graph module that the aux_head pass returned.")
    out_gm = gm if inplace else copy.deepcopy(gm)
    graph = out_gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    keep = output.args[0][serving_output_index(out_gm)]
    _set_outputs(out_gm, output, [keep])
    graph.eliminate_dead_code()
    leftover = [n for n in graph.nodes if is_grad_scale_node(n)]
    if leftover:
        raise ValueError(f"the serving output still depends on {leftover[0].name}; "
                         "the graph mixes the distillation branch into the serving path")
    out_gm.delete_all_unused_submodules()
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in list(out_gm.named_parameters(recurse=False)) +
                 list(out_gm.named_buffers(recurse=False))]:
        if name.startswith(DISTILL_PREFIX) and name not in used:
            delattr(out_gm, name)
    out_gm.meta.pop(META_KEY, None)
    graph.lint()
    out_gm.recompile()
    return out_gm


def apply_aux_head(model: nn.Module, example_inputs: tuple, config: Optional[dict] = None,
                   check: bool = True):
    """Capture ``model`` and run the ``aux_head`` pass on it; return ``(graph_module, site)``.

    Runs the pass directly rather than through :class:`~recopt.PassManager`,
    whose value check would reject the new outputs. With ``check``, the
    serving output must equal the model's output exactly and every
    distillation output must be finite on ``example_inputs``. Raises
    :class:`recopt.errors.PassError` naming the reason when the pass could
    not rewrite the model.
    """
    from ..capture import capture, propagate_shapes
    from ..errors import PassError
    from ..targets import get_target

    cfg = AuxHeadConfig.from_dict(config) if not isinstance(config, AuxHeadConfig) else config
    captured = capture(model, example_inputs)
    ctx = PassContext(target=get_target("cpu"), example_inputs=captured.example_inputs)
    result = AuxHeadPass(cfg).run(captured.graph_module, ctx)
    site = result.sites[0] if result.sites else None
    if site is None or site.status != "rewritten":
        why = f"{site.reason_code}: {site.reason}" if site else "no candidate"
        raise PassError(f"aux_head could not rewrite {type(model).__name__} ({why})")
    gm = result.graph_module
    if check:
        was = model.training, gm.training
        model.eval(), gm.eval()
        try:
            with torch.no_grad():
                ref = model(*captured.example_inputs)
                outs = propagate_shapes(gm, captured.example_inputs)
        finally:
            model.train(was[0]), gm.train(was[1])
        if not torch.equal(outs[0], ref):
            raise PassError("aux_head changed the serving output; this is a bug in the pass")
        if not all(bool(torch.isfinite(o).all()) for o in outs[1:]):
            raise PassError("aux_head's distillation output is not finite on the example inputs")
    return gm, site
