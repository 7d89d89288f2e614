"""The FP8 linear layer: one custom op (with fake impl and autograd) and a module around it.

``torch.ops.recopt.fp8_linear(x, weight, bias, forward, dgrad, wgrad)``
computes ``x @ weightᵀ + bias`` where each GEMM role runs with the named
recipe (:data:`recopt.fp8.recipes.RECIPES`) or ``"bf16"`` (high
precision). Kernels: ``torch._scaled_mm`` for tensorwise/rowwise where it
accepts the operands (it runs on CPU in torch ≥ 2.9 for e4m3 and e5m2),
otherwise the dequantize-then-matmul reference. The backward is a second
custom op, so ``torch.compile`` and ``torch.export`` see two opaque ops
with fake (meta) implementations, never the quantization internals.

:class:`FP8Linear` subclasses ``nn.Linear`` and keeps its ``weight`` /
``bias`` state-dict keys, so checkpoints load either way; it is swapped in
place on a traced graph (``gm.add_submodule``), never re-traced through.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .recipes import ROLES, get_recipe, scaled_gemm

HP = "bf16"  # role marker: keep this GEMM in high precision


def _check_recipe(name: str, role: str) -> None:
    if name != HP:
        rec = get_recipe(name)
        if not rec.is_fp8(role):
            raise ValueError(f"recipe {name!r} keeps role {role!r} in high precision; pass {HP!r} for it")


def _gemm(a: Tensor, b: Tensor, recipe: str, role: str, out_dtype: torch.dtype, cache_b: bool = False) -> Tensor:
    if recipe == HP:
        return (a.to(out_dtype) @ b.to(out_dtype)) if out_dtype != torch.float32 else a.float() @ b.float()
    out, _ = scaled_gemm(a, b, recipe, role, out_dtype=torch.float32, cache_b=cache_b)
    return out.to(out_dtype)


@torch.library.custom_op("recopt::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], forward: str, dgrad: str, wgrad: str) -> Tensor:
    """``x (…, K) @ weight (N, K)ᵀ + bias (N)`` with the forward GEMM in FP8 per ``forward``."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    y = _gemm(x2, weight.t(), forward, "forward", torch.float32, cache_b=True)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight, bias, forward, dgrad, wgrad):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("recopt::fp8_linear_backward", mutates_args=())
