"""FP8 decision and timing files read back by the fp8 pass, as an attacker would write them: they carry
data, never code; a garbled, oversized or foreign file is refused with an error naming it, and
decisions made for another target or machine are not trusted."""
import json
import pickle

import pytest
import torch
import torch.nn as nn

import recopt
from recopt.errors import PassError
from recopt.fp8 import dispatch as D
from recopt.fp8.linear import FP8Linear


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 1)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _good_doc():
    site = D.SiteDecision("a", 16, 32, 64, decision="fp8", roles={"forward": D.RoleDecision("rowwise", "torch")})
    return {"version": 1, "target": "h100", "basis": "predicted, not measured", "sites": [site.to_dict()]}


def _load(tmp_path, doc, target="h100"):
    path = tmp_path / "d.json"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return recopt.optimize(Tower().eval(), (torch.randn(8, 32),), target=target, passes=["fp8"], backend="eager",
                           strict=True,
                           configs={"fp8": {"load_decisions": str(path)}})


def test_a_good_file_is_applied(tmp_path):
    opt = _load(tmp_path, _good_doc())
    assert isinstance(opt.graph_module.a, FP8Linear)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["sites"][0].update(__class__="os.system"), "__class__"),
    (lambda d: d["sites"][0]["roles"]["forward"].update(recipe="__import__('os')"), "roles.forward.recipe"),
    (lambda d: d["sites"][0]["roles"].update(dgrad={"recipe": "rowwise_gw_hp", "reason": 3}), "roles.dgrad.reason"),
    (lambda d: d["sites"][0].update(k=True), "'k'"),
    (lambda d: d["sites"][0].update(decision="yes"), "'decision'"),
    (lambda d: d["sites"][0].update(backend="../../evil"), "'backend'"),
    (lambda d: d["sites"][0].pop("fqn"), "'fqn'"),
    (lambda d: d.pop("target"), "'target'"),
    (lambda d: d.pop("basis"), "'basis'"),
    (lambda d: d.update(sites={"a": 1}), "'sites' must be a list"),
    (lambda d: d["sites"].append(dict(d["sites"][0])), "two decisions"),
])
def test_garbled_fields_are_refused_with_the_field_named(tmp_path, mutate, match):
    doc = _good_doc()
    mutate(doc)
    with pytest.raises(PassError, match=match):
        _load(tmp_path, doc)


def test_pickles_non_json_and_huge_files_are_refused(tmp_path, monkeypatch):
    with pytest.raises(PassError, match="not valid JSON"):
        _load(tmp_path, pickle.dumps({"version": 1}))
    with pytest.raises(PassError, match="JSON object"):
        _load(tmp_path, "[1, 2]")
    monkeypatch.setattr(D, "MAX_FILE_BYTES", 100)
    with pytest.raises(PassError, match="over the 100-byte limit"):
        _load(tmp_path, _good_doc())


def test_decisions_for_another_target_are_not_trusted(tmp_path):
    # Before: the target in the file was not read, so h100 decisions loaded for an a100 (no FP8 tensor
    # cores) rewrote the sites to FP8 and _scaled_mm would fail there at run time.
    opt = _load(tmp_path, _good_doc(), target="a100")
    a = {s.module_path: s for s in opt.report.sites_for("fp8")}["a"]
    assert a.status == "rejected" and a.reason_code == "stale_target" and "h100" in a.reason
    assert not isinstance(opt.graph_module.a, FP8Linear)


def test_measured_decisions_with_a_garbled_environment_are_not_trusted(tmp_path):
    doc = _good_doc()
    doc.update(basis="measured", environment="NVIDIA H100")
    a = {s.module_path: s for s in _load(tmp_path, doc).report.sites_for("fp8")}["a"]
    assert a.reason_code == "stale_environment"


@pytest.mark.parametrize("content,match", [
    ("[]", "not an object"),
    (json.dumps({"k": -1.0}), "positive finite time"),
    (json.dumps({"k": "fast"}), "entry 'k'"),
    (json.dumps({"k": {"bf16_s": 1.0, "fp8_s": 0.5, "speedup": 50.0, "candidate": "x"}}), "speedup = bf16_s / fp8_s"),
    (json.dumps({"k": {"bf16_s": 1.0, "fp8_s": -0.5, "speedup": -2.0, "candidate": "x"}}), "positive"),
    ("{not json", "not valid JSON"),
])
def test_timing_caches_are_checked(tmp_path, content, match):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        D.MeasurementCache(str(path))
    path.write_text(json.dumps({"k": {"bf16_s": 1.0, "fp8_s": 0.5, "speedup": 2.0, "candidate": "x"}}))
    assert D.MeasurementCache(str(path)).data["k"]["speedup"] == 2.0


class TiedTower(nn.Module):  # one nn.Linear called three times (shared weights)
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(64, 64), nn.Linear(64, 1)

    def forward(self, x, z):
        h = torch.relu(self.a(x))
        return self.head(self.a(h) + self.a(z))


def test_a_layer_called_several_times_saves_one_decision_per_call_and_loads_back(tmp_path):
    # Before: the three calls of `a` were saved under the same fqn and, read back, the last one's
    # decision silently stood for all three.
    path = str(tmp_path / "tied.json")
    g = torch.Generator().manual_seed(0)
    ex = (torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g))
    recopt.optimize(TiedTower().eval(), ex, target="h100", passes=["fp8"], backend="eager",
                    configs={"fp8": {"ignore_speed": True, "samples": 2, "max_eval_rows": 64, "decisions_path": path}})
    doc = json.load(open(path))
    assert sorted((s["fqn"], s["call"]) for s in doc["sites"]) == [("a", 0), ("a", 1), ("a", 2)]
    again = recopt.optimize(TiedTower().eval(), ex, target="h100", passes=["fp8"], backend="eager", strict=True,
                            configs={"fp8": {"load_decisions": path}})
    assert len(again.report.sites_for("fp8", "rewritten")) == 3
    assert isinstance(again.graph_module.a, FP8Linear)


def test_calls_of_one_module_with_different_decisions_all_stay_high_precision(tmp_path):
    # One module is swapped for every call or none: a report saying "bf16" for a call that would run
    # the FP8 module would be wrong.
    doc = _good_doc()
    doc["sites"] = [D.SiteDecision("a", 32, 64, 64, decision="fp8", call=c,
                                   roles={"forward": D.RoleDecision("rowwise" if c < 2 else "tensorwise", "torch")}
                                   ).to_dict() for c in range(3)]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(doc))
    g = torch.Generator().manual_seed(0)
    opt = recopt.optimize(TiedTower().eval(), (torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)),
                          target="h100", passes=["fp8"], backend="eager", configs={"fp8": {"load_decisions": str(path)}})
    a = [s for s in opt.report.sites_for("fp8") if s.module_path == "a"]
    assert len(a) == 3 and {s.reason_code for s in a} == {"shared_module_mixed"}
    assert "call 2: fp8 tensorwise" in a[0].reason
    assert not isinstance(opt.graph_module.a, FP8Linear)
