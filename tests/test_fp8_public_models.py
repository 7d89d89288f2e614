"""The fp8 pass and op on models written the way public recsys code writes them (DeepCTR/FuxiCTR towers,
DCNv2, MMoE, [B, T, D] linears, tied and borrowed weights, nn.TransformerEncoder), at batch sizes the
example did not show (0, 1, odd) and with inf/NaN samples. Each test reproduces a bug found here."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import recopt
from recopt.fp8.linear import fp8_linear  # noqa: F401  (registers torch.ops.recopt.fp8_linear)

RECIPES = ("tensorwise", "rowwise", "rowwise_gw_hp", "blockwise")
CFG = {"fp8": {"ignore_speed": True, "samples": 2, "max_eval_rows": 64}}


def _op(x, w, b, recipe):
    dgrad = wgrad = recipe
    if recipe == "rowwise_gw_hp":
        wgrad = "bf16"
    return torch.ops.recopt.fp8_linear(x, w, b, recipe, dgrad, wgrad)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch_forward_and_backward(recipe, dtype):
    # Bug: M = 0 raised "expected scale_a.stride(1) to be 1, but got 0" from torch._scaled_mm at run time
    # (eager F.linear returns an empty output); the verifier never tries an empty batch.
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 32, generator=g) * 0.1).to(dtype).requires_grad_()
    b = torch.randn(48, generator=g).to(dtype).requires_grad_()
    x = torch.randn(0, 5, 32, dtype=dtype, requires_grad=True)
    y = _op(x, w, b, recipe)
    assert y.shape == (0, 5, 48) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_one_non_finite_sample_does_not_change_the_others(recipe, bad):
    # Bug: with the tensor-wise recipe one sample holding an inf made the scale inf, so every other
    # sample quantized to 0/NaN: a whole serving batch came back NaN (eager: only that sample's row).
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 32, generator=g).bfloat16() * 0.1
    x = torch.randn(9, 32, generator=g).bfloat16()
    clean = _op(x, w, None, recipe)
    xb = x.clone()
    xb[4, 7] = bad
    ref = F.linear(xb.float(), w.float())
    got = _op(xb, w, None, recipe)
    keep = [i for i in range(9) if i != 4]
    assert torch.isfinite(got[keep]).all()
    assert not torch.isfinite(ref[4]).all() and torch.isnan(got[4]).all()  # the bad sample stays bad
    if recipe == "rowwise":
        assert torch.equal(got[keep], clean[keep])
    else:  # the finite samples set the scale, as without the bad value
        torch.testing.assert_close(got[keep].float(), ref[keep], rtol=0.1, atol=0.1)


def test_dequantized_tensorwise_reference_isolates_a_non_finite_row():
    from recopt.fp8.recipes import E4M3, dequantize, quantize

    x = torch.randn(6, 32)
    x[2, 3] = float("inf")
    q, s = quantize(x, E4M3, "tensorwise", reduce_dim=1)
    d = dequantize(q, s, "tensorwise", 1)
    assert torch.isnan(d[2]).any() and torch.isfinite(d[[0, 1, 3, 4, 5]]).all()
    assert float(s) == pytest.approx(float(x[[0, 1, 3, 4, 5]].abs().max()) / 448.0)


class MMoE(nn.Module):  # FuxiCTR/DeepCTR-style: expert MLPs, softmax gates without bias, one tower per task
    def __init__(self, d=64, experts=3, tasks=2):
        super().__init__()
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, 32), nn.ReLU()) for _ in range(experts)])
        self.gates = nn.ModuleList([nn.Linear(d, experts, bias=False) for _ in range(tasks)])
        self.towers = nn.ModuleList([nn.Linear(32, 1) for _ in range(tasks)])

    def forward(self, x):
        e = torch.stack([m(x) for m in self.experts], 1)
        return torch.cat([t((e * torch.softmax(g(x), -1).unsqueeze(-1)).sum(1))
                          for g, t in zip(self.gates, self.towers)], -1)


class DCNv2(nn.Module):  # cross layers x0 * (W x + b) + x, then a DNN tower
    def __init__(self, d=64):
        super().__init__()
        self.cross = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.dnn = nn.Sequential(nn.Linear(d, 32), nn.ReLU())
        self.out = nn.Linear(32, 1)

    def forward(self, x0):
        x = x0
        for lin in self.cross:
            x = x0 * lin(x) + x
        return self.out(self.dnn(x))


class SharedSeq(nn.Module):  # [B, T, D] linears, a weight used twice, F.linear on a borrowed parameter
    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, d, bias=False)
        self.proj = nn.Parameter(torch.randn(48, d) * 0.2)
        self.out = nn.Linear(48, 1)

    def forward(self, x):
        h = self.a(torch.relu(self.a(x)))
        return self.out(F.linear(h, self.proj)).mean(1)


@pytest.mark.parametrize("make,shape,dtype", [(MMoE, (64,), torch.bfloat16), (DCNv2, (64,), torch.float32),
                                              (SharedSeq, (5, 32), torch.bfloat16)])
def test_public_style_models_at_unseen_batches(make, shape, dtype):
    torch.manual_seed(0)
    m = make().to(dtype).eval()
    opt = recopt.optimize(m, (torch.randn(16, *shape, dtype=dtype),), target="h100", passes=["fp8"],
                          backend="eager", configs=CFG)
    assert any(s.status == "rewritten" for s in opt.report.sites_for("fp8"))
    for b in (0, 1, 7, 33):
        x = torch.randn(b, *shape, dtype=dtype)
        ref, got = m(x), opt(x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=0.1, atol=0.1)
    x = torch.randn(7, *shape, dtype=dtype)
    x[3].fill_(float("inf"))
    ref, got = m(x), opt(x)
    keep = [0, 1, 2, 4, 5, 6]
    assert not torch.isfinite(ref[3]).all() and not torch.isfinite(got[3]).all()
    torch.testing.assert_close(got[keep].float(), ref[keep].float(), rtol=0.1, atol=0.1)


def test_linears_inside_an_opaque_transformer_encoder_are_reported():
    # Before: nn.TransformerEncoder is one node of the captured graph, so its FFN and projection linears
    # were simply absent from the fp8 report (only the head was listed).
    class TE(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.out = nn.Linear(32, 1)

        def forward(self, x):
            return self.out(self.enc(x)[:, 0])

    opt = recopt.optimize(TE().eval(), (torch.randn(4, 6, 32),), target="h100", passes=["fp8"], backend="eager",
                          configs=CFG)
    sites = {s.reason_code: s for s in opt.report.sites_for("fp8")}
    s = sites["inside_opaque_module"]
    assert s.module_path == "enc" and "linear1" in s.reason and "TransformerEncoder" in s.reason


def test_probe_leaves_non_finite_calibration_rows_out_and_says_so():
    # Bug: one NaN value in one calibration batch made every site's statistics NaN, every recipe's error
    # inf, and the sites were rejected as "error_above_threshold" (FP8 was not the cause).
    from recopt.fp8.probe import ActivationStats

    st = ActivationStats(8)
    x = torch.randn(10, 8)
    x[3, 1] = float("nan")
    x[7, 0] = float("inf")
    st.update(x)
    keep = x[[0, 1, 2, 4, 5, 6, 8, 9]].double()
    assert st.n == 8 and st.non_finite_rows == 2
    torch.testing.assert_close(st.mean, keep.mean(0))

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 1)

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(32, 64, generator=g),) for _ in range(3)]
    cal[1][0][5, 3] = float("nan")
    opt = recopt.optimize(Tower().eval(), (torch.randn(16, 64, generator=g),), target="h100", passes=["fp8"],
                          backend="eager", calibration_data=cal, configs=CFG)
    a = {s.module_path: s for s in opt.report.sites_for("fp8")}["a"]
    assert a.status == "rewritten", a.reason
    assert "1 calibration row(s) at this site held inf/NaN" in a.reason


@pytest.mark.parametrize("recipe,wgrad", [("tensorwise", "tensorwise"), ("rowwise", "rowwise"),
                                          ("rowwise_gw_hp", "bf16")])
def test_gpu_shape_rules_hold_at_any_batch_on_meta_tensors(recipe, wgrad):
    # Without a GPU: torch's meta kernel of _scaled_mm states CUDA's rules (K and N multiples of 16,
    # row-major A); the op's bodies run on meta tensors, so every GEMM the op would issue on a GPU at
    # M = 0, 1, 7, 33 is checked. M is free in the forward and dgrad; the wgrad reduces over M, which
    # the op zero-pads to 16 on every device but the CPU (unpadded, M = 7 fails these rules).
    from recopt.fp8.linear import linear_backward, linear_forward

    for m in (0, 1, 7, 33):
        x = torch.empty(m, 32, dtype=torch.bfloat16, device="meta")
        w = torch.empty(48, 32, dtype=torch.bfloat16, device="meta")
        b = torch.empty(48, dtype=torch.bfloat16, device="meta")
        g = torch.empty(m, 48, dtype=torch.bfloat16, device="meta")
        y = linear_forward(x, w, b, recipe)
        dx, dw = linear_backward(g, x, w, recipe, wgrad, True, True)
        assert (y.shape, dx.shape, dw.shape) == ((m, 48), (m, 32), (48, 32))
        assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16,) * 3


def test_speed_reason_names_the_m_it_was_decided_at():
    # The speed side of a decision is taken at the example's rows when no calibration_data is given;
    # the reason says so, since a batch of 16 and a batch of 16384 decide differently.
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(64, 64), nn.Linear(64, 1)

        def forward(self, x):
            return self.out(torch.relu(self.a(x)))

    opt = recopt.optimize(Tower().eval(), (torch.randn(16, 64),), target="h100", passes=["fp8"], backend="eager",
                          configs={"fp8": {"samples": 2, "max_eval_rows": 64}})
    a = {s.module_path: s for s in opt.report.sites_for("fp8")}["a"]
    assert "speed at M=16 rows: the example's batch" in a.reason


@pytest.mark.parametrize("m", [0, 1, 7])
def test_fused_blocknorm_linear_at_empty_and_odd_batches(m):
    # Bug: M = 0 failed in the reference norm ("cannot reshape tensor of 0 elements into shape
    # [0, -1, 256]"), the path every CPU run and every non-row-wise recipe takes.
    from recopt.fp8.fused_quant import block_rms_norm

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 512, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(64, 512, generator=g) * 0.05).bfloat16().requires_grad_()
    y = torch.ops.recopt.blocknorm_fp8_linear(x, w, None, 256, 1e-6, "rowwise", "rowwise", "rowwise")
    ref = F.linear(block_rms_norm(x.detach().float(), 256, 1e-6), w.detach().float())
    assert y.shape == (m, 64)
    if m:  # FP8's normwise error is a few percent
        assert float((y.float() - ref).norm() / ref.norm()) < 0.1
    y.float().sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(w.grad).all()


@pytest.mark.slow
def test_torchrec_dlrm_mlps_at_unseen_batches():
    # TorchRec's own DLRM (dense and over arch MLPs; the interaction's K=35 is not a multiple of 16).
    torchrec = pytest.importorskip("torchrec")
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    torch.manual_seed(0)
    ebc = torchrec.EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=32, num_embeddings=100, feature_names=[f"f{i}"])
        for i in range(2)])
    m = DLRM(embedding_bag_collection=ebc, dense_in_features=16, dense_arch_layer_sizes=[64, 32],
             over_arch_layer_sizes=[64, 32, 1]).eval()
    g = torch.Generator().manual_seed(0)

    def batch(b):
        lengths = torch.randint(0, 4, (2 * b,), generator=g)
        ids = torch.randint(0, 100, (int(lengths.sum()),), generator=g)
        return torch.randn(b, 16, generator=g), KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1"], values=ids, lengths=lengths)

    opt = recopt.optimize(m, batch(16), target="h100", passes=["fp8"], backend="eager", configs=CFG)
    codes = {s.module_path: (s.status.value, s.reason_code) for s in opt.report.sites_for("fp8")}
    assert codes["over_arch.model.0._mlp.0._linear"] == ("rejected", "shape_not_multiple_of_16")
    assert sum(v[0] == "rewritten" for v in codes.values()) == 3
    for b in (1, 7, 33):
        x = batch(b)
        torch.testing.assert_close(opt(*x), m(*x), rtol=0.1, atol=0.1)