def fp8_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, dgrad: str, wgrad: str,
                        need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of :func:`fp8_linear`; an unneeded one is returned empty."""
    n, k = weight.shape
    g2 = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = _gemm(g2, weight, dgrad, "dgrad", torch.float32).to(x.dtype).reshape(x.shape) if need_input \
        else x.new_empty(0)
    dw = _gemm(g2.t(), x2, wgrad, "wgrad", torch.float32).to(weight.dtype) if need_weight \
        else weight.new_empty(0)
    return dx, dw


@fp8_linear_backward.register_fake
def _fp8_linear_backward_fake(grad, x, weight, dgrad, wgrad, need_input, need_weight):
    dx = torch.empty_like(x) if need_input else x.new_empty(0)
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output):
    x, weight, bias, forward, dgrad, wgrad = inputs
    ctx.save_for_backward(x, weight)
    ctx.recipes = (dgrad, wgrad)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dgrad, wgrad = ctx.recipes
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = fp8_linear_backward(grad, x, weight, dgrad, wgrad, need_x, need_w)
    db = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = grad.reshape(-1, weight.shape[0]).sum(0)
    return (dx if need_x else None), (dw if need_w else None), db, None, None, None


fp8_linear.register_autograd(_backward, setup_context=_setup_context)


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 per role.

    ``recipes``: ``{"forward": name, "dgrad": name, "wgrad": name}`` with
    recipe names from :data:`recopt.fp8.recipes.RECIPES` or ``"bf16"``.
    State-dict keys are ``weight`` and ``bias`` as in ``nn.Linear``.
    """

    __recopt_leaf__ = True  # one node in recopt.capture's graphs

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipes: Optional[dict] = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.set_recipes(recipes or {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"})

    def set_recipes(self, recipes: dict) -> None:
        unknown = set(recipes) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown GEMM role(s) {sorted(unknown)}; valid roles: {ROLES}")
        full = {r: recipes.get(r, HP) for r in ROLES}
        for role, name in full.items():
            _check_recipe(name, role)
        self.recipes = full

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipes: dict) -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new.set_recipes(recipes)
        return new

    def forward(self, x: Tensor) -> Tensor:
        r = self.recipes
        return torch.ops.recopt.fp8_linear(x, self.weight, self.bias, r["forward"], r["dgrad"], r["wgrad"])

    def extra_repr(self) -> str:
        r = self.recipes
        return super().extra_repr() + f", forward={r['forward']}, dgrad={r['dgrad']}, wgrad={r['wgrad']}"


def _register_flop_formulas() -> None:
    # So FlopCounterMode (used by the PassManager's report) counts the opaque ops.
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # pragma: no cover - older torch
        return

    def _rows(shape) -> int:
        r = 1
        for d in shape[:-1]:
            r *= int(d)
        return r

    @register_flop_formula(torch.ops.recopt.fp8_linear)
    def _fwd_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * _rows(x_shape) * int(w_shape[0]) * int(w_shape[1])

    @register_flop_formula(torch.ops.recopt.fp8_linear_backward)
    def _bwd_flops(g_shape, x_shape, w_shape, dgrad, wgrad, need_input, need_weight, out_shape=None, **kw) -> int:
        one = 2 * _rows(x_shape) * int(w_shape[0]) * int(w_shape[1])
        return one * (int(bool(need_input)) + int(bool(need_weight)))


_register_flop_formulas()


# -- BlockNorm fused into the FP8 linear's activation quantization ------------------------------
def _blocknorm_backward(x2: Tensor, dy: Tensor, block: int, eps: float) -> Tensor:
    """d/dx of y = x·rsqrt(mean_block(x²)+eps), given dL/dy (all 2-D, fp32 math)."""
    m, n = x2.shape
    xb = x2.float().reshape(m, n // block, block)
    r = torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + eps)
    y = xb * r
    g = dy.float().reshape(m, n // block, block)
    return (r * (g - y * (g * y).mean(-1, keepdim=True))).reshape(m, n)


@torch.library.custom_op("recopt::blocknorm_fp8_linear", mutates_args=())
def blocknorm_fp8_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: int, eps: float,
                         forward: str, dgrad: str, wgrad: str) -> Tensor:
    """``linear(BlockNorm(x))`` where, for the ``rowwise`` forward recipe, the norm and the
    activation's e4m3 quantization are one pass (:func:`recopt.fp8.fused_quant.blocknorm_quant`)."""
    from .fused_quant import blocknorm_quant, block_rms_norm
    from .recipes import _cached_weight_quant, E4M3

    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if forward in ("rowwise", "rowwise_gw_hp") and hasattr(torch, "_scaled_mm") and (
            not x.is_cuda or (x2.shape[0] % 16 == 0 and k % 16 == 0 and weight.shape[0] % 16 == 0)):
        q, s, _ = blocknorm_quant(x2, block, norm=True, eps=eps, write_y=False)
        wq, ws = _cached_weight_quant(weight.t(), E4M3, "rowwise")
        wq = wq if wq.t().is_contiguous() else wq.t().contiguous().t()
        y = torch._scaled_mm(q, wq, scale_a=s, scale_b=ws.contiguous(),
                             out_dtype=torch.bfloat16 if x.is_cuda else torch.float32).float()
    else:
        y = _gemm(block_rms_norm(x2, block, eps), weight.t(), forward, "forward", torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@blocknorm_fp8_linear.register_fake
def _blocknorm_fp8_linear_fake(x, weight, bias, block, eps, forward, dgrad, wgrad):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("recopt::blocknorm_fp8_linear_backward", mutates_args=())
def blocknorm_fp8_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, block: int, eps: float, dgrad: str,
                                  wgrad: str, need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of :func:`blocknorm_fp8_linear`; the normalized input is recomputed."""
    from .fused_quant import block_rms_norm

    n, k = weight.shape
    g2 = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    if need_input:
        dy = _gemm(g2, weight, dgrad, "dgrad", torch.float32)
        dx = _blocknorm_backward(x2, dy, block, eps).to(x.dtype).reshape(x.shape)
    else:
        dx = x.new_empty(0)
    dw = _gemm(g2.t(), block_rms_norm(x2, block, eps), wgrad, "wgrad", torch.float32).to(weight.dtype) \
        if need_weight else weight.new_empty(0)
    return dx, dw


@blocknorm_fp8_linear_backward.register_fake
def _blocknorm_fp8_linear_backward_fake(grad, x, weight, block, eps, dgrad, wgrad, need_input, need_weight):
    return (torch.empty_like(x) if need_input else x.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0))


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, block, eps, forward, dgrad, wgrad = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (block, eps, dgrad, wgrad)
    ctx.has_bias = bias is not None


def _bn_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    block, eps, dgrad, wgrad = ctx.args
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = blocknorm_fp8_linear_backward(grad, x, weight, block, eps, dgrad, wgrad, need_x, need_w)
    db = grad.reshape(-1, weight.shape[0]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (dx if need_x else None), (dw if need_w else None), db, None, None, None, None, None


blocknorm_fp8_linear.register_autograd(_bn_backward, setup_context=_bn_setup_context)


def _register_fused_flops() -> None:
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # pragma: no cover
        return

    @register_flop_formula(torch.ops.recopt.blocknorm_fp8_linear)
    def _f(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= int(d)
        return 2 * rows * int(w_shape[0]) * int(w_shape[1])


_register_fused_flops()
