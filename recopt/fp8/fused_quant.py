"""Fused norm-then-quantize: launcher for the Triton kernel and its PyTorch reference.

``blocknorm_quant(x, block=256, norm=True)`` returns ``(q, scale, y)``:
``q`` (M×N, float8_e4m3fn) and ``scale`` (M×1, fp32) are the row-wise
quantized activation of the next GEMM (``y ≈ q.float() * scale``), ``y``
the normalized activation in ``x``'s dtype (or None with
``write_y=False``). ``norm=False`` skips the BlockNorm (plain row-wise
quantization). The Triton kernel runs for CUDA tensors, and for CPU tensors
only with ``use_triton=True`` (under ``TRITON_INTERPRET=1``, set before
triton is first imported); :func:`blocknorm_quant_reference` is the same
function in PyTorch and what CPU tensors get by default.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import require
from ..modules.blocknorm import DEFAULT_EPS  # one epsilon for BlockNorm and its fused kernels
from .recipes import E4M3, quantize


def block_rms_norm(x: torch.Tensor, block: int, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Parameter-free RMS norm over fixed blocks of the last dim (float32 math, x's dtype out)."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"BlockNorm needs the last dim ({n}) to be a multiple of the block ({block})")
    xf = x.float().reshape(*x.shape[:-1], n // block, block)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.reshape(x.shape).to(x.dtype)


def blocknorm_quant_reference(x: torch.Tensor, block: int = 256, norm: bool = True, eps: float = DEFAULT_EPS,
                              write_y: bool = True) -> tuple:
    """PyTorch reference of the fused kernel (same outputs, up to fp32 rsqrt rounding)."""
    x2 = x.reshape(-1, x.shape[-1])
    if norm:
        xf = x2.float().reshape(x2.shape[0], x2.shape[1] // block, block)  # no -1: M may be 0
        yf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).reshape(x2.shape)
    else:
        if x2.shape[-1] % block:
            raise ValueError(f"last dim ({x2.shape[-1]}) must be a multiple of block ({block})")
        yf = x2.float()
    q, scale = quantize(yf, E4M3, "rowwise", reduce_dim=1)
    return q, scale, (yf.to(x.dtype) if write_y else None)


def _use_triton(x: torch.Tensor) -> bool:
    # CUDA tensors use the kernel; CPU tensors use the reference unless a caller asks for the
    # (slow) interpreter explicitly with use_triton=True, as the kernel tests do.
    return x.is_cuda


def blocknorm_quant(x: torch.Tensor, block: int = 256, norm: bool = True, eps: float = DEFAULT_EPS,
                    write_y: bool = True, use_triton: Optional[bool] = None) -> tuple:
    """Fused (BlockNorm →) row-wise e4m3 quantization of a 2-D activation; see the module docstring."""
    if x.dim() != 2:
        raise ValueError(f"blocknorm_quant expects a 2-D (M, N) tensor, got shape {tuple(x.shape)}")
    m, n = x.shape
    if n % block:
        raise ValueError(f"N={n} is not a multiple of block={block}; pick a block that divides N")
    use_triton = _use_triton(x) if use_triton is None else use_triton
    if not use_triton:
        return blocknorm_quant_reference(x, block, norm, eps, write_y)
    require("triton", "gpu", "the fused FP8 quantization kernel")
    from ..kernels.fp8_quant import blocknorm_quant_rowwise_kernel

    x = x.contiguous()
    q = torch.empty(m, n, device=x.device, dtype=E4M3)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x) if write_y else q  # q as a dummy pointer when y is not written
    nblk = n // block
    blocknorm_quant_rowwise_kernel[(m,)](
        x, q, scale, y, x.stride(0), q.stride(0), y.stride(0), eps,
        NBLK=nblk, NB=block, NBLK_P2=_p2(nblk), NB_P2=_p2(block), NORM=norm, WRITE_Y=write_y,
    )
    return q, scale, (y if write_y else None)


def _p2(v: int) -> int:
    return 1 << (max(int(v), 1) - 1).bit_length()
