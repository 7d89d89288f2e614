"""Snapshots of a module's state and of call inputs, to restore or compare them.

recopt promises that ``optimize`` leaves the caller's model and example
inputs bit-identical (issue 13, item 2), and capture checks that a forward
changes no state the graph cannot repeat (item 1). Both need one picture of
"the state of a module":

- every parameter and buffer, by qualified name: the tensor object bound
  there (so a forward that *rebinds* ``self.buf = self.buf + 1`` is seen) and
  a copy of its data (so an in-place edit is seen);
- every submodule's ``training`` flag;
- the plain Python attributes of every submodule (numbers, strings, None,
  tuples of those; lists and dicts by length and identity of their items),
  which a forward may update (``self.calls += 1``) but a graph never does.

:class:`ModuleState` takes the picture, lists what changed since
(:meth:`ModuleState.changes`) and puts everything back
(:meth:`ModuleState.restore`). The data copy costs one copy of the
parameters and buffers while the snapshot lives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

_SCALARS = (int, float, bool, str, bytes, type(None), complex)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.numel() == 0:
        return True
    if a.is_complex():
        return bits_equal(torch.view_as_real(a), torch.view_as_real(b))
    if a.is_floating_point() and a.element_size() in _INT_VIEW:
        view = _INT_VIEW[a.element_size()]
        return bool(torch.equal(a.contiguous().view(view), b.contiguous().view(view)))
    return bool(torch.equal(a, b))


def _python_value(v: Any) -> Any:
    """A comparable picture of a plain Python attribute, or a marker to skip it."""
    if isinstance(v, float) and v != v:
        return ("scalar", "nan")
    if isinstance(v, _SCALARS):
        return ("scalar", v)
    if isinstance(v, tuple) and all(isinstance(x, _SCALARS) for x in v):
        return ("scalar", v)
    if isinstance(v, list):
        return ("list", id(v), len(v), tuple(id(x) for x in v))
    if isinstance(v, dict):
        return ("dict", id(v), len(v), tuple((k if isinstance(k, _SCALARS) else id(k), id(x)) for k, x in v.items()))
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v))
    return ("object", id(v))


def _describe(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Change:
    """One difference between a snapshot and the module now.

    ``kind``: ``"data"`` (a parameter/buffer's values changed in place),
    ``"rebound"`` (another tensor is bound to the name), ``"added"`` /
    ``"removed"`` (a parameter or buffer appeared or disappeared),
    ``"attribute"`` (a plain Python attribute changed), ``"mode"`` (a
    submodule's training flag).
    """

    kind: str
    name: str
    before: str = ""
    after: str = ""

    def __str__(self) -> str:
        if self.kind == "data":
            return f"{self.name} (values changed in place)"
        if self.kind == "rebound":
            return f"{self.name} (a new tensor was assigned to it)"
        if self.kind == "attribute":
            return f"{self.name} ({self.before} -> {self.after})"
        return f"{self.name} ({self.kind})"


class ModuleState:
    """A snapshot of ``module``'s parameters, buffers, modes and Python attributes.

    ``copy_data=False`` records bindings, modes and attributes only (cheap;
    no data comparison or restore of values).
    """

    def __init__(self, module: nn.Module, copy_data: bool = True):
        self.module = module
        self.copy_data = copy_data
        self.tensors: dict = {}   # qualified name -> (owner module, local name, kind, tensor object, data copy)
        self.modes: dict = {}     # qualified module name -> (module, training)
        self.attrs: dict = {}     # qualified name -> (owner module, local name, raw value, picture)
        self.keys: dict = {}      # qualified module name -> (module, the names in its __dict__)
        for mname, m in module.named_modules(remove_duplicate=True):
            prefix = f"{mname}." if mname else ""
            self.modes[mname] = (m, m.training)
            self.keys[mname] = (m, set(vars(m)))
            for kind, table in (("parameter", m._parameters), ("buffer", m._buffers)):
                for local, t in table.items():
                    copy = None
                    if copy_data and t is not None:
                        with torch.no_grad():
                            copy = t.detach().clone()
                    self.tensors[prefix + local] = (m, local, kind, t, copy)
            for local, v in vars(m).items():
                if local.startswith("_") or local == "training":
                    continue
                if isinstance(v, (nn.Module, nn.Parameter)):
                    continue
                self.attrs[prefix + local] = (m, local, v, _python_value(v))

    def changes(self) -> list:
        """What differs now from the snapshot, as a list of :class:`Change`."""
        out: list = []
        now = {}
        for mname, m in self.module.named_modules(remove_duplicate=True):
            prefix = f"{mname}." if mname else ""
            for table in (m._parameters, m._buffers):
                for local, t in table.items():
                    now[prefix + local] = t
        for name, (m, local, kind, t, copy) in self.tensors.items():
            if name not in now:
                out.append(Change("removed", name))
                continue
            cur = now[name]
            if cur is not t:
                out.append(Change("rebound", name))
            elif copy is not None and cur is not None and not bits_equal(cur.detach(), copy):
                out.append(Change("data", name))
        for name in now:
            if name not in self.tensors:
                out.append(Change("added", name))
        for name, (m, local, v, picture) in self.attrs.items():
            cur = vars(m).get(local, _MISSING)
            if cur is _MISSING:
                out.append(Change("attribute", name, _describe(v), "deleted"))
            elif _python_value(cur) != picture:
                out.append(Change("attribute", name, _describe(v), _describe(cur)))
        for mname, (m, keys) in self.keys.items():
            prefix = f"{mname}." if mname else ""
            for local in vars(m).keys() - keys:
                if not local.startswith("_"):
                    out.append(Change("attribute", prefix + local, "unset", _describe(vars(m)[local])))
        for mname, (m, training) in self.modes.items():
            if m.training != training:
                out.append(Change("mode", mname or "(root)"))
        return out

    def restore(self) -> None:
        """Put every binding, value, attribute and mode back as snapshotted."""
        for mname, (m, training) in self.modes.items():
            m.training = training
        for name, (m, local, v, picture) in self.attrs.items():
            if vars(m).get(local, _MISSING) is not v:
                object.__setattr__(m, local, v)
        for name, (m, local, kind, t, copy) in self.tensors.items():
            table = m._parameters if kind == "parameter" else m._buffers
            if table.get(local, _MISSING) is not t:
                table[local] = t
            if copy is not None and t is not None and not bits_equal(t.detach(), copy):
                with torch.no_grad():
                    t.copy_(copy)
        # Attributes added since (a forward's cache, fx's _tensor_constant
        # attributes set on the traced root) are removed again.
        for mname, (m, keys) in self.keys.items():
            for local in list(vars(m).keys() - keys):
                del vars(m)[local]
        # Parameters/buffers a forward added are removed again.
        for mname, m in self.module.named_modules(remove_duplicate=True):
            prefix = f"{mname}." if mname else ""
            for table in (m._parameters, m._buffers):
                for local in [k for k in table if prefix + k not in self.tensors]:
                    del table[local]


_MISSING = object()


class InputsState:
    """A copy of every tensor inside call arguments, to restore them after a run."""

    def __init__(self, args: Any):
        self.leaves = [x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
        with torch.no_grad():
            self.copies = [x.detach().clone() for x in self.leaves]

    def changed(self) -> list:
        """Indices (in flattened order) of tensors whose data changed."""
        return [i for i, (x, c) in enumerate(zip(self.leaves, self.copies)) if not bits_equal(x.detach(), c)]

    def restore(self) -> None:
        with torch.no_grad():
            for x, c in zip(self.leaves, self.copies):
                if not bits_equal(x.detach(), c):
                    x.copy_(c)


def clone_inputs(args: Any) -> Any:
    """``args`` with every tensor leaf cloned (same requires_grad), so a run cannot mutate the caller's."""

    def clone(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            c = x.detach().clone()
            return c.requires_grad_(x.requires_grad) if x.is_leaf and x.requires_grad else c
        return x

    return pytree.tree_map(clone, args)


def rng_devices(*trees: Any) -> list:
    """CUDA device indices the tensors in ``trees`` live on (for ``torch.random.fork_rng``)."""
    devices = set()
    for tree in trees:
        for x in pytree.tree_leaves(tree):
            if isinstance(x, torch.Tensor) and x.is_cuda:
                devices.add(x.device.index or 0)
    return sorted(devices)


def first_change(changes: list, kinds: Optional[tuple] = None) -> Optional[Change]:
    for c in changes:
        if kinds is None or c.kind in kinds:
            return c
    return None


class TensorValues:
    """Copies of a module's parameter and buffer values, keyed by tensor identity.

    The pass manager takes one before the passes run; after each pass,
    :meth:`edited` lists the tensors whose values changed in place (a pass
    must make new parameters instead: the graph shares the caller's) and
    :meth:`restore` puts their values back.
    """

    def __init__(self, module: nn.Module):
        self.entries: dict = {}
        with torch.no_grad():
            for name, t in list(module.named_parameters(remove_duplicate=False)) + \
                    list(module.named_buffers(remove_duplicate=False)):
                if id(t) not in self.entries:
                    self.entries[id(t)] = (name, t, t.detach().clone())

        self.expected: set = set()  # names a forward of the graph itself edits (max_norm embeddings)

    def edited(self) -> list:
        """Names (as first seen) of the tensors whose values differ from the copy."""
        return [name for name, t, copy in self.entries.values() if not bits_equal(t.detach(), copy)]

    def restore(self) -> list:
        """Copy the saved values back into edited tensors; return the names of those
        not in :attr:`expected` (an edit no forward explains)."""
        names = []
        with torch.no_grad():
            for name, t, copy in self.entries.values():
                if not bits_equal(t.detach(), copy):
                    t.copy_(copy)
                    if name not in self.expected:
                        names.append(name)
        return names
