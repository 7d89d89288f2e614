"""The gdpa pass on a target with no fused GDPA kernel (the CPU): rewrite only what saves work.

On a GPU target a ``gdpa`` call runs one fused Triton kernel in place of the
``matmul → act → matmul`` chain, so fusing is the point. On a CPU there is
no fused kernel: the emitted call runs the *same* aten ops the model ran
(:mod:`recopt.ops.gdpa_cpu`, or SDPA where the model already called SDPA or
``nn.MultiheadAttention``), plus the per-call work of the call itself and the
layout ops the rewrite inserts (``permute``/``unsqueeze`` to ``[B,H,T,d]``).
So, by construction and for every batch size, such a site can only be as
fast as the model or slower — measured at ~3 µs per site with the lean
per-site function and up to ~45 µs through the custom op (docs/benchmarks.md,
"CPU"). The decision below is read from the site's structure and the
target's data, never from the example's sizes:

- attention / PFFN chains (pattern A, pointwise or softmax), SDPA calls and
  ``nn.MultiheadAttention`` modules: left alone on a target without the
  fused kernel, reason :data:`NOT_FASTER`;
- the re-associated PFFN (pattern C) is kept: it removes FLOPs (the per-sample
  ``d×d`` weight is never built), which pays on any device;
- ``decompose_attention`` leaves ``nn.TransformerEncoder(Layer)`` leaves
  closed there too: it opens them only so that ``gdpa`` can fuse their
  attention, and in eval without grad the closed layer runs PyTorch's fused
  encoder kernel, which the opened ops do not (measured 0.93–0.96× at batch
  64/512 on the SASRec-style model, docs/benchmarks.md).

``GDPAConfig(cpu_sites="all")`` rewrites every site on the CPU anyway (to
test the rewrite there, or to export ``recopt::GDPA`` functions to ONNX);
``DecomposeConfig(cpu_sites="all")`` opens the encoders there (set both to
fuse an encoder's attention on the CPU).
"""
from __future__ import annotations

from typing import Optional

NOT_FASTER = "not_faster_on_target"
CPU_SITES = ("faster", "all")


def has_fused_gdpa(target) -> bool:
    """True where a ``gdpa`` call runs a fused kernel: a CUDA target (or no target given,
    as when the pass is run on its own)."""
    return target is None or getattr(target, "device", "cuda") != "cpu"


def leave_alone(config, target, kind: str) -> Optional[str]:
    """The reason to leave a matched site of ``kind`` unrewritten on ``target``, or ``None``.

    ``kind``: ``"attention"`` (pattern A, any activation), ``"sdpa"``,
    ``"mha"``, ``"pffn_reassociated"`` or ``"encoder"`` (``decompose_attention``).
    """
    if config.cpu_sites == "all" or has_fused_gdpa(target) or kind == "pffn_reassociated":
        return None
    if kind == "encoder":
        return (f"target {target.name!r} has no fused GDPA kernel, so the gdpa pass would leave the "
                f"encoder's attention alone, and opened, the layer loses PyTorch's fused encoder kernel "
                f"(eval, no grad); left closed (DecomposeConfig(cpu_sites='all') opens it anyway)")
    what = {"attention": "the matmul -> activation -> matmul chain",
            "sdpa": "the scaled_dot_product_attention call",
            "mha": "the nn.MultiheadAttention module"}[kind]
    return (f"target {target.name!r} has no fused GDPA kernel: the gdpa call would run the same "
            f"ops as {what}, plus its own call and layout ops, so it cannot be faster here; "
            f"left as the model wrote it (GDPAConfig(cpu_sites='all') rewrites it anyway)")
