"""Verification inputs that try the edges, derived from the example inputs.

The example batch is one point. A rewrite that is exact there may be wrong
at batch 1, at another sequence length, or for a user with no history
(a length of 0, a mask row with nothing set). :func:`edge_input_sets`
builds named input sets that try those cases:

- ``batch 1`` and a new batch size (``batch B'``);
- every sequence-like dim at 1 and at a new (shorter, odd) length; the
  example's own length is the maximum tried (length tensors at "full");
- length tensors with a 0 (the cold-start user), a 1 and a full row, and a
  batch-1 set where every length is 0 and every mask row is all False;
- boolean and 0/1 masks with an all-False and an all-True row;
- id inputs drawn inside their embedding table (``num_embeddings`` of the
  table the input feeds) or, when no table is found, inside the example's
  range.

What each input *is* is inferred from the example (:func:`infer_input_kinds`):
the batch size is the size most inputs share at dim 0; a sequence size is a
size shared at a non-feature position (dim >= 1 of id/mask tensors, or not
the last dim of a float tensor). Inference can be wrong; that is safe: a
set on which the *original* graph fails is dropped by the caller with a note
(the dim is then kept fixed, as the model hard-codes it), it never becomes a
false rollback.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

# Kinds of tensor input.
FLOAT, MASK, IDS, LENGTHS, OFFSETS, INT = "float", "mask", "ids", "lengths", "offsets", "int"

# Ops an id tensor may pass through on its way to a table without its values changing.
_PASS_THROUGH_METHODS = {"view", "reshape", "flatten", "long", "int", "to", "contiguous", "squeeze", "unsqueeze"}
_PASS_THROUGH_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}


@dataclass
class InputInfo:
    """What one top-level tensor input is, and which of its dims may vary."""

    index: int
    name: str
    kind: str
    # Per dim: "batch", a sequence size (int, the example's size), or None (fixed).
    dims: list = field(default_factory=list)
    id_bound: Optional[tuple] = None  # [lo, hi) for ids
    # Per-position [lo, hi) over the batch (shape [1, *rest]) for int inputs of
    # dim >= 2: the columns of a sparse-id matrix feed tables of different sizes.
    position_bounds: Optional[tuple] = None
    length_of: Optional[int] = None  # the sequence size a lengths tensor counts into


@dataclass
class InputSet:
    """One named verification input set."""

    name: str
    # Ways to build the set, tried in order until the original graph accepts
    # one: e.g. the case at a small batch (cheap), then with 2-D float
    # inputs' last dims kept fixed (they may be features), then at the
    # example's batch (for models that hard-code it). Each is a callable
    # returning the argument tuple.
    tries: list
    # What the set varies ("batch", "seq:<size>", "rows"): a dim whose sets all
    # fail on the original graph is reported as kept fixed.
    varies: str = ""

    @classmethod
    def of(cls, name: str, args: tuple, varies: str = "") -> "InputSet":
        return cls(name, [lambda: args], varies)


def _is_offsets(t: torch.Tensor) -> bool:
    return t.dim() == 1 and t.numel() > 1 and int(t[0]) == 0 and bool((t[1:] >= t[:-1]).all())


def _is_binary(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return False
    return bool(((t == 0) | (t == 1)).all())


def _table_bounds(gm: Optional[fx.GraphModule], n_inputs: int) -> dict:
    """``{input index: num_embeddings}`` for inputs that feed an embedding table directly."""
    if not isinstance(gm, fx.GraphModule):
        return {}
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][:n_inputs]
    bounds: dict = {}

    def table_rows(user: fx.Node, via: fx.Node) -> Optional[int]:
        if user.op == "call_module":
            m = modules.get(user.target)
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and user.args and user.args[0] is via:
                return m.num_embeddings
            return None
        if user.op != "call_function":
            return None
        name = getattr(user.target, "__name__", "")
        if name in ("embedding", "embedding_bag"):
            # F.embedding(input, weight) / torch.embedding(weight, input)
            if user.target in (torch.embedding,) or getattr(user.target, "__module__", "") == "torch":
                idx_pos, w_pos = 1, 0
            else:
                idx_pos, w_pos = 0, 1
            if len(user.args) > max(idx_pos, w_pos) and user.args[idx_pos] is via:
                w = user.args[w_pos]
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    obj = gm
                    try:
                        for part in str(w.target).split("."):
                            obj = getattr(obj, part)
                    except AttributeError:
                        return None
                    if isinstance(obj, torch.Tensor) and obj.dim() == 2:
                        return int(obj.shape[0])
        return None

    for i, ph in enumerate(placeholders):
        frontier, seen, found = [ph], set(), []
        for _ in range(4):
            nxt = []
            for node in frontier:
                for u in node.users:
                    if u in seen:
                        continue
                    seen.add(u)
                    rows = table_rows(u, node)
                    if rows is not None:
                        found.append(rows)
                    elif (u.op == "call_method" and u.target in _PASS_THROUGH_METHODS) or \
                            (u.op == "call_function" and u.target in _PASS_THROUGH_FUNCS):
                        nxt.append(u)
            frontier = nxt
        if found:
            bounds[i] = min(found)
    return bounds


def infer_input_kinds(args: tuple, gm: Optional[fx.GraphModule] = None, names: Optional[list] = None,
                      wide_floats: bool = True) -> tuple:
    """``(infos, batch_size, seq_sizes)`` for the top-level tensor inputs in ``args``.

    ``wide_floats``: the last dim of a 2-D float input ([B, T] timestamps)
    counts as a sequence dim when its size is one; without it such dims are
    fixed (they may be features that happen to have the same size).

    Non-tensor inputs (KeyedJaggedTensors, dicts, scalars) get no info and are
    kept as they are in every set.
    """
    names = names or [f"input {i}" for i in range(len(args))]
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    bounds = _table_bounds(gm, len(args))
    dim0 = Counter(int(a.shape[0]) for _, a in tensors if a.dim() >= 1)
    batch = dim0.most_common(1)[0][0] if dim0 else None

    infos = {}
    for i, a in tensors:
        if a.is_floating_point():
            kind = MASK if a.dim() >= 2 and _is_binary(a) else FLOAT
        elif a.dtype == torch.bool:
            kind = MASK
        elif a.is_complex():
            kind = INT  # kept: values sampled from the example
        elif i in bounds:
            kind = IDS
        elif _is_offsets(a) and a.dim() == 1:
            kind = OFFSETS
        elif a.dim() >= 2 and _is_binary(a):
            kind = MASK
        else:
            kind = INT
        infos[i] = InputInfo(i, names[i] if i < len(names) else f"input {i}", kind)

    # Sequence sizes: shared sizes at non-feature positions.
    seq: set = set()
    for i, a in tensors:
        kind = infos[i].kind
        last = a.dim() - 1
        for d in range(1, a.dim()):
            s = int(a.shape[d])
            # A size equal to the batch size at dim >= 1 is still a sequence
            # dim ([B, T] with B == T, or a batch-1, length-1 example); it is
            # labelled by position, so the two vary independently.
            if s == 0:
                continue
            # A size-1 dim may be a length-1 example sequence ([B, 1, D]) or
            # a broadcast dim; it is tried at a new length only where a
            # sequence sits ([B, 1, D] floats, [B, 1] ids/masks).
            if s == 1 and not ((kind == FLOAT and a.dim() >= 3 and d == 1)
                               or (kind in (MASK, IDS, INT) and a.dim() == 2)):
                continue
            if kind == FLOAT and d == last:
                continue
            if kind in (MASK, IDS, INT) or d < last:
                seq.add(s)
    seq_sizes = sorted(seq)

    for i, a in tensors:
        info = infos[i]
        dims = []
        for d in range(a.dim()):
            s = int(a.shape[d])
            if d == 0 and s == batch:
                dims.append("batch")
            elif s == 1 and 1 in seq and d >= 1 and (
                    (info.kind == FLOAT and a.dim() >= 3 and d == 1)
                    or (info.kind in (MASK, IDS, INT) and a.dim() == 2)):
                dims.append(s)
            elif s in seq and s > 1 and (info.kind != FLOAT or d < a.dim() - 1
                               or (d >= 2 and int(a.shape[d - 1]) == s)
                               or (wide_floats and a.dim() == 2)):
                dims.append(s)
            else:
                dims.append(None)
        info.dims = dims
    for i, a in tensors:
        # A float aligned with an id/mask tensor ([B, E, T] timestamps beside [B, E, T, C] ids)
        # varies with it, its last dim included.
        info = infos[i]
        if info.kind != FLOAT or a.dim() < 2:
            continue
        for j, b in tensors:
            if infos[j].kind != FLOAT and b.dim() > a.dim() and tuple(b.shape[:a.dim()]) == tuple(a.shape):
                info.dims = [x if x is not None else y for x, y in zip(info.dims, infos[j].dims[:a.dim()])]
                break
    for i, a in tensors:
        info, dims = infos[i], infos[i].dims
        # A lengths tensor: 1-D ints over the batch, counting into a sequence size.
        if info.kind == INT and a.dim() == 1 and dims[0] == "batch" and a.numel() and seq_sizes:
            lo, hi = int(a.min()), int(a.max())
            fits = [s for s in seq_sizes if s >= hi]
            if lo >= 0 and fits:
                info.kind = LENGTHS
                info.length_of = fits[0]
        if info.kind == IDS:
            info.id_bound = (0, bounds[i])
        elif info.kind == INT and a.numel():
            info.id_bound = (int(a.min()), int(a.max()) + 1)
            if a.dim() >= 2 and dims[0] == "batch":
                info.position_bounds = (a.amin(dim=0, keepdim=True), a.amax(dim=0, keepdim=True) + 1)
    return [infos[i] for i, _ in tensors], batch, seq_sizes


def _new_size(s: int) -> int:
    """A new length for a dim of size ``s``: shorter, odd, not 1, when possible."""
    if s >= 4:
        n = s // 2 + 1
        return n if n % 2 == 1 or n + 1 >= s else n + 1
    return s + 1 if s > 1 else 3


class _Sampler:
    def __init__(self, generator: torch.Generator):
        self.g = generator

    def sample(self, info: InputInfo, x: torch.Tensor, shape: tuple, sizes: dict, rows: str = "") -> torch.Tensor:
        """Fresh values like ``x`` with ``shape``. ``rows``: "" | "edge" | "empty"."""
        g = self.g
        if info.kind == FLOAT:
            xf = x.detach().float()
            if xf.numel() == 0:
                return torch.zeros(shape, dtype=x.dtype, device=x.device)
            std = float(xf.std()) if xf.numel() > 1 else 1.0
            std = std if std > 0 and std == std else 1.0
            lo, hi = float(xf.min()), float(xf.max())
            out = (torch.randn(shape, generator=g) * std + float(xf.mean())).clamp(lo, hi)
            return out.to(device=x.device, dtype=x.dtype)
        if info.kind == MASK:
            p = float(x.float().mean()) if x.numel() else 0.5
            p = min(max(p, 0.25), 0.75)
            out = torch.rand(shape, generator=g) < p
            if len(shape) >= 1 and shape[0] >= 1 and info.dims and info.dims[0] == "batch":
                flat = out.reshape(shape[0], -1)
                if not rows and flat.shape[1] >= 2:
                    # Outside the sets named for them, no row is all-False or
                    # all-True, so a failure on those is named by its set.
                    flat[:, 0], flat[:, -1] = True, False
                    out = flat.reshape(shape)
                if rows == "empty":
                    out[:] = False
                elif rows == "edge":
                    out[0] = False
                    if shape[0] >= 2:
                        out[1] = True
            return out.to(device=x.device, dtype=x.dtype)
        if info.kind == LENGTHS:
            full = sizes.get(info.length_of, info.length_of)
            # Lengths of 0 only in the sets named for them (cold start).
            out = torch.randint(min(1, full), full + 1, shape, generator=g)
            if rows == "empty":
                out[:] = 0
            elif rows == "edge" and out.numel():
                out[0] = 0
                if out.numel() >= 2:
                    out[1] = full
                if out.numel() >= 3:
                    out[2] = min(1, full)
            return out.to(device=x.device, dtype=x.dtype)
        if info.kind == OFFSETS:
            n = shape[0]
            if n <= x.numel():
                return x[:n].clone()
            return torch.cat([x, x[-1:].expand(n - x.numel())])
        if info.kind == INT and info.position_bounds is not None and len(shape) == x.dim():
            # Draw each position inside the example's range at that position; a dim that
            # changes size (a sequence dim) takes the range over all its positions, so the
            # columns of [B, E, T, C] ids still feed their own tables at a new T.
            lo_p, hi_p = info.position_bounds
            for d in range(1, x.dim()):
                if int(shape[d]) != int(x.shape[d]):
                    lo_p, hi_p = lo_p.amin(dim=d, keepdim=True), hi_p.amax(dim=d, keepdim=True)
            u = torch.rand(shape, generator=g, dtype=torch.float64).to(x.device)
            drawn = lo_p.to(torch.float64) + torch.floor(u * (hi_p - lo_p).to(torch.float64))
            return torch.minimum(drawn, (hi_p - 1).to(torch.float64)).to(dtype=x.dtype)
        if info.kind in (IDS, INT) and info.id_bound is not None:
            lo, hi = info.id_bound
            if hi > lo:
                return torch.randint(lo, hi, shape, generator=g).to(device=x.device, dtype=x.dtype)
        pool = x.reshape(-1)
        if pool.numel() == 0:
            return torch.zeros(shape, dtype=x.dtype, device=x.device)
        return pool[torch.randint(0, pool.numel(), shape, generator=g).to(x.device)].clone()


def _build(args: tuple, infos: list, sampler: _Sampler, sizes: dict, rows: str = "") -> tuple:
    """A copy of ``args`` with dims resized per ``sizes`` ({"batch"|seq size: new}) and fresh values."""
    by_index = {info.index: info for info in infos}
    out = list(args)
    for i, a in enumerate(args):
        info = by_index.get(i)
        if info is None:
            continue
        shape = tuple(sizes.get(lbl, int(s)) if lbl is not None else int(s) for lbl, s in zip(info.dims, a.shape))
        out[i] = sampler.sample(info, a, shape, sizes, rows)
    return tuple(out)


def edge_input_sets(args: tuple, gm: Optional[fx.GraphModule] = None, names: Optional[list] = None,
                    seed: int = 0) -> tuple:
    """``(sets, infos, batch, seq_sizes)``: named edge-case input sets for ``args``.

    The sets are built from the example's spec only; whether the graph
    accepts each one is for the caller to find out (by running the original).
    """
    infos, batch, seq_sizes = infer_input_kinds(args, gm, names)
    narrow, _, _ = infer_input_kinds(args, gm, names, wide_floats=False)
    if [i.dims for i in narrow] == [i.dims for i in infos]:
        narrow = None
    sampler = _Sampler(torch.Generator().manual_seed(seed + 7919))
    sets: list = []

    def tries(sizes: dict, rows: str = "", small_batch: Optional[int] = None) -> list:
        out = []
        batches = [small_batch, None] if small_batch is not None and small_batch != batch else [None]
        for b in batches:
            sz = dict(sizes, batch=b) if b is not None else dict(sizes)
            for inf in (infos, narrow):
                if inf is not None:
                    out.append(lambda inf=inf, sz=sz: _build(args, inf, sampler, sz, rows))
        return out

    has_rows = any(i.kind in (LENGTHS, MASK) and i.dims and i.dims[0] == "batch" for i in infos)
    # Sets other than "batch B'" use a small batch where the model allows it,
    # so that trying the edges costs a fraction of one example-sized run.
    if batch is not None:
        sets.append(InputSet("batch 1", tries({"batch": 1}), "batch"))
        if has_rows:
            sets.append(InputSet("batch 1 with every length 0 and every mask row all False (cold start)",
                                 tries({"batch": 1}, rows="empty"), "batch"))
        new_b = 3 if batch != 3 else 5
        sets.append(InputSet(f"batch {new_b}", tries({"batch": new_b}), "batch"))
    small = None if batch is None else min(batch, 2)
    for s in seq_sizes:
        label = _seq_label(infos, s)
        for n in ((1, _new_size(s)) if s > 1 else (_new_size(s),)):
            sets.append(InputSet(f"{label} at {n}", tries({s: n}, small_batch=small), f"seq:{s}"))
    if has_rows:
        parts = []
        for i in infos:
            if i.kind == LENGTHS:
                parts.append(f"{i.name} has a 0 (and a 1 and a full row)")
            elif i.kind == MASK and i.dims and i.dims[0] == "batch":
                parts.append(f"{i.name} has an all-False and an all-True row")
        sets.append(InputSet("; ".join(parts), tries({}, rows="edge", small_batch=None if batch is None
                                                     else min(batch, 3)), "rows"))
    return sets, infos, batch, seq_sizes


def _seq_label(infos: list, s: int) -> str:
    holders = [i.name for i in infos if s in i.dims]
    return f"sequence dim {s} of {', '.join(holders[:3])}" if holders else f"sequence dim {s}"


def fresh_values(args: tuple, infos: list, seed: int) -> tuple:
    """Same shapes as ``args``, fresh values (ids inside their tables)."""
    return _build(args, infos, _Sampler(torch.Generator().manual_seed(seed)), {})
