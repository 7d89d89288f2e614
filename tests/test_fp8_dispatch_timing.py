"""Dispatch times what runs: the whole FP8 linear vs bf16 F.linear, keyed by device + software versions.

No GPU here: the timing harness runs its real steps on the CPU with an
injected timer (``fn.label`` says which arm it times), so the decision logic,
the caching and the torchao selection are tested; GPU numbers are not.
"""
import json

import pytest
import torch
import torch.nn as nn

import recopt
from recopt.fp8 import dispatch as D
from recopt.fp8 import timing as T
from recopt.fp8.linear import FP8Linear

FAST = {"samples": 2, "max_eval_rows": 64}


class FakeTimer:
    """Seconds per arm from a table: ``{"bf16": 1.0, "recopt:rowwise/...": 0.5, ...}``; records calls."""

    def __init__(self, table, default=2.0):
        self.table, self.default, self.calls = table, default, []

    def __call__(self, fn):
        fn()  # the real step runs (on the CPU)
        self.calls.append(fn.label)
        for key, v in self.table.items():
            if fn.label.startswith(key):
                return v
        return self.default


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(D, "CACHE", D.MeasurementCache())  # the pass measures into D.CACHE


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_time_site_runs_both_arms_interleaved_and_reports_the_ratio(mode):
    timer = FakeTimer({"bf16": 3.0, "recopt:": 2.0})
    cand = {"backend": "recopt", "recipes": {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "bf16"}}
    t = T.time_site(17, 32, 48, cand, mode=mode, lowering="eager", device="cpu", timer=timer, rounds=3)
    assert t.speedup == pytest.approx(1.5) and t.candidate == "recopt:rowwise/rowwise/bf16"
    assert timer.calls == ["bf16", t.candidate] * 3  # interleaved, medians of each
    with pytest.raises(ValueError, match="lowering"):
        T.time_site(16, 32, 48, cand, lowering="tensorrt", device="cpu", timer=timer)


