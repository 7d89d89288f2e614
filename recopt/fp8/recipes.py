"""FP8 scaling recipes: quantize / dequantize references and the reference GEMM.

Every GEMM here is written ``out = A @ B`` with ``A`` of shape (P, R) and
``B`` of shape (R, Q), R the reduction dim. A recipe says, per operand, the
FP8 format and the scale granularity:

- ``tensorwise``: one fp32 scale per tensor;
- ``rowwise``: one scale per slice along the reduction dim (per row of A,
  per column of B) — torchao's "axiswise";
- ``blockwise``: 1×128 blocks along R for A, 128×128 blocks for B
  (DeepGEMM-style).

Scales follow torchao: ``scale = amax / fp8_max`` (amax clamped to 1e-12),
``q = saturating_cast(x / scale)``, so ``x ≈ q.float() * scale``.

The three GEMMs of a linear layer ``y = x Wᵀ`` (x: M×K, W: N×K) are the
*roles*: ``forward`` (x @ Wᵀ), ``dgrad`` (dY @ W → M×K) and ``wgrad``
(dYᵀ @ x → N×K). A :class:`Recipe` names the formats per role; ``hp`` as a
role's format means that GEMM stays in high precision. The GEMM that runs
a recipe with FP8 kernels, :func:`recopt.fp8.scaled.scaled_gemm`, sits above
this module (it calls the kernels of ``gemm`` and ``dual_quant``, which
import the recipes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}
FP8_MAX = {E4M3: float(torch.finfo(E4M3).max), E5M2: float(torch.finfo(E5M2).max)}
GRANULARITIES = ("tensorwise", "rowwise", "blockwise")
ROLES = ("forward", "dgrad", "wgrad")
BLOCK = 128
AMAX_FLOOR = 1e-12


@dataclass(frozen=True)
class Recipe:
    """A named FP8 recipe: granularity plus the FP8 format of each GEMM operand per role.

    ``forward``/``dgrad``/``wgrad`` are ``(format of A, format of B)`` with
    formats ``"e4m3"``, ``"e5m2"`` or ``"hp"`` (that role stays in high
    precision; both entries must then be ``"hp"``).
    """

    name: str
    granularity: str
    forward: tuple = ("e4m3", "e4m3")
    dgrad: tuple = ("e5m2", "e4m3")
    wgrad: tuple = ("e5m2", "e4m3")

    def formats(self, role: str) -> tuple:
        if role not in ROLES:
            raise ValueError(f"unknown GEMM role {role!r}; valid roles: {ROLES}")
        return getattr(self, role)

    def is_fp8(self, role: str) -> bool:
        return self.formats(role)[0] != "hp"

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict = {
    # torchao "tensorwise": e4m3 x/W, e5m2 dY.
    "tensorwise": Recipe("tensorwise", "tensorwise"),
    # torchao "rowwise": axiswise scales, all e4m3.
    "rowwise": Recipe("rowwise", "rowwise", dgrad=("e4m3", "e4m3"), wgrad=("e4m3", "e4m3")),
    # torchao "rowwise_with_gw_hp": rowwise forward/dgrad, weight gradient in high precision.
    "rowwise_gw_hp": Recipe("rowwise_gw_hp", "rowwise", dgrad=("e4m3", "e4m3"), wgrad=("hp", "hp")),
    # DeepGEMM-style 1x128 / 128x128 blocks, e4m3 everywhere.
    "blockwise": Recipe("blockwise", "blockwise", dgrad=("e4m3", "e4m3"), wgrad=("e4m3", "e4m3")),
}


def get_recipe(name: str) -> Recipe:
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def fp8_dtype(fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise ValueError(f"unknown FP8 format {fmt!r}; valid: {sorted(FP8_DTYPES)}")
    return FP8_DTYPES[fmt]


def _amax_to_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX[dtype]).float()


def saturating_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp to the format's finite range, then cast (round to nearest even)."""
    m = FP8_MAX[dtype]
    return x.clamp(-m, m).to(dtype)


