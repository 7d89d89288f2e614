"""The gdpa pass on the cpu target: sites that would run the same ops as the model are left
alone (``not_faster_on_target``), FLOP-saving ones are kept, and the decision is structural
(the same at every example batch), with ``cpu_sites="all"`` to force the rewrite."""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import recopt
from recopt.ops import gdpa as gdpa_fn
from recopt.passes.base import PassContext
from recopt.passes.gdpa import cpu as gcpu
from recopt.passes.gdpa_fusion import REASONS, GDPAConfig, GDPAFusion
from recopt.targets import get_target


class Pointwise(nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.h, self.qkv = h, nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.reshape(B, T, self.h, -1).transpose(1, 2) for t in (q, k, v))
        return (F.silu(q @ k.transpose(-2, -1)) / T @ v).transpose(1, 2).reshape(B, T, D)


class Softmax(Pointwise):
    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.reshape(B, T, self.h, -1).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.h), -1) @ v
        return a.transpose(1, 2).reshape(B, T, D)


class SDPA(Pointwise):
    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.reshape(B, T, self.h, -1).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class ReassociatedPFFN(nn.Module):
    """InterFormer's single-layer PFFN: a per-sample d×d weight built from a shared one."""

    def __init__(self, d=32, n_sum=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_sum, d) / d)

    def forward(self, s, x_sum):
        wp = torch.einsum("bkd,ke->bde", x_sum, self.w)
        return torch.bmm(s, wp.transpose(1, 2))


LEFT_ALONE = {"pointwise": Pointwise, "softmax": Softmax, "sdpa": SDPA, "mha": MHA}


def _n_gdpa(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is gdpa_fn)


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
@pytest.mark.parametrize("batch", [1, 6])
def test_cpu_leaves_same_math_sites_alone_whatever_the_batch(name, batch):
    torch.manual_seed(0)
    model = LEFT_ALONE[name]().eval()
    x = torch.randn(batch, 5, 16)
    # nn.MultiheadAttention is opened by decompose_attention, which leaves it closed on the CPU
    passes = ["decompose_attention", "gdpa"] if name == "mha" else ["gdpa"]
    opt = recopt.optimize(model, (x,), target="cpu", passes=passes, strict=True)
    (site,) = opt.report.sites_for(passes[0])
    assert site.status == "rejected" and site.reason_code == gcpu.NOT_FASTER
    assert "no fused GDPA kernel" in site.reason and "cpu_sites='all'" in site.reason
    assert _n_gdpa(opt.graph_module) == 0
    y = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(opt(y), model(y))


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_cpu_sites_all_rewrites_on_cpu_and_keeps_outputs(name):
    torch.manual_seed(0)
    model = LEFT_ALONE[name]().eval()
    x = torch.randn(2, 5, 16)
    opt = recopt.optimize(model, (x,), target="cpu", passes=["decompose_attention", "gdpa"], strict=True,
                          configs={"gdpa": {"cpu_sites": "all"}, "decompose_attention": {"cpu_sites": "all"}})
    assert [s.status for s in opt.report.sites_for("gdpa")] == ["rewritten"]
    assert _n_gdpa(opt.graph_module) == 1
    y = torch.randn(1, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(opt(y), model(y), rtol=1e-5, atol=1e-5)


def test_flop_saving_reassociation_is_kept_on_cpu():
    # The pass alone (through optimize, the edge-input verifier also feeds x_sum with one row,
    # which the einsum broadcasts and the re-associated gdpa rejects: a pffn.py matter).
    torch.manual_seed(0)
    model = ReassociatedPFFN().eval()
    s, x_sum = torch.randn(3, 20, 32), torch.randn(3, 4, 32)
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(s, x_sum)
    res = GDPAFusion().run(gm, PassContext(target=get_target("cpu"), example_inputs=(s, x_sum)))
    (site,) = res.sites
    assert site.status == "rewritten" and site.details["pattern"] == "pffn_reassociated"
    torch.testing.assert_close(res.graph_module(s[:1], x_sum[:1]), model(s[:1], x_sum[:1]), rtol=1e-4, atol=1e-5)


def test_gpu_target_and_no_target_still_fuse():
    for target in (None, get_target("h100")):
        model = Pointwise().eval()
        x = torch.randn(2, 5, 16)
        gm = fx.symbolic_trace(model)
        ShapeProp(gm).propagate(x)
        res = GDPAFusion().run(gm, PassContext(target=target, example_inputs=(x,)))
        assert [s.status for s in res.sites] == ["rewritten"] and _n_gdpa(res.graph_module) == 1


def test_decision_reads_the_target_device_not_its_name():
    cpu_like = get_target({**get_target("cpu").to_dict(), "name": "my_cpu"})
    assert not gcpu.has_fused_gdpa(cpu_like) and gcpu.has_fused_gdpa(get_target("a100"))
    assert gcpu.leave_alone(GDPAConfig(), cpu_like, "attention") is not None
    assert gcpu.leave_alone(GDPAConfig(), cpu_like, "pffn_reassociated") is None
    assert gcpu.leave_alone(GDPAConfig(cpu_sites="all"), cpu_like, "mha") is None
    assert gcpu.NOT_FASTER in REASONS


def test_cpu_sites_is_validated_and_round_trips():
    with pytest.raises(ValueError, match="cpu_sites must be one of"):
        GDPAConfig(cpu_sites="sometimes")
    assert GDPAConfig.from_json(GDPAConfig(cpu_sites="all").to_json()).cpu_sites == "all"


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.enc(x)


def test_cpu_keeps_encoders_closed_unless_asked():
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 5, 16)
    opt = recopt.optimize(model, (x,), target="cpu", passes=["decompose_attention", "gdpa"], strict=True)
    (site,) = opt.report.sites_for("decompose_attention")
    assert site.status == "rejected" and site.reason_code == gcpu.NOT_FASTER and "fused encoder kernel" in site.reason
    assert any(n.op == "call_module" and n.target == "enc" for n in opt.graph_module.graph.nodes)
    both = {"gdpa": {"cpu_sites": "all"}, "decompose_attention": {"cpu_sites": "all"}}
    opened = recopt.optimize(model, (x,), target="cpu", passes=["decompose_attention", "gdpa"], strict=True,
                             configs=both)
    # the encoder layer, then its self-attention (an nn.MultiheadAttention)
    assert [s.status for s in opened.report.sites_for("decompose_attention")] == ["rewritten"] * 2
    assert [s.status for s in opened.report.sites_for("gdpa")] == ["rewritten"]
    y = torch.randn(1, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(opt(y), model(y))
        torch.testing.assert_close(opened(y), model(y), rtol=1e-5, atol=1e-5)
