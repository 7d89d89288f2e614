"""Gradient scaling GS_β: identity in the forward pass, gradient × β in the backward.

ExFM feeds the distillation head through GS_β so the
teacher's signal reaches the shared backbone with a tunable strength β while
the head itself sees the plain distillation loss.

It is the custom op ``torch.ops.recopt.grad_scale(x, beta)`` so that
``torch.fx`` (symbolic tracing and Dynamo) records it as one ``call_function``
node, ``torch.export``/AOTAutograd keep it whole, and passes can find it by
its target (:data:`GRAD_SCALE_OP`). It lives in ``recopt.ops`` because
graphs rewritten by the ``exfm_aux_head`` pass call it at run time; the module
form is :class:`recopt.modules.grad_scale.GradScale`.

Contract: ``x`` any floating tensor, any shape and device; ``beta`` a Python
float. Forward returns a new tensor equal to ``x`` (same shape, dtype,
device; values bit-identical). Backward returns ``grad_output * beta`` in
``x``'s dtype. ``beta = 0`` stops the gradient; ``beta = 1`` is a plain copy.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("recopt::grad_scale", mutates_args=())
def _grad_scale(x: Tensor, beta: float) -> Tensor:
    # A custom op may not return (a view of) its input, hence the copy.
    return x.clone()


@_grad_scale.register_fake
def _grad_scale_fake(x: Tensor, beta: float) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    ctx.beta = inputs[1]


def _backward(ctx, grad: Tensor):
    return grad * ctx.beta, None


_grad_scale.register_autograd(_backward, setup_context=_setup_context)

#: The op overload fx graphs contain (``node.target``) where GS_β is applied.
GRAD_SCALE_OP = torch.ops.recopt.grad_scale.default


def grad_scale(x: Tensor, beta: float) -> Tensor:
    """``x`` unchanged in the forward pass; the gradient flowing back is multiplied by ``beta``."""
    if not isinstance(x, (Tensor, torch.fx.Proxy)):
        raise TypeError(f"grad_scale expects a tensor, got {type(x).__name__}")
    beta = float(beta)
    if beta != beta or beta in (float("inf"), float("-inf")):
        raise ValueError(f"grad_scale: beta must be finite, got {beta}")
    return torch.ops.recopt.grad_scale(x, beta)


def is_grad_scale_node(node: torch.fx.Node) -> bool:
    """Whether ``node`` applies GS_β (the op overload or its packet)."""
    return node.op == "call_function" and node.target in (GRAD_SCALE_OP, torch.ops.recopt.grad_scale)
