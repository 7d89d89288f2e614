"""The FP8 ops' bodies on a bf16 model: no fp32 GEMM, no fp32 bias add, no bf16→fp32→bf16 round trip.

A TorchDispatchMode records every aten op (with dtypes and shapes) while an
FP8 linear layer runs forward and backward on bf16 tensors; recopt's custom
ops are entered (their Python bodies run under the same mode), so what is
checked is what the ops execute — ``torch._scaled_mm`` runs natively on CPU.
"""
import pytest
import torch
import torch.nn as nn
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from recopt.fp8 import FP8Linear
from recopt.fp8 import gemm as G
from recopt.fp8.mods import BlockNorm

GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "_scaled_mm", "mv", "addmv"}


def _tensors(x):
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


class OpRecorder(TorchDispatchMode):
    """Records (op name, [(dtype, shape) of inputs], [(dtype, shape) of outputs], derived_from_gemm)."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self._gemm_derived = set()  # ids of tensors computed from a GEMM's output (in the current op body)
        self._inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "recopt":  # run the custom op's body under this mode
            self.ops.append((str(func), [], [], False))
            self._gemm_derived, self._inside = set(), True  # track within this body only
            try:
                with self:
                    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            finally:
                self._inside = False
        out = func(*args, **kwargs)
        ins = _tensors((args, kwargs))
        name = func._schema.name.split("::")[-1]
        derived = self._inside and (name in GEMMS or any(id(t) in self._gemm_derived for t in ins))
        outs = _tensors(out)
        if derived:
            self._gemm_derived.update(id(t) for t in outs)
        named = {a.name: v for a, v in zip(func._schema.arguments, args)}
        named.update(kwargs)
        self.ops.append((name, [(t.dtype, tuple(t.shape)) for t in ins], [(t.dtype, tuple(t.shape)) for t in outs],
                         derived, named))
        return out


def _run(module, x, train=True):
    module.train(train)
    G.reset_fallbacks()
    with OpRecorder() as rec:
        y = module(x)
        if train:
            y.sum().backward()
    return rec, y


def _gemm_ops(rec):
    return [o for o in rec.ops if len(o) > 4 and o[0] in GEMMS]


def _assert_no_fp32_gemm(rec):
    for name, ins, outs, *_ in _gemm_ops(rec):
        if name == "_scaled_mm":
            continue
        bad = [d for d, _ in ins + outs if d == torch.float32]
        assert not bad, f"fp32 GEMM {name} {ins} -> {outs}"


def _assert_scaled_mm_writes_bf16_with_bias(rec, n_out, bias_expected):
    sm = [o for o in _gemm_ops(rec) if o[0] == "_scaled_mm"]
    for name, ins, outs, _, named in sm:
        assert outs[0][0] == torch.bfloat16, f"_scaled_mm wrote {outs[0][0]}, not bf16"
        assert named.get("out_dtype") == torch.bfloat16
    fwd_bias = [o for o in sm if o[4].get("bias") is not None]
    if bias_expected:
        assert len(fwd_bias) == 1 and fwd_bias[0][4]["bias"].dtype == torch.bfloat16, \
            "the forward bias must be added in _scaled_mm's epilogue, in bf16"
        assert fwd_bias[0][2][0][1][-1] == n_out
    return sm


def _assert_nothing_fp32_downstream_of_a_gemm(rec):
    """No op reading a GEMM result produces fp32: no .float() round trip, no fp32 bias add."""
    for name, ins, outs, derived, *_ in rec.ops[1:]:
        if derived and name not in GEMMS:
            assert all(d != torch.float32 for d, _ in outs), f"{name} makes fp32 from a GEMM result: {ins} -> {outs}"


@pytest.mark.parametrize("recipes,n_fp8", [
    ({"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"}, 3),
    ({"forward": "tensorwise", "dgrad": "tensorwise", "wgrad": "tensorwise"}, 3),
    ({"forward": "rowwise_gw_hp", "dgrad": "rowwise_gw_hp", "wgrad": "bf16"}, 2),
    ({"forward": "rowwise", "dgrad": "bf16", "wgrad": "bf16"}, 1),
    ({"forward": "rowwise", "dgrad": "tensorwise", "wgrad": "rowwise"}, 3),
])
@pytest.mark.parametrize("rows", [1, 37])
def test_fp8_linear_bf16_forward_backward_has_no_fp32_gemm_or_bias_add(recipes, n_fp8, rows):
    torch.manual_seed(0)
    lin = nn.Linear(48, 32).to(torch.bfloat16)
    f = FP8Linear.from_linear(lin, recipes)
    x = torch.randn(rows, 48, dtype=torch.bfloat16, requires_grad=True)
    rec, y = _run(f, x)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert lin.weight.grad.dtype == torch.bfloat16 and lin.bias.grad.dtype == torch.bfloat16
    _assert_no_fp32_gemm(rec)
    sm = _assert_scaled_mm_writes_bf16_with_bias(rec, 32, bias_expected=True)
    assert len(sm) == n_fp8
    hp = [o for o in _gemm_ops(rec) if o[0] != "_scaled_mm"]
    assert len(hp) == 3 - n_fp8 and all(o[2][0][0] == torch.bfloat16 for o in hp)
    _assert_nothing_fp32_downstream_of_a_gemm(rec)
    assert G.fallbacks() == {}


def test_dy_is_quantized_once_for_dgrad_and_wgrad():
    """Both backward GEMMs share one quantization of dY: dY's amax is taken once per direction."""
    lin = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
    f = FP8Linear.from_linear(lin, {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"})
    x = torch.randn(24, 32, dtype=torch.bfloat16, requires_grad=True)
    y = f(x)
    calls = []
    from recopt.fp8 import linear as L

    real = L.rowcol_quant

    def spy(t, *a, **k):
        calls.append((tuple(t.shape), k.get("rows", True), k.get("cols", True)))
        return real(t, *a, **k)

    L.rowcol_quant = spy
    try:
        y.backward(torch.randn_like(y))
    finally:
        L.rowcol_quant = real
    # dY (24×16): both copies in one call; W (16×32) and x (24×32): their column copies only.
    assert sorted(calls) == sorted([((24, 16), True, True), ((16, 32), False, True), ((24, 32), False, True)])


def test_blocknorm_fused_op_bf16_has_no_fp32_gemm_and_bias_in_epilogue():
    torch.manual_seed(0)
    d = 64
    model = nn.Sequential(BlockNorm(d, block=32), nn.Linear(d, 32)).to(torch.bfloat16)
    x = torch.randn(5, d, dtype=torch.bfloat16, requires_grad=True)
    w, b = model[1].weight, model[1].bias

    class Fused(nn.Module):
        def forward(self, t):
            return torch.ops.recopt.blocknorm_fp8_linear(t, w, b, 32, 1e-6, "rowwise", "rowwise", "rowwise")

    rec, y = _run(Fused(), x)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    _assert_no_fp32_gemm(rec)
    sm = _assert_scaled_mm_writes_bf16_with_bias(rec, 32, bias_expected=True)
    assert len(sm) == 3
    # No fp32 add of anything bias-shaped or output-shaped (the norm's own fp32 math is elementwise).
    for name, ins, outs, *_ in rec.ops[1:]:
        if name.startswith("add"):
            assert not any(dt == torch.float32 and s in ((32,), (5, 32)) for dt, s in ins), (name, ins)


def test_blockwise_fallback_is_named_and_runs_in_bf16():
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    f = FP8Linear.from_linear(lin, {"forward": "blockwise", "dgrad": "bf16", "wgrad": "bf16"})
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="blockwise scales have no torch._scaled_mm kernel"):
        rec, y = _run(f, x)
    _assert_no_fp32_gemm(rec)
    assert list(G.fallbacks()) and "blockwise" in next(iter(G.fallbacks()))


def test_scaled_mm_errors_propagate(monkeypatch):
    """A kernel that cannot run fails loudly; no silent switch to another path."""
    def boom(*a, **k):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(torch, "_scaled_mm", boom)
    f = FP8Linear.from_linear(nn.Linear(32, 16), {"forward": "rowwise"})
    with pytest.raises(RuntimeError, match="no kernel for you"):
        f(torch.randn(4, 32))


def test_blocknorm_backward_matches_autograd_and_compiles_fullgraph():
    """The BlockNorm backward (one compiled kernel on CUDA) vs autograd of the norm; no graph breaks."""
    from recopt.fp8.fused_quant import block_rms_norm
    from recopt.fp8.linear import _blocknorm_backward

    for rows, n, block in ((1, 48, 16), (7, 96, 32)):
        x = (torch.randn(rows, n) * 3).requires_grad_(True)
        dy = torch.randn(rows, n)
        block_rms_norm(x, block, 1e-6).backward(dy)
        got = _blocknorm_backward(x.detach(), dy, block, 1e-6)
        torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)
        compiled = torch.compile(_blocknorm_backward, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x.detach(), dy, block, 1e-6), got)
    bf = _blocknorm_backward(x.detach().bfloat16(), dy.bfloat16(), 32, 1e-6)
    assert bf.dtype == torch.bfloat16


