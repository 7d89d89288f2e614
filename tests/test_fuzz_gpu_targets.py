"""Differential fuzzing of the attention passes as a GPU-target user gets them.

On ``target="cpu"`` the gdpa pass leaves attention alone (``not_faster_on_target``),
so the CPU fuzz (tests/test_fuzz_models.py) no longer exercises its rewrites. A user
who calls ``recopt.optimize(model, example, target="h100")`` (or ``"b200"``) gets the
fused sites; on this CPU machine the fused op runs its reference. Here every model is
optimized for a GPU target with ``verify=False`` (a wrong rewrite fails the test
instead of being rolled back) and compared with the model — outputs, and gradients of
the parameters — in eval and train mode (same seed) on inputs the example did not
show: batch 1, a new batch, length 1, a new length, a cold-start user, every user
cold, full lengths.

The generator's :class:`~fuzz_models.XAttn` family writes attention as public code
does: target/cross attention (learned queries with Tq possibly equal to T in the
example, the last item as DIN's candidate), heads by view/unflatten/einsum/keys-first
``[B, T, H, d]``/sequence-first ``[T, B, D]`` + bmm, GQA/MQA by ``repeat_interleave`` or
``expand``, masks by ``arange < lengths[:, None]``/``torch.triu``/``masked_fill(~m, -inf)``/
``finfo.min``/``torch.where``, scales by ``d ** -0.5``, ``/ sqrt(d)`` or a temperature.
CI runs a compact deterministic set; ``make test-slow`` a larger sweep.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import recopt
from recopt.verify import compare_outputs

from fuzz_models import FuzzModel, edge_inputs, example_inputs, spec_strategy

_SETTINGS = dict(derandomize=True, deadline=None, print_blob=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run(model, args, training, params):
    model.train(training)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = model(*args)
    grads = torch.autograd.grad(torch.nan_to_num(out).sum(), params, allow_unused=True)
    return out.detach(), grads


def _assert_same(model, opt, args, training, params, what):
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    want, gw = _run(model, args, training, params)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    have, gh = _run(opt, args, training, params)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    m = compare_outputs(want, have)
    assert m is None, f"{what}: output {m}"
    for i, (a, b) in enumerate(zip(gw, gh)):
        assert (a is None) == (b is None), f"{what}: grad {i} is None on one side only"
        if a is not None:
            m = compare_outputs(a, b)
            assert m is None, f"{what}: grad of parameter {i}: {m}"


def optimize_unverified(model, example, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return recopt.optimize(model, example, target=target, backend="eager", verify=False)


def check_spec_gpu(spec: dict, target: str = "h100") -> None:
    """Optimize the spec's model for ``target`` unverified; outputs and gradients must match."""
    model = FuzzModel(spec).eval()
    opt = optimize_unverified(model, example_inputs(spec), target)
    params = [p for p in model.parameters() if p.requires_grad]
    cases = [("the example", example_inputs(spec))] + list(edge_inputs(spec))
    bn = any(b["block"] == "batchnorm" for b in spec["blocks"])
    for mode in ("eval", "train"):
        for name, args in cases:
            if mode == "train" and bn and int(args[0].shape[0]) == 1:
                continue  # BatchNorm needs more than one value per channel in train mode
            sites = [(s.node, s.status, s.reason_code) for s in opt.report.sites_for("gdpa")]
            _assert_same(model, opt, args, mode == "train", params,
                         f"{mode} mode on {name}; spec = {spec!r}; gdpa sites {sites}")
    model.eval()


def _x(**kw):
    cfg = {"block": "xattn", "query": "self", "nq": 2, "layout": "bhtd_view", "heads": 2, "gqa": "none",
           "mask": "key", "fill": "fill_inf", "scale": "sqrt", "act": "softmax"}
    cfg.update(kw)
    return cfg


def _spec(blocks, T=5, batch=3, d=8, seed=0):
    return {"d": d, "batch": batch, "T": T, "blocks": blocks, "pool": "masked_mean", "init_seed": seed}