def test_training_step_runs_forward_and_backward():
    seen = {}

    def timer(fn):
        lin_grads_before = None
        fn()
        seen[fn.label] = True
        return 1.0

    cand = {"backend": "recopt", "recipes": {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"}}
    base = nn.Linear(32, 16)
    step = T.make_step(FP8Linear.from_linear(base, cand["recipes"]), torch.randn(8, 32), "training")
    step()
    assert base.weight.grad is not None and base.bias.grad is not None  # the backward ran
    base.weight.grad = None
    T.make_step(FP8Linear.from_linear(base, cand["recipes"]), torch.randn(8, 32), "inference")()
    assert base.weight.grad is None


def test_default_timer_refuses_a_cpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        T.default_timer(lambda: None)


def test_measurements_are_cached_per_environment(monkeypatch):
    timer = FakeTimer({"bf16": 2.0, "recopt:": 1.0})
    cand = {"backend": "recopt", "recipes": {"forward": "rowwise", "dgrad": "bf16", "wgrad": "bf16"}}
    cache = D.MeasurementCache()
    r1 = D.measure_site(16, 32, 48, cand, "inference", "eager", cache=cache, timer=timer, device="cpu")
    n = len(timer.calls)
    r2 = D.measure_site(16, 32, 48, cand, "inference", "eager", cache=cache, timer=timer, device="cpu")
    assert r1 == r2 and len(timer.calls) == n  # re-used
    D.measure_site(16, 32, 48, cand, "inference", "compile" if False else "eager", cache=cache, timer=timer,
                   device="cpu", bias=False)
    assert len(timer.calls) > n  # another key (no bias): measured
    n = len(timer.calls)
    env = T.environment(torch.device("cpu"))
    monkeypatch.setattr(T, "environment", lambda device=None: dict(env, torch="9.9.9"))
    D.measure_site(16, 32, 48, cand, "inference", "eager", cache=cache, timer=timer, device="cpu")
    assert len(timer.calls) > n  # another torch version: not re-used
    keys = list(cache.data)
    assert any("torch=9.9.9" in k for k in keys) and any(f"torch={torch.__version__}" in k for k in keys)


def test_environment_key_and_mismatch():
    env = T.environment(torch.device("cpu"))
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert T.environment_mismatch(env, dict(env)) == []
    assert T.environment_mismatch(dict(env, device="NVIDIA H100 80GB HBM3"), env) == ["device"]
    assert "device=cpu" in T.environment_key(env)


def _optimize(model, x, timer, verify=True, **cfg):
    D.CACHE.data.clear()  # each run measures with its own fake timer
    return recopt.optimize(model, (x,), target="h100", passes=["fp8"], backend="eager", fp8_timer=timer, verify=verify,
                           configs={"fp8": {**FAST, "measure": "always", "lowering": "eager",
                                            "recipes": ["rowwise", "tensorwise"], **cfg}})


def test_pass_keeps_a_site_only_if_the_whole_op_is_measured_faster():
    x = torch.randn(64, 32)
    fast = _optimize(Tower().eval(), x, FakeTimer({"bf16": 1.0, "recopt:rowwise": 0.5, "recopt:": 0.9}))
    sites = {s.module_path: s for s in fast.report.sites_for("fp8")}
    assert sites["a"].status == "rewritten" and sites["a"].details["basis"] == "measured"
    assert sites["a"].details["roles"]["forward"]["recipe"] == "rowwise"
    assert "measured end to end (eager, inference) 2.00×" in sites["a"].reason
    t = sites["a"].details["timings"]["recopt:rowwise/bf16/bf16"]
    assert t["speedup"] == pytest.approx(2.0) and t["lowering"] == "eager" and t["mode"] == "inference"

    slow = _optimize(Tower().eval(), x, FakeTimer({"bf16": 1.0, "recopt:": 1.02}))
    for s in slow.report.sites_for("fp8"):
        if s.module_path in ("a", "b"):
            assert s.status == "rejected" and s.reason_code == "slower_than_bf16", s.reason
            assert "measured" in s.reason
    assert not any(isinstance(m, FP8Linear) for m in slow.graph_module.modules())


@pytest.mark.parametrize("mix_s,expect", [(1.3, "rejected"), (0.75, "rewritten")])
def test_training_times_forward_and_backward_and_confirms_the_mix(mix_s, expect):
    """tensorwise is fastest but its e5m2 gradients miss τ, so the per-role rule assembles a mix
    (tensorwise forward, rowwise gradients) nobody timed; it is timed before it is kept."""
    x = torch.randn(64, 32)
    timer = FakeTimer({"bf16": 1.0, "recopt:rowwise/rowwise/rowwise": 0.8,
                       "recopt:tensorwise/tensorwise/tensorwise": 0.7, "recopt:tensorwise/rowwise/rowwise": mix_s})
    # verify=False: this tests the decision; a random 64×32 tower's gradients are checked elsewhere.
    opt = _optimize(Tower().train(), x, timer, verify=False, mode="training", metric="normwise", threshold=0.045)
    s = {s.module_path: s for s in opt.report.sites_for("fp8")}["a"]
    assert set(s.details["timings"]) == {"recopt:rowwise/rowwise/rowwise", "recopt:tensorwise/tensorwise/tensorwise",
                                         "recopt:tensorwise/rowwise/rowwise"}
    assert s.status == expect, s.reason
    if expect == "rejected":
        assert s.reason_code == "slower_than_bf16" and "best recopt:tensorwise/rowwise/rowwise 0.77×" in s.reason
    else:
        roles = s.details["roles"]
        assert (roles["forward"]["recipe"], roles["dgrad"]["recipe"], roles["wgrad"]["recipe"]) == \
            ("tensorwise", "rowwise", "rowwise")
        assert isinstance(opt.graph_module.a, FP8Linear)
    assert "bf16" in timer.calls and len(timer.calls) == 2 * 3 * 3 * 2  # 3 configs × 3 rounds × 2 arms × 2 sites


def test_measured_decisions_are_saved_with_the_environment_and_not_reused_elsewhere(tmp_path):
    path = str(tmp_path / "d.json")
    x = torch.randn(64, 32)
    _optimize(Tower().eval(), x, FakeTimer({"bf16": 1.0, "recopt:": 0.5}), decisions_path=path)
    doc = json.load(open(path))
    assert doc["basis"] == "measured" and doc["environment"]["device"] == "cpu" and doc["lowering"] == "eager"
    again = recopt.optimize(Tower().eval(), (x,), target="h100", passes=["fp8"], backend="eager",
                            configs={"fp8": {"load_decisions": path}})
    assert len(again.report.sites_for("fp8", "rewritten")) == 2  # same machine and versions: re-used
    doc["environment"]["device"] = "NVIDIA H100 80GB HBM3"
    json.dump(doc, open(path, "w"))
    other = recopt.optimize(Tower().eval(), (x,), target="h100", passes=["fp8"], backend="eager",
                            configs={"fp8": {"load_decisions": path}})
    rej = [s for s in other.report.sites_for("fp8") if s.module_path in ("a", "b")]
    assert all(s.status == "rejected" and s.reason_code == "stale_environment" for s in rej)
    assert "device=NVIDIA H100 80GB HBM3" in rej[0].reason


def test_cpu_decisions_stay_predicted_and_say_so():
    opt = recopt.optimize(Tower().eval(), (torch.randn(64, 32),), target="h100", passes=["fp8"], backend="eager",
                          configs={"fp8": FAST})
    for s in opt.report.sites_for("fp8"):
        if s.module_path in ("a", "b"):
            assert s.details["basis"] == "predicted" and "predicted, not measured" in s.reason
            assert s.details["timings"] == {}


def test_timings_path_reuses_measurements_on_the_same_machine(tmp_path):
    path = str(tmp_path / "timings.json")
    x = torch.randn(64, 32)
    first = _optimize(Tower().eval(), x, FakeTimer({"bf16": 1.0, "recopt:": 0.5}), timings_path=path)
    data = json.load(open(path))
    assert data and all(k.startswith("device=cpu|") for k in data)

    def no_timing(fn):
        raise AssertionError("timings must come from timings_path")

    again = _optimize(Tower().eval(), x, no_timing, timings_path=path)
    assert [s.status for s in again.report.sites_for("fp8")] == [s.status for s in first.report.sites_for("fp8")]
    a = {s.module_path: s for s in again.report.sites_for("fp8")}["a"]
    assert a.status == "rewritten" and a.details["timings"]["recopt:rowwise/bf16/bf16"]["speedup"] == 2.0


def test_blocknorm_fed_site_is_timed_with_the_fused_op():
    """A site fed by a BlockNorm it fuses with is timed as it will run: norm + FP8 op in one custom op,
    against BlockNorm + F.linear in bf16."""
    from recopt.fp8.mods import BlockNorm

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin, self.head = BlockNorm(64, block=32), nn.Linear(64, 32), nn.Linear(32, 1)

        def forward(self, x):
            return self.head(torch.relu(self.lin(self.norm(x))))

    seen = []

    def timer(fn):
        fn()
        seen.append(fn.label)
        return 1.0 if fn.label == "bf16" else (0.5 if fn.label.endswith("+blocknorm") else 3.0)

    D.CACHE.data.clear()
    opt = recopt.optimize(M().train(), (torch.randn(48, 64),), target="h100", passes=["fp8"], backend="eager",
                          fp8_timer=timer, leaf_modules=[BlockNorm], verify=False,
                          configs={"fp8": {**FAST, "measure": "always", "lowering": "eager", "mode": "training",
                                           "recipes": ["rowwise"]}})
    s = {s.module_path: s for s in opt.report.sites_for("fp8")}["lin"]
    assert s.status == "rewritten" and list(s.details["timings"]) == ["recopt:rowwise/rowwise/rowwise+blocknorm"]
    assert "blocknorm" in s.details["producer"]
    ops = [n.target for n in opt.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.recopt.blocknorm_fp8_linear.default in ops
    assert set(seen) == {"bf16", "recopt:rowwise/rowwise/rowwise+blocknorm"}
