"""FP8 recipes, metrics and the FP8 linear op: numerics against float64 references."""
import pytest
import torch
import torch.nn as nn

from recopt.fp8 import metrics as M
from recopt.fp8.linear import FP8Linear
from recopt.fp8.recipes import E4M3, E5M2, FP8_MAX, RECIPES, dequantize, quantize, reference_gemm
from recopt.fp8.scaled import scaled_gemm


@pytest.mark.parametrize("gran", ["tensorwise", "rowwise", "blockwise"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("reduce_dim,operand", [(1, "a"), (0, "b")])
def test_quantize_roundtrip_within_format_precision(gran, dtype, reduce_dim, operand):
    x = torch.randn(70, 300) * torch.logspace(-2, 2, 300)  # ragged blocks, wide dynamic range across features
    q, s = quantize(x, dtype, gran, reduce_dim, operand=operand)
    assert q.dtype == dtype and q.shape == x.shape
    back = dequantize(q, s, gran, reduce_dim, operand=operand)
    # Relative rounding of a normal value: 2^-4 (e4m3) / 2^-3 (e5m2); check where values are not tiny vs their scale.
    rel = ((back - x).abs() / x.abs().clamp_min(1e-12))
    big = x.abs() > x.abs().amax() * 1e-2 if gran == "tensorwise" else x.abs() > 0.5
    bound = 2.0 ** -4 if dtype == E4M3 else 2.0 ** -3
    assert float(rel[big].max()) <= bound + 1e-6
    # finer granularity never loses more than tensorwise overall
    if gran != "tensorwise":
        qt, st = quantize(x, dtype, "tensorwise", reduce_dim)
        err_t = (dequantize(qt, st, "tensorwise", reduce_dim) - x).norm()
        assert float((back - x).norm()) <= float(err_t) * 1.01


def test_saturating_cast_and_zero_tensor():
    x = torch.tensor([[1e6, -1e6, 1.0, 0.0]])
    q, s = quantize(x, E4M3, "tensorwise", 1)
    assert torch.isfinite(q.float()).all() and float(q.float().abs().max()) == FP8_MAX[E4M3]
    z = torch.zeros(4, 8)
    q0, s0 = quantize(z, E4M3, "rowwise", 1)
    assert torch.equal(dequantize(q0, s0, "rowwise", 1), z)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("role", ["forward", "dgrad", "wgrad"])
def test_scaled_mm_matches_dequantized_reference(recipe, role):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(48, 64, generator=g), torch.randn(64, 32, generator=g)
    out, kernel = scaled_gemm(a, b, recipe, role, out_dtype=torch.float32)
    ref = reference_gemm(a, b, recipe, role)
    assert kernel == "scaled_mm"  # torch._scaled_mm runs on CPU in torch >= 2.9
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    exact = a.double() @ b.double()
    assert M.normwise_rel_error(out, exact) < (0.06 if RECIPES[recipe].formats(role)[0] == "e4m3" else 0.1)


def test_blockwise_reference_error_on_outlier_rows_beats_tensorwise():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 256, generator=g)
    a[:, :128] *= 1000.0  # one 128-block much larger than the other
    b = torch.randn(256, 32, generator=g)
    exact = a.double() @ b.double()
    ref_part = a[:, 128:].double() @ b[128:].double()
    # The small block's contribution survives blockwise scaling, not tensorwise.
    err = lambda r: M.normwise_rel_error(reference_gemm(a, b, r, "forward") - a[:, :128] @ b[:128], ref_part)  # noqa
    assert err("blockwise") < err("tensorwise")
    assert M.normwise_rel_error(reference_gemm(a, b, "blockwise", "forward"), exact) < 0.06


def test_metrics_values_and_directions():
    ref = torch.tensor([1.0, -2.0, 4.0, 1e-9])
    out = ref * 1.1
    assert M.normwise_rel_error(out, ref) == pytest.approx(0.1, rel=1e-6)
    assert M.sqnr_db(out, ref) == pytest.approx(20.0, rel=1e-6)
    assert M.median_rel_error(out, ref) == pytest.approx(0.1, rel=1e-6)
    # Raw MERE is dominated by near-zero outputs; the declared floor is not.
    bumped = out.clone()
    bumped[3] = 1e-3
    assert M.mere_raw(bumped, ref) > 1000
    assert M.mere(bumped, ref) < 0.2
    assert M.is_safe(20.0, "sqnr", 16.0) and not M.is_safe(10.0, "sqnr", 16.0)
    assert M.is_safe(0.05, "normwise", 0.15) and not M.is_safe(float("nan"), "normwise", 0.15)
    with pytest.raises(ValueError, match="valid metrics"):
        M.get_metric("nope")


def test_known_good_gemm_is_well_inside_default_thresholds():
    # The calibration point of DEFAULT_THRESHOLDS: one e4m3 GEMM of N(0,1) data at (2048,256)@(256,768)-like shape.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 256, generator=g), torch.randn(256, 384, generator=g) / 16
    ref = x.double() @ w.double()
    for recipe in ("tensorwise", "rowwise", "blockwise"):
        out = reference_gemm(x, w, recipe, "forward")
        errs = M.all_errors(out, ref)
        assert errs["normwise"] < M.DEFAULT_THRESHOLDS["normwise"] / 3
        assert errs["sqnr"] > M.DEFAULT_THRESHOLDS["sqnr"] + 10
        assert errs["mere"] < M.DEFAULT_THRESHOLDS["mere"]
        assert errs["mere_raw"] > 0.15  # why raw MERE with tau=0.2 cannot be used (SPEC 7.2)


@pytest.mark.parametrize("recipes", [
    {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"},
    {"forward": "tensorwise", "dgrad": "tensorwise", "wgrad": "tensorwise"},
    {"forward": "blockwise", "dgrad": "bf16", "wgrad": "bf16"},
    {"forward": "rowwise_gw_hp", "dgrad": "rowwise_gw_hp", "wgrad": "bf16"},
])
def test_fp8_linear_forward_backward_close_to_fp32(recipes):
    lin = nn.Linear(64, 48)
    f = FP8Linear.from_linear(lin, recipes)
    assert list(f.state_dict()) == ["weight", "bias"] and f.weight is lin.weight
    x = torch.randn(4, 6, 64, requires_grad=True)
    y = f(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    dx, dw, db = x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()
    x.grad = None
    lin.zero_grad()
    y_ref = lin(x)
    (y_ref * gy).sum().backward()
    assert M.normwise_rel_error(y, y_ref) < 0.06
    bound = lambda role: 0.1 if recipes[role] == "tensorwise" else 0.06  # noqa: E731 (e5m2 gradients)
    assert M.normwise_rel_error(dx, x.grad) < (1e-5 if recipes["dgrad"] == "bf16" else bound("dgrad"))
    assert M.normwise_rel_error(dw, lin.weight.grad) < (1e-5 if recipes["wgrad"] == "bf16" else bound("wgrad"))
    torch.testing.assert_close(db, lin.bias.grad)


def test_fp8_linear_bf16_inputs_and_bad_recipes():
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    f = FP8Linear.from_linear(lin, {"forward": "rowwise"})
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    y = f(x)
    assert y.dtype == torch.bfloat16
    assert M.normwise_rel_error(y.float(), lin(x).float()) < 0.06
    with pytest.raises(ValueError, match="high precision"):
        FP8Linear.from_linear(lin, {"wgrad": "rowwise_gw_hp"})
    with pytest.raises(ValueError, match="valid recipes"):
        FP8Linear.from_linear(lin, {"forward": "int4"})


def test_fp8_op_passes_opcheck_and_compiles_and_exports():
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.recopt.fp8_linear.default, (x, w, b, "rowwise", "tensorwise", "bf16"))
    f = FP8Linear.from_linear(nn.Linear(32, 16), {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"})
    eager = f(x)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    ep = torch.export.export(f, (torch.randn(4, 32),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.recopt.fp8_linear.default]


def test_flop_counter_counts_the_fp8_op():
    from torch.utils.flop_counter import FlopCounterMode

    f = FP8Linear.from_linear(nn.Linear(32, 16), {"forward": "rowwise"})
    with FlopCounterMode(display=False) as c:
        f(torch.randn(8, 32))
    assert c.get_total_flops() == 2 * 8 * 32 * 16


def test_weight_quantization_is_cached_until_the_weight_changes():
    from recopt.fp8 import scaled as R

    lin = nn.Linear(32, 16)
    f = FP8Linear.from_linear(lin, {"forward": "rowwise"})
    R._WEIGHT_CACHE.clear()
    x = torch.randn(4, 32)
    y1 = f(x)
    assert len(R._WEIGHT_CACHE) == 1
    f(x)
    assert len(R._WEIGHT_CACHE) == 1  # reused
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in-place update bumps the version counter
    y2 = f(x)
    assert len(R._WEIGHT_CACHE) == 2
    torch.testing.assert_close(y2 - lin.bias, 2 * (y1 - lin.bias), rtol=1e-5, atol=1e-5)
