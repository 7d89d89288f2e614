"""Held-out-style models (tests/heldout_style_models.py) through ``recopt.optimize``.

Each model is optimized in ``.eval()`` and ``.train()`` with verification
off, so a wrong rewrite shows up here as a mismatch instead of a rollback.
Real attention must be fused (site ``rewritten``), decoys left alone with
their reason code; outputs (with and without grad) and gradients (inputs and
parameters) must equal the model's on fresh inputs: batch 1, length 1, odd
lengths, and rows with every key masked (cold start).
"""
import warnings

import pytest
import torch

import recopt
from recopt.verify import compare_outputs

from heldout_style_models import MODELS

# Every site the matcher accepts is rewritten, also on the CPU target (which by default keeps
# the sites it cannot speed up): these tests are about what is matched and whether it is exact.
ALL_SITES = {"gdpa": {"cpu_sites": "all"}, "decompose_attention": {"cpu_sites": "all"}}

SIZES = ((1, 1), (2, 7), (4, 1))     # the example is (3, 5)


def _run(m, args, training, grad_params=()):
    m.train(training)
    xs = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = m(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum(torch.nan_to_num(o).sum() for o in outs)
    wrt = [x for x in xs if x.is_floating_point()] + list(grad_params)
    return out, torch.autograd.grad(loss, wrt, allow_unused=True)


def _no_grad(m, args, training):
    m.train(training)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return m(*args)


CASES = [(name, mode) for name in sorted(MODELS) for mode in ("eval", "train")
         if mode == "eval" or MODELS[name].train_differs]


@pytest.mark.parametrize("name,mode", CASES)
def test_heldout_style_model(name, mode):
    case = MODELS[name]
    torch.manual_seed(0)
    model = case.model().train(mode == "train")
    example = case.make(3, 5, torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = recopt.optimize(model, example, target="cpu", backend="eager", verify=False,
                              configs=ALL_SITES)
    sites = opt.report.sites_for("gdpa")
    got = [s.status if s.status == "rewritten" else s.reason_code for s in sites]
    assert got == case.expect, [(s.node, s.reason_code, s.reason) for s in sites]
    assert all(s.reason for s in sites if s.status != "rewritten")
    params = [p for p in model.parameters() if p.requires_grad]
    for B, T in SIZES:
        args = case.make(B, T, torch.Generator().manual_seed(B * 100 + T))
        want, gw = _run(model, args, mode == "train", params)
        have, gh = _run(opt, args, mode == "train", params)
        assert compare_outputs(want, have) is None, (B, T, compare_outputs(want, have))
        for i, (a, b) in enumerate(zip(gw, gh)):
            assert (a is None) == (b is None), (B, T, i)
            if a is not None:
                assert compare_outputs(a, b) is None, (B, T, f"grad {i}", compare_outputs(a, b))
        m = compare_outputs(_no_grad(model, args, mode == "train"), _no_grad(opt, args, mode == "train"))
        assert m is None, (B, T, "no_grad", m)


def test_bias_is_zeroed_where_a_key_or_query_mask_is_folded():
    """A key mask folded into k zeroes q·k but not an additive bias: silu(bias) != 0 would leak.

    Found by the HSTU-style model at length 1, where the length mask is read as a key mask."""
    import torch.nn as nn
    import torch.nn.functional as F

    class BiasKeyMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.rab = nn.Parameter(torch.randn(2, 6, 6))

        def forward(self, q, k, v, ids):
            T = q.size(2)
            keep = (ids != 0).float()                                         # data-dependent key mask
            s = F.silu(q @ k.transpose(-1, -2) + self.rab[:, :T, :T]) / T
            s = s * keep[:, None, None, :] * keep[:, None, :, None]           # keys and queries
            return s @ v

    torch.manual_seed(0)
    model = BiasKeyMask().eval()
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    ids = torch.tensor([[1, 2, 0, 3, 0], [0, 0, 0, 0, 0], [4, 5, 6, 7, 8]])
    opt = recopt.optimize(model, (q, k, v, ids), target="cpu", backend="eager", verify=False,
                          configs=ALL_SITES)
    assert [s.status for s in opt.report.sites_for("gdpa")] == ["rewritten"]
    params = list(model.parameters())
    want, gw = _run(model, (q, k, v, ids), False, params)
    have, gh = _run(opt, (q, k, v, ids), False, params)
    assert compare_outputs(want, have) is None
    for a, b in zip(gw, gh):
        assert compare_outputs(a, b) is None
