"""LoKA Mods (No Bias, BlockNorm, Hard Swish): each changes exactly what it says."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import recopt
from recopt.fp8.fused_quant import block_rms_norm
from recopt.fp8.mods import BlockNorm, apply_blocknorm, apply_hardswish, apply_no_bias

from core_models import EmbeddingMLP, MHAModel


class NormTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 512)
        self.ln = nn.LayerNorm(512)
        self.mid = nn.Linear(512, 32)
        self.side = nn.Linear(16, 300)
        self.ln_side = nn.LayerNorm(300)
        self.ln_in = nn.LayerNorm(16)
        self.head = nn.Linear(32 + 300, 1)

    def forward(self, x):
        a = self.mid(self.ln(self.up(self.ln_in(x))))
        b = self.ln_side(self.side(x))
        c = F.layer_norm(a, (32,))
        return self.head(torch.cat([c, b], -1))


def test_blockrmsnorm_module_math():
    x = torch.randn(3, 5, 512)
    y = BlockNorm(512)(x)
    blocks = y.view(3, 5, 2, 256)
    torch.testing.assert_close(blocks.pow(2).mean(-1), torch.ones(3, 5, 2), rtol=1e-4, atol=1e-4)
    assert BlockNorm(48).block == 48  # narrower than a block: one block per row
    traced = fx.symbolic_trace(BlockNorm(512))  # no Python branch on shapes inside
    torch.testing.assert_close(traced(x), y)
    torch.testing.assert_close(y, block_rms_norm(x, 256))
    with pytest.raises(ValueError, match="multiple"):
        BlockNorm(300)
    with pytest.raises(ValueError, match="multiple"):
        block_rms_norm(x, 100)


def test_no_bias_keeps_only_the_head_bias():
    m = EmbeddingMLP().eval()
    gm = fx.symbolic_trace(m)
    out = apply_no_bias(gm)
    status = {name: (st, code) for name, st, code, _, _ in out}
    assert status["head"] == ("rejected", "final_head")
    assert status["mlp_0"][0] == status["mlp_3"][0] == "rewritten"
    keys = set(gm.state_dict())
    assert "head.bias" in keys and "mlp.0.bias" not in keys and "mlp.3.bias" not in keys
    assert "mlp.0.weight" in keys
    args = EmbeddingMLP.example_inputs()
    with torch.no_grad():
        m.mlp[0].bias.zero_()
        m.mlp[3].bias.zero_()
        torch.testing.assert_close(gm(*args), m(*args))  # equals the model with those biases zeroed


def test_no_bias_functional_spelling():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))
            self.b = nn.Parameter(torch.randn(8))
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(F.linear(x, self.w, self.b))

    gm = fx.symbolic_trace(Fn())
    outcomes = apply_no_bias(gm)
    assert [o[1] for o in outcomes] == ["rewritten", "rejected"]
    x = torch.randn(2, 4)
    lin = [n for n in gm.graph.nodes if n.target is F.linear][0]
    assert lin.args[2] is None
    torch.testing.assert_close(gm(x), gm.head(x @ gm.w.t()))


def test_blocknorm_replaces_only_norms_after_gemms():
    m = NormTower().eval()
    gm = fx.symbolic_trace(m)
    out = {name: (st, code) for name, st, code, _, _ in apply_blocknorm(gm)}
    assert out["ln"] == ("rewritten", "")
    assert out["ln_in"] == ("rejected", "not_after_gemm")
    assert out["ln_side"] == ("rejected", "block_mismatch")  # N=300 is not a multiple of 256
    assert out["layer_norm"] == ("rewritten", "")  # functional F.layer_norm after mid (N=32: one block)
    blocknorms = [mod for mod in gm.modules() if isinstance(mod, BlockNorm)]
    assert sorted(b.block for b in blocknorms) == [32, 256]
    x = torch.randn(4, 16)
    with torch.no_grad():
        up = m.up(m.ln_in(x))
        expected_mid = m.mid(block_rms_norm(up, 256))
        c = block_rms_norm(expected_mid, 32)
        expected = m.head(torch.cat([c, m.ln_side(m.side(x))], -1))
        torch.testing.assert_close(gm(x), expected)


def test_hardswish_replaces_sigmoid_type_activations_only():
    class Acts(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3, self.l4 = (nn.Linear(8, 8) for _ in range(4))
            self.silu = nn.SiLU()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            a = self.silu(self.l1(x))
            b = F.silu(self.l2(a))
            c = self.l3(b)
            c = c * torch.sigmoid(c)
            d = self.l4(c)
            d = d * torch.sigmoid(self.norm(d))
            return torch.sigmoid(d.sum(-1))  # a plain output sigmoid stays

    m = Acts().eval()
    gm = fx.symbolic_trace(m)
    out = apply_hardswish(gm)
    assert len(out) == 4 and all(o[1] == "rewritten" for o in out)
    x = torch.randn(5, 8)
    with torch.no_grad():
        a = F.hardswish(m.l1(x))
        b = F.hardswish(m.l2(a))
        c = F.hardswish(m.l3(b))
        d = m.l4(c)
        d = d * F.hardsigmoid(m.norm(d))
        torch.testing.assert_close(gm(x), torch.sigmoid(d.sum(-1)))
    assert any(n.target is torch.sigmoid for n in gm.graph.nodes)
    hs = F.hardswish(torch.tensor([-4.0, -3.0, 0.0, 1.0, 3.0, 5.0]))
    torch.testing.assert_close(hs, torch.tensor([0.0, 0.0, 0.0, 1 * 4 / 6, 3.0, 5.0]))


def test_fp8_mods_pass_through_optimize_on_foreign_models():
    for cls in (EmbeddingMLP, MHAModel):
        m = cls().eval()
        opt = recopt.optimize(m, cls.example_inputs(), target="h100", passes=["fp8_mods", "fp8"], backend="eager",
                              configs={"fp8": {"samples": 2, "max_eval_rows": 32, "ignore_speed": True}})
        runs = {p.name: p for p in opt.report.passes}
        assert runs["fp8_mods"].status == "applied" and "retrained" in runs["fp8_mods"].message
        assert runs["fp8"].status in ("applied", "no_change"), runs["fp8"].message
        assert runs["fp8_mods"].semantics == "architecture"
        out = opt(*cls.example_inputs())
        assert torch.isfinite(out).all()


def test_mod_passes_are_opt_in():
    defaults = recopt.default_pipeline("h100")
    for name in ("no_bias", "blocknorm", "hardswish", "fp8_mods", "fp8"):
        assert name in recopt.available_passes()
        assert name not in defaults