def quantize(x: torch.Tensor, dtype: torch.dtype, granularity: str, reduce_dim: int,
             block: int = BLOCK, operand: str = "a") -> tuple:
    """Quantize a 2-D GEMM operand; return ``(q, scale)`` with ``x ≈ dequantize(q, scale)``.

    ``reduce_dim`` is the GEMM's reduction dim in ``x`` (1 for A, 0 for B).
    ``scale`` has shape () for tensorwise, x's shape with ``reduce_dim``
    collapsed to 1 for rowwise, and for blockwise (R/128 blocks along the
    reduction dim; B also in 128-wide blocks along its other dim) a grid of
    per-block scales (padded at ragged edges).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D operand, got shape {tuple(x.shape)}")
    xf = x.float()
    if granularity == "tensorwise":
        # The scale comes from the finite slices only, and a slice (a row of A, a column of B) holding
        # an inf/NaN quantizes to 0s and NaNs, so its outputs are NaN and no one else's move
        # (see recopt.fp8.dual_quant.finite_amax).
        slice_amax = xf.abs().amax(dim=reduce_dim) if xf.shape[reduce_dim] else xf.new_zeros(xf.shape[1 - reduce_dim])
        finite = torch.isfinite(slice_amax)
        amax = torch.where(finite, slice_amax, 0.0).amax() if slice_amax.numel() else xf.new_zeros(())
        scale = _amax_to_scale(amax, dtype)  # no boolean indexing: no host sync on a GPU
        div = torch.where(torch.isfinite(slice_amax), scale, torch.full_like(slice_amax, float("inf")))
        return saturating_cast(xf / div.unsqueeze(reduce_dim), dtype), scale
    if granularity == "rowwise":
        scale = _amax_to_scale(xf.abs().amax(dim=reduce_dim, keepdim=True), dtype)
        return saturating_cast(xf / scale, dtype), scale
    if granularity == "blockwise":
        scale = _block_scales(xf, dtype, reduce_dim, block, square=(operand == "b"))
        full = _expand_blocks(scale, xf.shape, reduce_dim, block, square=(operand == "b"))
        return saturating_cast(xf / full, dtype), scale
    raise ValueError(f"unknown granularity {granularity!r}; valid: {GRANULARITIES}")


def _block_scales(xf: torch.Tensor, dtype, reduce_dim: int, block: int, square: bool) -> torch.Tensor:
    # Move the reduction dim last, pad to whole blocks, reduce amax per block.
    t = xf if reduce_dim == 1 else xf.t()
    rows, r = t.shape
    nb = -(-r // block)
    t = torch.nn.functional.pad(t.abs(), (0, nb * block - r))
    if square:
        nrb = -(-rows // block)
        t = torch.nn.functional.pad(t, (0, 0, 0, nrb * block - rows))
        amax = t.view(nrb, block, nb, block).amax(dim=(1, 3))  # (nrb, nb)
    else:
        amax = t.view(rows, nb, block).amax(dim=2)  # (rows, nb)
    return _amax_to_scale(amax, dtype)


def _expand_blocks(scale: torch.Tensor, shape, reduce_dim: int, block: int, square: bool) -> torch.Tensor:
    rows, r = (shape[0], shape[1]) if reduce_dim == 1 else (shape[1], shape[0])
    full = scale.repeat_interleave(block, dim=1)[:, :r]
    if square:
        full = full.repeat_interleave(block, dim=0)[:rows]
    return full if reduce_dim == 1 else full.t()


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str, reduce_dim: int,
               block: int = BLOCK, operand: str = "a") -> torch.Tensor:
    """float32 values of a quantized operand (the inverse of :func:`quantize` up to rounding)."""
    if granularity == "blockwise":
        scale = _expand_blocks(scale, q.shape, reduce_dim, block, square=(operand == "b"))
    return q.float() * scale


def fake_quantize(x: torch.Tensor, fmt: str, granularity: str, reduce_dim: int, operand: str = "a") -> torch.Tensor:
    """Quantize-dequantize ``x`` (float32 result); ``fmt="hp"`` returns ``x`` in float32."""
    if fmt == "hp":
        return x.float()
    dtype = fp8_dtype(fmt)
    q, s = quantize(x, dtype, granularity, reduce_dim, operand=operand)
    return dequantize(q, s, granularity, reduce_dim, operand=operand)


def reference_gemm(a: torch.Tensor, b: torch.Tensor, recipe, role: str) -> torch.Tensor:
    """``A @ B`` with both operands quantize-dequantized per ``recipe`` for ``role``; float32.

    The numerics reference for every FP8 kernel: the product is taken in
    float32 on the dequantized values (what a kernel accumulating in fp32
    computes, up to summation order).
    """
    rec = get_recipe(recipe)
    fa, fb = rec.formats(role)
    a_dq = fake_quantize(a, fa, rec.granularity, reduce_dim=1, operand="a")
    b_dq = fake_quantize(b, fb, rec.granularity, reduce_dim=0, operand="b")
    return a_dq @ b_dq


def scaled_mm_supported(granularity: str) -> bool:
    """Whether ``torch._scaled_mm`` takes this granularity's scales (tensorwise, rowwise)."""
    return granularity in ("tensorwise", "rowwise") and hasattr(torch, "_scaled_mm")


def no_kernel_reason(granularity: str, device: torch.device, r: int, q: int) -> Optional[str]:
    """Why ``A (·×r) @ B (r×q)`` with this granularity has no ``torch._scaled_mm`` kernel here, or None."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm: FP8 GEMMs run as dequantized matmuls"
    if granularity not in ("tensorwise", "rowwise"):
        return (f"{granularity} scales have no torch._scaled_mm kernel: the GEMM runs as a dequantized matmul "
                f"in the input dtype (slower than bf16)")
    if device.type == "cuda" and (r % 16 or q % 16):
        return (f"CUDA torch._scaled_mm needs the reduction ({r}) and output ({q}) dims to be multiples of 16: "
                f"dequantized matmul instead (pad the layer)")
    return None
