"""Shared pieces of the Triton GDPA kernel tests (interpreter on the CPU, or CUDA):
the device they run on, seeded random inputs, NaN-poisoned outputs and the relative
error that first checks every output element was written."""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


def rand(shape, dtype, seed):
    """Standard-normal values of ``shape`` from a generator seeded with ``seed``, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def nan_filled(shape, dtype):
    """An output buffer full of NaN: an element the kernel does not write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def rel(a, b):
    """``|a - b| / |b|`` in float64, after asserting ``a`` (the kernel's output) has no NaN."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "unwritten (NaN) elements in the kernel output"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
