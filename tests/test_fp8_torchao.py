"""torchao's float8 linear as an FP8 execution backend: adapter, selection, and life without torchao.

torchao 0.18's Float8Linear runs on the CPU through torch._scaled_mm, so the
adapter's numerics, state dicts and the pass's selection are tested here; its
speed is not (GPU only).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import recopt
from recopt.fp8 import dispatch as D
from recopt.fp8 import torchao_backend as TA
from recopt.fp8.linear import FP8Linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_torchao = pytest.mark.skipif(not TA.available(), reason="torchao (extra 'fp8') is not installed")


@needs_torchao
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("train", [True, False])
def test_adapter_shares_parameters_and_state_dict(recipe, train):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(torch.bfloat16).train(train)
    mod = TA.to_torchao_linear(lin, recipe)
    assert TA.is_torchao_linear(mod) and mod.training == train
    assert mod.weight is lin.weight and mod.bias is lin.bias
    assert list(mod.state_dict()) == ["weight", "bias"]
    mod.load_state_dict(lin.state_dict())  # checkpoints load either way
    x = torch.randn(24, 64, dtype=torch.bfloat16, requires_grad=True)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    ref = lin(x)
    rel = (y.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 0.06
    if train:
        y.sum().backward()
        assert x.grad is not None and lin.weight.grad is not None and lin.weight.grad.dtype == torch.bfloat16


@needs_torchao
def test_adapter_errors():
    with pytest.raises(ValueError, match="not one of"):
        TA.to_torchao_linear(nn.Linear(16, 16), "blockwise")
    with pytest.raises(TypeError, match="replaces nn.Linear"):
        TA.to_torchao_linear(nn.Conv1d(1, 1, 1), "rowwise")


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _timer(table):
    def timer(fn):
        fn()
        return next((v for k, v in table.items() if fn.label.startswith(k)), 2.0)
    return timer


@needs_torchao
@pytest.mark.parametrize("ours,theirs,expect", [(0.8, 0.6, "torchao"), (0.6, 0.8, "recopt"), (1.2, 1.1, None)])
def test_dispatch_keeps_the_fastest_of_ours_torchao_and_bf16(monkeypatch, ours, theirs, expect):
    monkeypatch.setattr(D, "_cuda", lambda: True)  # torchao candidates need CUDA; the steps run on the CPU
    D.CACHE.data.clear()
    timer = _timer({"bf16": 1.0, "recopt:": ours, "torchao:rowwise": theirs, "torchao:tensorwise": 5.0})
    x = torch.randn(64, 32)
    opt = recopt.optimize(Tower().eval(), (x,), target="h100", passes=["fp8"], backend="eager", fp8_timer=timer,
                          configs={"fp8": {"samples": 2, "max_eval_rows": 64, "measure": "always",
                                           "lowering": "eager", "recipes": ["rowwise", "tensorwise"]}})
    a = {s.module_path: s for s in opt.report.sites_for("fp8")}["a"]
    assert {"torchao:rowwise", "torchao:tensorwise"} <= set(a.details["timings"])
    mod = opt.graph_module.a
    if expect is None:
        assert a.status == "rejected" and a.reason_code == "slower_than_bf16" and type(mod) is nn.Linear
        return
    assert a.status == "rewritten" and a.details["backend"] == expect, a.reason
    assert (TA.is_torchao_linear(mod) if expect == "torchao" else isinstance(mod, FP8Linear))
    from recopt.fp8.table import fp8_site_table

    assert ("(torchao)" in fp8_site_table(opt.report)) == (expect == "torchao")
    assert set(opt.graph_module.state_dict()) == {f"{n}.{p}" for n in ("a", "b", "head") for p in ("weight", "bias")}
    with torch.no_grad():
        out = opt(x)
    assert out.shape == (64, 1) and torch.isfinite(out).all()


def test_without_torchao_nothing_changes():
    """torchao blocked from import: no torchao candidate, the adapter names the extra, the pass runs."""
    code = '''
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchao":
            raise ModuleNotFoundError("No module named 'torchao' (blocked)", name=name)
sys.meta_path.insert(0, Blocker())
import torch, torch.nn as nn, recopt
from recopt.errors import MissingDependencyError
from recopt.fp8 import dispatch as D, torchao_backend as TA
assert not TA.available()
D._cuda = lambda: True
assert not any(c.available() for c in D.torchao_candidates())
try:
    TA.to_torchao_linear(nn.Linear(16, 16), "rowwise")
except MissingDependencyError as e:
    assert "recopt[fp8]" in str(e), e
else:
    raise AssertionError("expected MissingDependencyError")
m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
opt = recopt.optimize(m, (torch.randn(16, 32),), target="h100", passes=["fp8"], backend="eager",
                      configs={"fp8": {"samples": 2, "max_eval_rows": 32, "ignore_speed": True}})
assert len(opt.report.sites_for("fp8", "rewritten")) == 1
print("OK")
'''
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