# A compact deterministic set: each spelling at least once, at an example whose sizes coincide
# (Tq == Tk for a cross attention, T == head dim, batch 1, length 1).
COMPACT = {
    "learned_queries_Tq_eq_T": _spec([_x(query="param", nq=4, layout="bthd_einsum", fill="finfo", scale="pow")], T=4),
    "din_last_item_mqa_expand": _spec([_x(query="last", gqa="expand", fill="where_inf", scale="temperature")]),
    "seq_first_bmm_gqa_causal": _spec([_x(layout="tbd_bmm", gqa="repeat_interleave", mask="causal",
                                          fill="additive")], T=2, batch=2, d=4),
    "unflatten_where_1e9_after_mask": _spec([_x(layout="bhtd_unflatten", fill="where_1e9", scale="after_mask")],
                                            batch=1, T=1),
    "cat_split_heads_eq0_fill": _spec([_x(layout="bhtd_reshape_cat", fill="fill_1e9_eq0", query="param", nq=1)]),
    "hstu_silu_key_mask": _spec([_x(act="silu", fill="fill_1e9_eq0", layout="bthd_einsum"),
                                 {"block": "dropout", "p": 0.5}, _x(query="last", layout="tbd_bmm", mask="none")]),
}


@pytest.mark.parametrize("name", sorted(COMPACT))
def test_gpu_target_compact(name):
    check_spec_gpu(COMPACT[name], "h100")


@settings(max_examples=8, **_SETTINGS)
@given(spec_strategy(xattn=True))
def test_gpu_target_fuzz(spec):
    check_spec_gpu(spec, "b200")


@pytest.mark.slow
@settings(max_examples=500, **_SETTINGS)
@given(spec_strategy(xattn=True))
def test_gpu_target_fuzz_500(spec):
    check_spec_gpu(spec, "h100")


# ----------------------------------------------------------------------------- regressions


class BiasThenRowScale(nn.Module):
    """A relative bias added to the scores, then a per-sample temperature ``[B, 1, 1]``.

    Found here: the temperature (constant along the keys) was folded into q, which scales
    q·kᵀ but not the bias, so ``act(t*qk + rab)`` was computed for ``act(t*(qk + rab))``."""

    def __init__(self, act, d=8, T=16):
        super().__init__()
        self.qkv, self.tau, self.act = nn.Linear(d, 3 * d), nn.Linear(d, 1), act
        self.rab = nn.Parameter(torch.randn(T, T))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, -1)
        s = q @ k.transpose(1, 2) + self.rab[:T, :T]
        s = s * F.softplus(self.tau(x.mean(1)).squeeze(-1))[:, None, None]
        a = torch.softmax(s, -1) if self.act == "softmax" else F.silu(s) / T
        return a @ v


@pytest.mark.parametrize("act", ["silu", "softmax"])
def test_bias_scaled_by_a_tensor_after_it(act):
    torch.manual_seed(0)
    model = BiasThenRowScale(act).eval()
    opt = optimize_unverified(model, (torch.randn(3, 5, 8),), "h100")
    assert [s.status for s in opt.report.sites_for("gdpa")] == ["rewritten"]
    params = list(model.parameters())
    for B, T in ((3, 5), (1, 1), (4, 7)):
        _assert_same(model, opt, (torch.randn(B, T, 8),), False, params, f"B={B} T={T}")


class SeqFirstWhereFullLike(nn.Module):
    """``[T, B, D]`` input, ``bmm`` scores, padding by ``where(pad, full_like(s, -inf), s)``.

    The fill ``full_like(s, -inf)`` has the scores' shape, and the matcher walked into it
    instead of the scores: the attention was not even listed as a candidate."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, lengths):
        T, B, D = x.shape
        q, k, v = (t.permute(1, 0, 2) for t in self.qkv(x).chunk(3, -1))
        s = torch.bmm(q, k.permute(0, 2, 1)) / D ** 0.5
        pad = torch.arange(T)[None, :] >= lengths[:, None]
        s = torch.where(pad.unsqueeze(1), torch.full_like(s, float("-inf")), s)
        return torch.bmm(s.softmax(-1), v).permute(1, 0, 2)


def test_where_with_a_full_like_fill_is_fused():
    torch.manual_seed(0)
    model = SeqFirstWhereFullLike().eval()
    opt = optimize_unverified(model, (torch.randn(3, 3, 8), torch.tensor([3, 1, 2])), "h100")
    assert [s.status for s in opt.report.sites_for("gdpa")] == ["rewritten"]
    params = list(model.parameters())
    for B, T, lens in ((3, 3, [0, 3, 1]), (1, 1, [1]), (2, 6, [6, 4])):
        _assert_same(model, opt, (torch.randn(T, B, 8), torch.tensor(lens)), False, params, f"B={B} T={T}")
