import math

import pytest

import torch
import torch.fx as fx
import torch.nn as nn

import recopt
from recopt.capture import propagate_shapes
from recopt.costs import count_graph_flops, graph_activation_bytes


def test_linear_flops_are_2mnk_and_need_no_real_compute():
    gm = fx.symbolic_trace(nn.Linear(32, 16))
    assert count_graph_flops(gm, (torch.randn(8, 32),)) == 2 * 8 * 32 * 16


def test_activation_bytes_count_each_write_and_read():
    class Two(nn.Module):
        def forward(self, x):
            y = torch.relu(x)          # written once, read by two nodes
            return y + 1, y * 2        # each written once, read once (by the output)

    gm = fx.symbolic_trace(Two())
    propagate_shapes(gm, (torch.randn(4, 8),))
    per_tensor = 4 * 8 * 4
    assert graph_activation_bytes(gm) == per_tensor * (1 + 2) + 2 * per_tensor * (1 + 1)


def test_fusing_attention_lowers_the_reported_activation_traffic():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.nn.functional.gelu(q @ k.transpose(-2, -1) / math.sqrt(16)) @ v

    x = torch.randn(2, 64, 16)
    opt = recopt.optimize(Attn().eval(), (x,), target="cpu", passes=["gdpa"], strict=True,
                          configs={"gdpa": {"cpu_sites": "all"}})  # cpu: fuse anyway, to count it
    assert opt.report.bytes_after < opt.report.bytes_before
    assert "activation traffic" in str(opt.report)


# -- the report's FLOPs agree with torch's FlopCounterMode (issue #13) -------

def _flop_counter_mode(model, args):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c:
        model(*args)
    return c.get_total_flops()


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x, w):
        return self.net(x) @ w


class _SDPA(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.reshape(B, T, 4, D // 4).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)


class _Encoder(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class _TwoTowerMHA(nn.Module):
    """A retrieval two-tower model whose user tower attends over the history."""

    def __init__(self, d=32):
        super().__init__()
        self.hist, self.item = nn.Embedding(100, d), nn.Embedding(200, d)
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ut = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d))
        self.it = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d))

    def forward(self, hist_ids, item_ids):
        h = self.hist(hist_ids)
        u = self.ut(self.mha(h, h, h, need_weights=False)[0].mean(1))
        return (u * self.it(self.item(item_ids))).sum(-1)


class _PointwiseAttention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.nn.functional.silu(q @ k.transpose(-2, -1)) @ v


@pytest.mark.parametrize("make,args", [
    (_MLP, lambda: (torch.randn(16, 24), torch.randn(8, 5))),
    (_SDPA, lambda: (torch.randn(2, 10, 32),)),
    (_Encoder, lambda: (torch.randn(4, 10, 32),)),
    (_TwoTowerMHA, lambda: (torch.randint(0, 100, (8, 20)), torch.randint(0, 200, (8,)))),
    (_PointwiseAttention, lambda: (torch.randn(2, 12, 16),)),
], ids=["mlp_matmul", "sdpa", "transformer_encoder", "two_tower_mha", "pointwise_attention"])
def test_report_flops_match_flop_counter_mode_before_and_after(make, args):
    torch.manual_seed(0)
    model, a = make().eval(), args()
    want_before = _flop_counter_mode(model, a)
    opt = recopt.optimize(model, a, target="cpu")
    want_after = _flop_counter_mode(opt, a)
    assert want_before > 0
    assert opt.report.flops_before == pytest.approx(want_before, rel=0.02)
    assert opt.report.flops_after == pytest.approx(want_after, rel=0.02)


# -- an op whose FLOP formula raises: counted as 0 and named (issue #15) ----

@torch.library.custom_op("recopt_test_costs::scale_bad_flops", mutates_args=())
def _scale_bad_flops(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@_scale_bad_flops.register_fake
def _(x):
    return torch.empty_like(x)


def _raising_formula(*args, out_val=None, **kwargs):
    raise ValueError("formula bug for this test")


from torch.utils.flop_counter import register_flop_formula  # noqa: E402

register_flop_formula(torch.ops.recopt_test_costs.scale_bad_flops)(_raising_formula)


class _BadFlopsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(torch.ops.recopt_test_costs.scale_bad_flops(x))


def test_counter_names_the_op_whose_formula_raised_and_keeps_counting():
    from recopt.costs import FlopCounter, graph_flop_count

    x = torch.randn(3, 8)
    with FlopCounter() as c:
        _BadFlopsMLP()(x)
    assert c.total == 2 * 3 * 8 * 4                                   # the linear is still counted
    assert c.failed == {"recopt_test_costs.scale_bad_flops": "ValueError: formula bug for this test"}
    fc = graph_flop_count(fx.symbolic_trace(_BadFlopsMLP()), (x,))
    assert fc.total == 2 * 3 * 8 * 4 and fc.fake_run_error == ""
    assert fc.incomplete == ["recopt_test_costs.scale_bad_flops counted as 0 "
                             "(its FLOP formula raised ValueError: formula bug for this test)"]


def test_fake_run_failure_is_recorded_and_a_graph_that_cannot_run_is_not_counted():
    from recopt.costs import graph_flop_count

    class NoFake(nn.Module):            # .item() has no value on fake tensors: the real run counts
        def forward(self, x):
            return x @ x.t() * x.sum().item()

    fc = graph_flop_count(NoFake(), (torch.randn(4, 6),))
    assert fc.total == 2 * 4 * 6 * 4 and fc.incomplete == [] and fc.fake_run_error

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot run")

    fc = graph_flop_count(Broken(), (torch.randn(2),))
    assert fc.total is None and "cannot run" in fc.error and fc.incomplete == [f"not counted: {fc.error}"]
    assert count_graph_flops(Broken(), (torch.randn(2),)) is None


def test_report_says_flops_are_incomplete_where_flops_and_the_prediction_are_shown():
    opt = recopt.optimize(_BadFlopsMLP().eval(), (torch.randn(3, 8),), target="h100", backend="eager")
    rep = opt.report
    assert len(rep.flops_incomplete) == 1 and "scale_bad_flops counted as 0" in rep.flops_incomplete[0]
    assert "the graph before the passes" in rep.flops_incomplete[0]
    text = rep.to_text()
    assert "FLOPs incomplete: recopt_test_costs.scale_bad_flops counted as 0" in " ".join(text.split())
    assert rep.predicted_speedup is not None and "FLOPs incomplete" in rep.speedup_line()
    assert "FLOPs incomplete" in rep.to_html()
    assert type(rep).from_dict(rep.to_dict()).flops_incomplete == rep.flops_incomplete


def test_complete_counts_report_nothing_incomplete():
    opt = recopt.optimize(_MLP().eval(), (torch.randn(4, 24), torch.randn(8, 5)), target="cpu", backend="eager")
    assert opt.report.flops_incomplete == [] and "FLOPs incomplete" not in opt.report.to_text()
