"""The torch.compile backend keeps Dynamo's outputs: passes that append outputs (ExFM's
aux_head) are refused with an InputError naming the pass and the fix, never compiled into a
graph whose outputs Dynamo would unpack wrongly (recopt/lower.py)."""
import pytest
import torch
import torch.nn as nn

import recopt
from recopt import lower as L
from recopt.errors import InputError


@pytest.fixture
def no_inductor(monkeypatch):
    """Inductor's compile replaced by running the graph handed to it."""
    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, config_patches=None, **kw: gm.forward)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _student():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_compile_backend_refuses_aux_head_when_made():
    with pytest.raises(InputError, match=r"pass 'aux_head' changes the graph's outputs.*must return exactly the "
                                         r"outputs Dynamo captured.*recopt.optimize"):
        recopt.compile_backend(passes=["default", "aux_head"], target="cpu")


def test_registered_backend_refuses_aux_head_through_torch_compile(no_inductor):
    L.register_dynamo_backend()
    m, x = _student(), torch.randn(4, 8)
    with pytest.raises(Exception, match=r"pass 'aux_head' changes the graph's outputs"):
        torch.compile(m, backend="recopt", options={"passes": ["aux_head"], "target": "cpu"})(x)
    # the same model through optimize: serving output first, the distillation output after it
    opt = recopt.optimize(m, (x,), target="cpu", backend="eager", passes=["aux_head"])
    serving, distill = opt(x)
    torch.testing.assert_close(serving, m(x), rtol=0, atol=0)
    assert distill.shape == serving.shape


class AppendsQuietly(recopt.Pass):
    """Declares the 'same' output contract but appends an output (a buggy user pass)."""

    name = "test_appends_quietly"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0]
        values = list(value) if isinstance(value, (tuple, list)) else [value]
        first = values[0]
        out.args = (type(value)(values + [first]) if isinstance(value, (tuple, list)) else (first, first),)
        gm.recompile()
        return recopt.PassResult(gm, [self.rewritten(first, "appended an output")])


def test_backend_raises_when_a_pass_changes_dynamos_outputs_unverified(no_inductor):
    m, x = _student(), torch.randn(4, 8)
    be = recopt.compile_backend(passes=[AppendsQuietly()], target="cpu", verify=False)
    with torch.no_grad(), pytest.raises(Exception, match=r"changed the outputs of Dynamo's graph \(1 -> 2 values\)"):
        torch.compile(m, backend=be)(x)
    torch._dynamo.reset()
    # verified, the same pass is rolled back and the graph keeps its outputs
    be = recopt.compile_backend(passes=[AppendsQuietly()], target="cpu")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend=be)(x), m(x))
    assert be.reports[-1].pass_run("test_appends_quietly").status != "applied"
