"""The lean CPU path of GDPA: the same math as :func:`recopt.ops.gdpa_ref.gdpa_ref`,
as the few plain aten ops the model itself ran, with no custom-op dispatch.

Why: on the CPU there is no fused kernel, so ``torch.ops.recopt.gdpa`` runs
the reference anyway, and its Python-level dispatch (``custom_op`` /
``triton_op`` wrapper, autograd registration, ``backend_for``) costs ~45 µs
per call — more than the ``bmm → activation → bmm`` it replaced at small
batch. This module is what :func:`recopt.ops.gdpa.gdpa` calls instead when
:func:`use_lean` says so:

- pointwise activations: ``s = q @ kᵀ`` → (``· pre_scale``) → zero masking
  (only when lengths/window are given) → ``act`` → (``· qk_scale``) →
  ``@ v`` → zeroed rows past ``q_lengths``; gradients come from autograd
  through these ops, i.e. exactly the reference's gradients;
- fp16/bf16 inputs keep the reference's precision contract: scores and the
  activation in fp32, ``p`` cast to ``v.dtype`` before the second matmul;
- jagged inputs: :func:`recopt.ops.gdpa_ref.gdpa_jagged_ref` directly.

Even so a site costs ~1.3× the ops it replaced (the call and the layout ops
around it; ``python benchmarks/cpu_speed.py --site``), so on a CPU target the
gdpa pass no longer emits such sites (``not_faster_on_target``,
:mod:`recopt.passes.gdpa.cpu`); this path serves the calls that remain on the
CPU: ``GDPAConfig(cpu_sites="all")``, the FLOP-saving re-associated PFFN, and
GPU-target graphs run on CPU tensors.

Softmax needs no lean path: :func:`recopt.ops.gdpa.gdpa` already serves it
through SDPA / the math the model had, without the custom op.

The lean path is *not* taken (the custom op runs) when:

- the tensors are not on the CPU (CUDA has the Triton kernels);
- ``RECOPT_GDPA_BACKEND`` is set to anything but ``auto`` (``reference`` or
  ``triton`` force the custom op, e.g. for interpreter tests);
- ``torch.export`` is tracing (ONNX export and AOTInductor need the
  ``recopt::gdpa`` op in the program to emit one ``recopt::GDPA`` function
  per site).

Under ``torch.compile`` the lean ops are traced inline, so Inductor's CPU
code generator can fuse the activation into its neighbours.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import gdpa_ref as R

BACKEND_ENV = "RECOPT_GDPA_BACKEND"
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_is_exporting = torch.compiler.is_exporting


def use_lean(q: Tensor) -> bool:
    """True where :func:`gdpa_cpu` serves the call instead of the custom op (see module doc)."""
    return q.is_cpu and os.environ.get(BACKEND_ENV, "auto").lower() == "auto" and not _is_exporting()


def gdpa_cpu(
    q: Tensor, k: Tensor, v: Tensor,
    q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor],
    activation: str, qk_scale: float, pre_scale: float, window: int,
) -> Tensor:
    """Dense pointwise GDPA as plain aten ops; same contract as :func:`~recopt.ops.gdpa_ref.gdpa_ref`.

    Expects what :func:`recopt.ops.gdpa.gdpa` hands over: a canonical,
    non-softmax ``activation``, ``q [B,H,Tq,d]``, ``k [B,Hkv,Tk,d]``,
    ``v [B,Hkv,Tk,dv]`` already broadcast and checked, ``window`` ``-1`` for
    none. Output ``[B,H,Tq,dv]`` in ``q.dtype``.
    """
    H = q.shape[1]
    if k.shape[1] != H:
        k = R._expand_kv_heads(k, H)
        v = R._expand_kv_heads(v, H)
    s = q @ k.transpose(-2, -1)
    if s.dtype in _LOW_PRECISION:
        s = s.float()
    if pre_scale != 1.0:
        s = s * pre_scale
    rows = None
    if q_lengths is not None or kv_lengths is not None or window >= 0:
        keep = R._keep_mask(q.shape[0], q.shape[2], k.shape[2], q_lengths, kv_lengths, window, q.device)
        if keep is not None:
            s = torch.where(keep, s, 0.0)
        rows = R._q_row_mask(q.shape[2], q_lengths, q.device)
    p = s if activation == "raw" else R.act_fwd(s, activation)
    if qk_scale != 1.0:
        p = p * qk_scale
    if p.dtype != v.dtype:
        p = p.to(v.dtype)
    o = p @ v
    if rows is not None:
        o = torch.where(rows, o, 0.0)
    if o.dtype != q.dtype:
        o = o.to(q.dtype)
    return o


def gdpa_jagged_cpu(
    q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, kv_offsets: Tensor,
    max_seq_len_q: int, max_seq_len_kv: int,
    activation: str, qk_scale: float, pre_scale: float, window: int,
) -> Tensor:
    """Jagged pointwise GDPA as plain aten ops (pad → :func:`gdpa_cpu` → un-pad)."""
    q_len = (q_offsets[1:] - q_offsets[:-1]).to(torch.long)
    kv_len = (kv_offsets[1:] - kv_offsets[:-1]).to(torch.long)
    qp = R.jagged_to_padded(q, q_offsets, max_seq_len_q).transpose(1, 2)
    kp = R.jagged_to_padded(k, kv_offsets, max_seq_len_kv).transpose(1, 2)
    vp = R.jagged_to_padded(v, kv_offsets, max_seq_len_kv).transpose(1, 2)
    o = gdpa_cpu(qp, kp, vp, q_len, kv_len, activation, qk_scale, pre_scale, window)
    return R.padded_to_jagged(o.transpose(1, 2), q_offsets, q.shape[0])
