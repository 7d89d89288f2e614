"""Measured speed-up beside the predicted one (recopt.measure, report.speedup_line)."""
import pytest
import torch
import torch.nn as nn

import recopt
from recopt.measure import measure_speedup
from recopt.report import OptimizationReport
from recopt.targets import get_target


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.norm(self.lin(x)).relu()


def test_optimize_measure_fills_report_and_leaves_no_trace():
    torch.manual_seed(0)
    model = Small().train()
    x = torch.randn(4, 8)
    before = model.norm.running_mean.clone()
    opt = recopt.optimize(model, (x,), target="cpu", measure=True)
    m = opt.report.measured
    assert opt.report.measured_speedup == m["speedup"] > 0
    assert m["original_ms"] > 0 and m["optimized_ms"] > 0 and m["noise"] > 0
    assert m["batch"] == 4 and m["threads"] == torch.get_num_threads() and m["repeats"] >= 30
    assert model.training and torch.equal(model.norm.running_mean, before)  # mode and buffers restored
    line = opt.report.speedup_line()
    assert "measured" in line and "predicted for cpu: none" in line
    assert "speed-up: measured" in opt.report.to_text()
    again = OptimizationReport.from_dict(opt.report.to_dict())
    assert again.measured_speedup == opt.report.measured_speedup


def test_not_measured_says_so_and_gpu_target_predicts():
    torch.manual_seed(0)
    opt = recopt.optimize(Small().eval(), (torch.randn(2, 8),), target="cpu")
    assert opt.report.measured_speedup is None
    assert "not measured" in opt.report.speedup_line()
    rep = OptimizationReport(target=get_target("h100").to_dict(), flops_before=4e12, flops_after=2e12,
                             bytes_before=1e6, bytes_after=1e6)
    assert abs(rep.predicted_speedup - 2.0) < 1e-9
    assert "predicted for h100: 2.00x" in rep.speedup_line()


def test_measure_speedup_validates_and_counts_rounds():
    torch.manual_seed(0)
    opt = recopt.optimize(Small().eval(), (torch.randn(2, 8),), target="cpu")
    res = measure_speedup(opt, torch.randn(3, 8), repeats=5, warmup=1)
    assert res["repeats"] == 5 and res["batch"] == 3
    try:
        measure_speedup(opt, torch.randn(3, 8), repeats=0)
    except ValueError as e:
        assert "repeats" in str(e)
    else:
        raise AssertionError("repeats=0 must be rejected")


# -- the speed guard: optimize(..., measure="guard") -------------------------

def _slow_identity(x):
    """Exact (returns x) but ~1 ms of CPU work: what a pass that made the model slower looks like."""
    acc = x
    for _ in range(400):
        acc = acc.clone()
    return x + (acc - acc)


class _SlowDown(recopt.Pass):
    """A test pass: puts _slow_identity on the graph's output (exact, verified, and slower)."""

    name = "slow_down"

    def run(self, gm, ctx):
        from recopt.passes.base import PassResult

        out = next(n for n in gm.graph.nodes if n.op == "output")
        src = out.args[0]
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(_slow_identity, (src,))
        out.args = (new,)
        gm.recompile()
        return PassResult(gm, [self.rewritten(new, "slowed down on purpose")])


def test_guard_drops_the_pass_that_made_it_slower_and_says_so(monkeypatch):
    import recopt.measure as M

    # The slowed pass runs at ~0.04x; a floor of 0.5 keeps CI noise from calling the
    # variant without it slower too.
    monkeypatch.setattr(M, "GUARD_FLOOR", 0.5)
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(6, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded CI machine, multi-threaded timings of tiny ops are mostly waiting
    try:
        opt = recopt.optimize(model, (x,), target="cpu", passes=[_SlowDown(), "dead_code"], measure="guard")
    finally:
        torch.set_num_threads(threads)
    g = opt.report.measured["guard"]
    assert g["batches"] == ["example", "batch 1"] and set(g["slower_at"]) == {"example", "batch 1"}
    assert [d["pass"] for d in g["dropped"]] == ["slow_down"]
    assert g["dropped"][0]["reason_code"] == "not_faster_on_target"
    assert [p.name for p in opt.report.passes] == ["dead_code"]
    assert any("speed guard: dropped slow_down" in n for n in opt.report.notes)
    assert opt.report.measured_speedup is not None
    torch.testing.assert_close(opt(x), model(x))


def test_guard_validates_measure_and_slices_batch_one():
    from recopt.measure import _edge_batches

    with pytest.raises(recopt.InputError, match="measure must be"):
        recopt.optimize(Small().eval(), (torch.randn(2, 8),), target="cpu", measure="sometimes")
    a, b = torch.randn(5, 3), torch.randn(5)
    eb = _edge_batches((a, b, 7))
    assert list(eb) == ["example", "batch 1"] and eb["batch 1"][0].shape == (1, 3) and eb["batch 1"][2] == 7
    assert list(_edge_batches((a, torch.randn(4)))) == ["example"]       # no shared batch dim
    assert list(_edge_batches((torch.randn(1, 3),))) == ["example"]      # already batch 1


@pytest.mark.parametrize("verdict", ["never_slower", "always_slower"])
def test_guard_keeps_everything_or_falls_back_to_no_pass(verdict, monkeypatch):
    """The two ends, made deterministic by fixing the timing verdict."""
    import recopt.measure as M

    slow = verdict == "always_slower"
    monkeypatch.setattr(M, "_slower", lambda o, c, a, s: (slow, [{"speedup": 0.5 if slow else 1.0}]))
    calls = []

    def reoptimize(names):
        calls.append(list(names))
        return recopt.optimize(Small().eval(), (torch.randn(4, 8),), target="cpu", passes=list(names))

    opt = recopt.optimize(Small().eval(), (torch.randn(4, 8),), target="cpu", passes=["remove_identity", "dead_code"])
    out = M.speed_guard(opt, (torch.randn(4, 8),), reoptimize, seconds=0.01)
    g = out.report.measured["guard"]
    if not slow:
        assert out is opt and calls == [] and g["dropped"] == [] and g["slower_at"] == {}
    else:
        applied = [p.name for p in opt.report.passes if p.status == "applied"]
        assert calls[-1] == [] and len(calls) == len(applied) + 1
        assert [p.name for p in out.report.passes] == []
        assert any("returned the captured graph without passes" in n for n in out.report.notes)
