"""Parity of an exported artifact with PyTorch: example inputs plus fresh random inputs.

:func:`check_parity` runs the artifact and the PyTorch module on each input
set and raises :class:`~recopt.export.errors.ParityError` naming the output,
the input set and the largest difference when

    rel = max|artifact - torch| / (max|torch| + 1e-6)  >  rtol

and ``max|artifact - torch| > atol`` (default ``rtol`` 1e-4 for float32, 1e-2
for float16/bfloat16, ``atol`` 1e-6: differences below it are float noise).

Fresh inputs (:func:`fresh_inputs`) change every dynamic dimension (another
batch size, another sequence length) within the range the program accepts:

- for recopt's models (a ``spec`` FeatureSpec and the 5-tensor batch
  format) they are :func:`recopt.data.example_batch` batches, so jagged
  lengths stay consistent with the ids;
- otherwise float tensors are Gaussian with the example's mean and std and
  integer/bool tensors take values drawn from the example's own values (ids
  stay in range). Inputs with structure beyond that (offsets, sorted
  values) need ``parity_inputs=`` from the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InputError
from .errors import ParityError

DEFAULT_RTOL = {torch.float32: 1e-4, torch.float64: 1e-7, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DEFAULT_ATOL = 1e-6


@dataclass
class ParityRun:
    label: str
    output: str
    max_abs: float
    rel: float

    def to_dict(self) -> dict:
        return {"label": self.label, "output": self.output, "max_abs": self.max_abs, "rel": self.rel}


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


ADVICE = {
    "onnx": "export with format='pt2' to keep PyTorch's kernels, or report the op with the manifest",
    "pt2": "the .pt2 program is torch.export's own capture, so the model's behaviour depends on something "
           "export does not capture (Python control flow on values, global state, a custom op whose fake and "
           "real kernels disagree); fix that in the model, or report it with the manifest",
    "aoti": "export with format='pt2' (no compilation) to see whether Inductor's code is at fault",
}


def advice(fmt: Optional[str]) -> str:
    """What to do after a parity failure of format ``fmt`` (never the format already used)."""
    return ADVICE.get(fmt or "", "report it with the manifest")


def compare(label: str, names: Sequence[str], got: Sequence, want: Sequence[torch.Tensor],
            rtol: Optional[float] = None, atol: float = DEFAULT_ATOL, what: str = "artifact",
            fmt: Optional[str] = None) -> List[ParityRun]:
    """Compare flattened outputs; raise ParityError on the first one out of tolerance."""
    if len(got) != len(want):
        raise ParityError(f"{what} returned {len(got)} outputs on {label} but PyTorch returned {len(want)}")
    runs = []
    for name, g, w in zip(names, got, want):
        gn, wn = _to_numpy(g), _to_numpy(w)
        if gn.shape != wn.shape:
            raise ParityError(f"{what} output {name!r} has shape {gn.shape} on {label}, PyTorch gives {wn.shape}")
        if gn.dtype == bool or np.issubdtype(wn.dtype, np.integer) or wn.dtype == bool:
            diff = float(np.abs(gn.astype(np.int64) - wn.astype(np.int64)).max()) if gn.size else 0.0
            if diff:
                raise ParityError(f"{what} output {name!r} differs from PyTorch on {label}: integer/bool values "
                                  f"differ by up to {diff}")
            runs.append(ParityRun(label, name, 0.0, 0.0))
            continue
        gf, wf = gn.astype(np.float64), wn.astype(np.float64)
        if gf.size == 0:
            runs.append(ParityRun(label, name, 0.0, 0.0))
            continue
        nan_mismatch = np.isnan(gf) != np.isnan(wf)
        if nan_mismatch.any():
            at = tuple(int(i) for i in np.argwhere(nan_mismatch)[0])
            side = "the artifact" if np.isnan(gf[at]) else "PyTorch"
            raise ParityError(f"{what} output {name!r} differs from PyTorch on {label}: NaN from {side} only, "
                              f"first at index {at} ({int(nan_mismatch.sum())} elements). What to do: "
                              f"{advice(fmt)}")
        ok = ~np.isnan(wf)
        d = np.abs(gf[ok] - wf[ok])
        max_abs = float(d.max()) if d.size else 0.0
        scale = float(np.abs(wf[ok]).max()) if d.size else 0.0
        rel = max_abs / (scale + 1e-6)
        tol = rtol if rtol is not None else DEFAULT_RTOL.get(w.dtype if isinstance(w, torch.Tensor) else None, 1e-4)
        runs.append(ParityRun(label, name, max_abs, rel))
        if rel > tol and max_abs > atol:
            where = np.unravel_index(int(np.argmax(np.where(ok, np.abs(gf - wf), -1))), gf.shape)
            raise ParityError(
                f"{what} output {name!r} differs from PyTorch on {label}: largest difference {max_abs:.3g} "
                f"at index {tuple(int(i) for i in where)} ({gf[where]:.6g} vs {wf[where]:.6g}), relative {rel:.3g} "
                f"> rtol {tol:g}. The export does not compute the same function. What to do: {advice(fmt)}"
            )
    return runs


def _sample_like(t: torch.Tensor, shape: Tuple[int, ...], g: torch.Generator,
                 dynamic_axes: Sequence[int] = (0,)) -> torch.Tensor:
    """Random values like ``t`` in ``shape`` (only the ``dynamic_axes`` change size).

    Floats: Gaussian with the example's mean and std. Integers and bools: each
    element is drawn from the example's values *at the same position of the
    fixed axes* — column ``j`` of a ``[batch, n_tables]`` id tensor only gets
    ids seen in column ``j``, so every table's ids stay within its own range.
    """
    if t.is_floating_point():
        tf = t.float()
        mean = float(tf.mean()) if tf.numel() else 0.0
        std = float(tf.std()) if tf.numel() > 1 else 1.0
        std = std if np.isfinite(std) and std > 0 else 1.0
        return (torch.randn(shape, generator=g) * std + mean).to(t.dtype)
    if t.numel() == 0:
        return torch.zeros(shape, dtype=t.dtype)
    dyn = [a for a in dynamic_axes if 0 <= a < t.dim()]
    fixed = [a for a in range(t.dim()) if a not in dyn]
    pool = t.permute(*dyn, *fixed).reshape(-1, int(np.prod([t.shape[a] for a in fixed])) if fixed else 1)
    n_new = int(np.prod([shape[a] for a in dyn])) if dyn else 1
    rows = torch.randint(0, pool.shape[0], (n_new, pool.shape[1]), generator=g)
    picked = torch.gather(pool, 0, rows)
    out = picked.reshape(*[shape[a] for a in dyn], *[shape[a] for a in fixed])
    inv = [0] * t.dim()
    for new_pos, axis in enumerate(dyn + fixed):
        inv[axis] = new_pos
    return out.permute(*inv).contiguous().clone()


def choose_sizes(description: dict, args: tuple, n_sets: int) -> List[Dict[str, int]]:
    """New sizes for each dynamic dim, ``n_sets`` different settings, inside the accepted ranges."""
    current: Dict[str, int] = {}
    for i, inp in enumerate(description["inputs"]):
        for ax, s in enumerate(inp["shape"]):
            if isinstance(s, str):
                current[s] = int(args[i].shape[ax])
    sets = []
    for k in range(n_sets):
        sizes = {}
        for name, cur in current.items():
            rng = description["dynamic_dims"].get(name, {})
            lo = rng.get("min") if rng.get("min") is not None else 0
            hi = rng.get("max")
            want = cur + 3 + 2 * k if name == "batch" else cur + 2 + k
            if hi is not None and want > hi:
                want = max(lo, min(hi, cur - 1 - k))
            sizes[name] = max(want, lo, 1 if name == "batch" else lo)
        sets.append(sizes)
    return sets


def fresh_inputs(args: tuple, description: dict, sizes: Dict[str, int], seed: int,
                 model_spec=None) -> tuple:
    """Random inputs like ``args`` with the dynamic dims set to ``sizes``."""
    if model_spec is not None:
        from ..data.batch import example_batch

        names = [inp["name"] for inp in description["inputs"]]

        def size(input_name: str, axis: int) -> int:
            i = names.index(input_name)
            s = description["inputs"][i]["shape"][axis]
            return sizes.get(s, int(args[i].shape[axis])) if isinstance(s, str) else int(s)

        b = example_batch(model_spec, size("dense", 0), seq_len=size("seq_ids", 2), seed=seed)
        return tuple(t.to(a.dtype) for t, a in zip(b.inputs(), args))
    g = torch.Generator().manual_seed(seed)
    out = []
    old_sizes: Dict[str, int] = {}
    for a, inp in zip(args, description["inputs"]):
        for ax, s in enumerate(inp["shape"]):
            if isinstance(s, str):
                old_sizes.setdefault(s, int(a.shape[ax]))
    for i, (a, inp) in enumerate(zip(args, description["inputs"])):
        shape = tuple(sizes.get(s, a.shape[ax]) if isinstance(s, str) else s for ax, s in enumerate(inp["shape"]))
        dyn = [ax for ax, s in enumerate(inp["shape"]) if isinstance(s, str)]
        x = _sample_like(a, shape, g, dyn)
        if not a.is_floating_point() and a.dtype != torch.bool and "len" in inp["name"].lower():
            # a lengths input: keep every length within the (possibly smaller) new length dim
            for dim_name, old in old_sizes.items():
                if dim_name != "batch" and a.numel() and int(a.max()) <= old and sizes.get(dim_name, old) < old:
                    x = x.clamp(max=sizes[dim_name])
        out.append(x)
    return tuple(out)


def check_parity(run_artifact: Callable[[tuple], Sequence], reference: Callable[[tuple], Sequence[torch.Tensor]],
                 input_sets: Sequence[Tuple[str, tuple]], output_names: Sequence[str],
                 rtol: Optional[float] = None, what: str = "artifact", fmt: Optional[str] = None) -> List[ParityRun]:
    """Run both on every ``(label, inputs)`` set; return the runs or raise ParityError."""
    runs: List[ParityRun] = []
    for label, inputs in input_sets:
        try:
            want = reference(inputs)
        except Exception as e:
            raise InputError(
                f"recopt.export's parity check: the PyTorch model itself fails on {label} ({_shapes(inputs)}): "
                f"{type(e).__name__}: {str(e).strip()[:300]}. These inputs are drawn like the example inputs "
                "(ids per column from the example's own values, new dynamic sizes); if the model needs more "
                "structure, pass parity_inputs=[...] and n_random_inputs=0") from None
        try:
            got = run_artifact(inputs)
        except ParityError:
            raise
        except Exception as e:
            raise ParityError(f"{what} failed to run on {label} ({_shapes(inputs)}): {type(e).__name__}: "
                              f"{str(e).strip()[:500]}. What to do: {advice(fmt)}") from None
        runs.extend(compare(label, output_names, got, want, rtol=rtol, what=what, fmt=fmt))
    return runs


def _shapes(inputs: tuple) -> str:
    return ", ".join(f"{tuple(t.shape)}" for t in inputs)