def test_blockwise_site_names_its_fallback_in_the_report(monkeypatch):
    """Dispatch offers blockwise where fbgemm's blockwise kernel is loaded, but the FP8 op has no such
    kernel: a site that picks it says it runs as a dequantized matmul."""
    import recopt
    from recopt.fp8 import dispatch as D

    monkeypatch.setattr(D, "default_candidates", lambda: [D.Candidate("fbgemm", "blockwise", lambda: True)])
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
    opt = recopt.optimize(m, (torch.randn(16, 32),), target="h100", passes=["fp8"], backend="eager",
                          configs={"fp8": {"samples": 2, "max_eval_rows": 32, "ignore_speed": True,
                                           "recipes": ["blockwise"]}})
    (s,) = opt.report.sites_for("fp8", "rewritten")
    assert "[fallback: forward: blockwise scales have no torch._scaled_mm kernel" in s.reason


@pytest.mark.parametrize("rows", [1, 19])
def test_ops_pass_opcheck_on_bf16(rows):
    """Fake kernels, autograd and schemas agree with the real bf16 outputs (dtypes and shapes)."""
    x = torch.randn(rows, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(32, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.recopt.fp8_linear.default, (x, w, b, "rowwise", "tensorwise", "rowwise"))
    torch.library.opcheck(torch.ops.recopt.blocknorm_fp8_linear.default,
                          (x, w, b, 32, 1e-6, "rowwise", "rowwise", "bf16"))
