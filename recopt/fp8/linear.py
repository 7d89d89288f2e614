"""The FP8 linear layer: one custom op (with fake impl and autograd) and a module around it.

``torch.ops.recopt.fp8_linear(x, weight, bias, forward, dgrad, wgrad)``
computes ``x @ weightᵀ + bias`` where each GEMM role runs with the named
recipe (:data:`recopt.fp8.recipes.RECIPES`) or ``"bf16"`` (high
precision), all in the input dtype: a high-precision role is ``mm``/``addmm``
in x's dtype, an FP8 role one ``torch._scaled_mm`` with the bias and the
output cast in its epilogue (:mod:`recopt.fp8.gemm`; it runs on CPU in
torch ≥ 2.9 for e4m3 and e5m2). Recipes/shapes without such a kernel run the
dequantized matmul in x's dtype, recorded as a named fallback
(:func:`recopt.fp8.gemm.fallbacks`). The backward quantizes dY once for
both GEMMs (:mod:`recopt.fp8.dual_quant`). The backward is a second
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

from .dual_quant import quant_rows, rowcol_quant
from .gemm import dequant_mm, fp8_mm, hp_mm
from .recipes import ROLES, fp8_dtype, get_recipe, no_kernel_reason
from .scaled import _cached_weight_quant

HP = "bf16"  # role marker: keep this GEMM in high precision


def _check_recipe(name: str, role: str) -> None:
    if name != HP:
        rec = get_recipe(name)
        if not rec.is_fp8(role):
            raise ValueError(f"recipe {name!r} keeps role {role!r} in high precision; pass {HP!r} for it")


def _rows_of(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _weight_rows(weight: Tensor, dtype: torch.dtype, granularity: str) -> tuple:
    """Rows of W quantized along K (the forward's B = Wᵀ in rows form), cached while W is unchanged."""
    q, s = _cached_weight_quant(weight.t(), dtype, granularity)
    return q.t(), (s if s.dim() == 0 else s.t())


def linear_forward(x2: Tensor, weight: Tensor, bias: Optional[Tensor], recipe: str) -> Tensor:
    """``x2 (M×K) @ Wᵀ + bias`` in ``x2``'s dtype: one ``_scaled_mm`` (bias and cast in its epilogue),
    or ``addmm`` in that dtype for the ``"bf16"`` role."""
    if recipe == HP:
        return hp_mm(x2, weight.t(), bias)
    rec = get_recipe(recipe)
    fa, fb = rec.formats("forward")
    why = no_kernel_reason(rec.granularity, x2.device, x2.shape[1], weight.shape[0])
    if why:
        return dequant_mm(x2, weight.t(), rec, "forward", x2.dtype, why, bias)
    qa, sa = quant_rows(x2, fp8_dtype(fa), rec.granularity)
    qw, sw = _weight_rows(weight, fp8_dtype(fb), rec.granularity)
    return fp8_mm(qa, sa, qw, sw, x2.dtype, bias)


def linear_backward(g2: Tensor, x2: Tensor, weight: Tensor, dgrad: str, wgrad: str, need_input: bool,
                    need_weight: bool) -> tuple:
    """``(dx2, dW)`` of ``y = x2 Wᵀ``: dgrad ``dY @ W`` in x's dtype, wgrad ``dYᵀ @ x`` in W's dtype.

    FP8 roles quantize dY once when both use the same format and granularity
    (:func:`recopt.fp8.dual_quant.rowcol_quant` writes its row-major copy for
    dgrad and its column-major copy for wgrad); W's and x's column copies come
    from the same kernel (no ``.t().contiguous()``). On CUDA the wgrad
    reduction (M rows) is zero-padded to a multiple of 16 for ``_scaled_mm``.
    """
    n, k = weight.shape
    m = g2.shape[0]
    dx = dw = None
    pad = 1 if g2.device.type == "cpu" else 16  # CUDA rules (and meta tensors, which check them)

    def fp8_role(name: str, r: int, q: int):  # (recipe, reason it has no kernel or None), None for bf16
        if name == HP:
            return None
        rec = get_recipe(name)
        why = no_kernel_reason(rec.granularity, g2.device, r, q)
        return (rec, why)

    d_role = fp8_role(dgrad, n, k) if need_input else None
    w_role = fp8_role(wgrad, -(-m // pad) * pad, k) if need_weight else None
    d_fast = d_role is not None and d_role[1] is None
    w_fast = w_role is not None and w_role[1] is None
    g_row = g_col = None
    if d_fast and w_fast:
        (rd, _), (rw, _) = d_role, w_role
        fd, fw = rd.formats("dgrad")[0], rw.formats("wgrad")[0]
        if fd == fw and rd.granularity == rw.granularity:  # dY quantized once, both copies
            g_row, g_col = rowcol_quant(g2, fp8_dtype(fd), rd.granularity, pad_cols_to=pad)
    if need_input:
        if dgrad == HP:
            dx = hp_mm(g2, weight.to(g2.dtype))
        elif not d_fast:
            dx = dequant_mm(g2, weight, d_role[0], "dgrad", x2.dtype, d_role[1])
        else:
            rec = d_role[0]
            fa, fb = rec.formats("dgrad")
            if g_row is None:
                g_row = quant_rows(g2, fp8_dtype(fa), rec.granularity)
            _, w_col = rowcol_quant(weight, fp8_dtype(fb), rec.granularity, rows=False, cols=True)
            dx = fp8_mm(g_row[0], g_row[1], w_col[0], w_col[1], x2.dtype)
    if need_weight:
        if wgrad == HP:
            dw = hp_mm(g2.t(), x2.to(g2.dtype)).to(weight.dtype)
        elif not w_fast:
            dw = dequant_mm(g2.t(), x2, w_role[0], "wgrad", weight.dtype, w_role[1])
        else:
            rec = w_role[0]
            fa, fb = rec.formats("wgrad")
            if g_col is None:
                _, g_col = rowcol_quant(g2, fp8_dtype(fa), rec.granularity, rows=False, cols=True, pad_cols_to=pad)
            _, x_col = rowcol_quant(x2, fp8_dtype(fb), rec.granularity, rows=False, cols=True, pad_cols_to=pad)
            dw = fp8_mm(g_col[0], g_col[1], x_col[0], x_col[1], weight.dtype)
    return dx, dw


@torch.library.custom_op("recopt::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], forward: str, dgrad: str, wgrad: str) -> Tensor:
    """``x (…, K) @ weight (N, K)ᵀ + bias (N)`` with the forward GEMM in FP8 per ``forward``, in x's dtype."""
    y = linear_forward(_rows_of(x), weight, bias, forward)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight, bias, forward, dgrad, wgrad):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("recopt::fp8_linear_backward", mutates_args=())
def fp8_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, dgrad: str, wgrad: str,
                        need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of :func:`fp8_linear`; an unneeded one is returned empty."""
    n, k = weight.shape
    dx, dw = linear_backward(grad.reshape(-1, n), x.reshape(-1, k), weight, dgrad, wgrad, need_input, need_weight)
    dx = dx.reshape(x.shape) if need_input else x.new_empty(0)
    return dx, (dw if need_weight else weight.new_empty(0))


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
        db = grad.reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
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
    """d/dx of y = x·rsqrt(mean_block(x²)+eps), given dL/dy (2-D; fp32 math, x's dtype out)."""
    m, n = x2.shape
    xb = x2.float().reshape(m, n // block, block)
    r = torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + eps)
    y = xb * r
    g = dy.float().reshape(m, n // block, block)
    return (r * (g - y * (g * y).mean(-1, keepdim=True))).reshape(m, n).to(x2.dtype)


_COMPILED_BN_BACKWARD = None


def blocknorm_backward(x2: Tensor, dy: Tensor, block: int, eps: float) -> Tensor:
    """:func:`_blocknorm_backward`; on CUDA one ``torch.compile``'d (Inductor-fused) kernel instead of ~10
    eager ones. ``block`` and ``eps`` are specialised on; rows are dynamic."""
    global _COMPILED_BN_BACKWARD
    if not x2.is_cuda:
        return _blocknorm_backward(x2, dy, block, eps)
    if _COMPILED_BN_BACKWARD is None:
        _COMPILED_BN_BACKWARD = torch.compile(_blocknorm_backward, dynamic=None, fullgraph=True)
    return _COMPILED_BN_BACKWARD(x2, dy, block, eps)


def _fused_forward_ok(forward: str, x2: Tensor, weight: Tensor) -> bool:
    return forward in ("rowwise", "rowwise_gw_hp") and \
        no_kernel_reason("rowwise", x2.device, x2.shape[1], weight.shape[0]) is None


@torch.library.custom_op("recopt::blocknorm_fp8_linear", mutates_args=())
def blocknorm_fp8_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: int, eps: float,
                         forward: str, dgrad: str, wgrad: str) -> Tensor:
    """``linear(BlockNorm(x))`` in x's dtype where, for the row-wise forward recipes, the norm and the
    activation's e4m3 quantization are one pass (:func:`recopt.fp8.fused_quant.blocknorm_quant`) and the
    GEMM is one ``_scaled_mm`` with the bias in its epilogue."""
    from .fused_quant import blocknorm_quant, block_rms_norm
    from .recipes import E4M3

    x2 = _rows_of(x)
    if _fused_forward_ok(forward, x2, weight):
        q, s, _ = blocknorm_quant(x2, block, norm=True, eps=eps, write_y=False)
        qw, sw = _weight_rows(weight, E4M3, "rowwise")
        y = fp8_mm(q, s, qw, sw, x.dtype, bias)
    else:
        y = linear_forward(block_rms_norm(x2, block, eps), weight, bias, forward)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@blocknorm_fp8_linear.register_fake
def _blocknorm_fp8_linear_fake(x, weight, bias, block, eps, forward, dgrad, wgrad):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("recopt::blocknorm_fp8_linear_backward", mutates_args=())
def blocknorm_fp8_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, block: int, eps: float, dgrad: str,
                                  wgrad: str, need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of :func:`blocknorm_fp8_linear`; the normalized input is recomputed (x's dtype)."""
    from .fused_quant import block_rms_norm

    n, k = weight.shape
    x2 = _rows_of(x)
    xn = block_rms_norm(x2, block, eps) if need_weight else x2
    dyn, dw = linear_backward(grad.reshape(-1, n), xn, weight, dgrad, wgrad, need_input, need_weight)
    dx = blocknorm_backward(x2, dyn, block, eps).reshape(x.shape) if need_input else x.new_empty(0)
    return dx, (dw if need_weight else weight.new_empty(0))


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
    db = grad.reshape(-1, weight.shape[0]).sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
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
