"""optimize() with the GDPA pass on the reference InterFormer and Kunlun models:
every PFFN and attention site is rewritten, outputs unchanged, sites reported."""
import pytest
import torch

import recopt
from recopt.data.synthetic import SyntheticConfig, SyntheticCTR
from recopt.models import build_model
from recopt.models.kunlun import EventTowerConfig, KunlunConfig


@pytest.fixture(scope="module")
def source():
    return SyntheticCTR(SyntheticConfig(n_dense=8, sparse_cardinalities=(100, 50, 20), max_seq_len=24),
                        n_train=64, n_test=16)


def _inputs(source):
    b = source.generate(4, 0)
    return b.inputs() if callable(b.inputs) else b.inputs


CASES = {
    "kunlun_softmax": ("kunlun", None),
    "kunlun_gelu_window": ("kunlun", KunlunConfig(attn_activation="gelu_tanh", towers=(
        EventTowerConfig(window=3), EventTowerConfig(d_model=16, n_heads=2)))),
    "interformer": ("interformer", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_site_rewritten(source, case):
    name, cfg = CASES[case]
    model = build_model(name, source.spec, cfg).eval()
    inputs = _inputs(source)
    want = model(*inputs)
    opt = recopt.optimize(model, inputs, target="cpu", passes=["gdpa"])
    sites = opt.report.sites_for("gdpa")
    rejected = [(s.node, s.reason_code, s.reason) for s in sites if s.status != "rewritten"]
    assert not rejected, rejected
    patterns = {s.details["pattern"] for s in sites}
    if name == "kunlun":
        assert "pffn" in patterns
        assert ("attention" in patterns) == (cfg is not None)
    else:
        assert "pffn_reassociated" in patterns
    left = [n for n in opt.graph_module.graph.nodes
            if n.op == "call_function" and n.target in (torch.matmul, torch.bmm, torch.softmax)]
    assert not left, [n.name for n in left]
    torch.testing.assert_close(opt(*inputs), want, rtol=1e-4, atol=1e-5)
