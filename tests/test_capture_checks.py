"""Capture checks itself, and optimize leaves the caller's things alone (issue 13, items 1 and 2).

Each test here is a reproducer: it failed on main before the capture
self-check and the state snapshot/restore existed.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import recopt
from recopt.errors import CaptureError


def _same_seed(fn, seed, *args):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


class RandnNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) + 0.1 * torch.randn(4, 8)


class RandLikeNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("base", torch.ones(8))

    def forward(self, x):
        return self.lin(x) * torch.rand_like(self.base)


@pytest.mark.parametrize("cls", [RandnNoise, RandLikeNoise])
def test_random_ops_stay_random(cls):
    model = cls().eval()
    x = torch.randn(4, 8)
    opt = recopt.optimize(model, (x,), target="cpu", backend="eager")
    a = _same_seed(opt, 1, x)
    b = _same_seed(opt, 2, x)
    assert not torch.equal(a, b), "the random op was frozen into a constant"
    # Same seed, same draw as the model.
    torch.testing.assert_close(a, _same_seed(model, 1, x))


class PythonCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class BufferCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class InPlaceBufferCounter(BufferCounter):
    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x)


class RebindingBufferCounter(BufferCounter):
    def forward(self, x):
        self.calls = self.calls + 1
        return self.lin(x)


class StoresActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        self.calls = h.detach()  # a debugging cache: the graph would never refresh it
        return h


@pytest.mark.parametrize("cls", [PythonCounter, RebindingBufferCounter, StoresActivation])
def test_python_side_state_change_is_refused_naming_the_attribute(cls):
    model = cls().eval()
    x = torch.randn(3, 8)
    before = {k: v for k, v in vars(model).items() if not k.startswith("_")}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(CaptureError, match=r"self\.calls") as info:
        recopt.optimize(model, (x,), target="cpu", backend="eager")
    assert "Fix:" in str(info.value)
    # And the refused capture left the model as it was.
    assert {k: v for k, v in vars(model).items() if not k.startswith("_")} == before
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k])
    assert not any(k.startswith("_tensor_constant") for k in vars(model))


@pytest.mark.parametrize("cls", [BufferCounter, InPlaceBufferCounter])
def test_in_place_buffer_update_is_kept_as_a_real_mutation(cls):
    """``self.calls += 1`` on a tensor buffer is an in-place add: the graph keeps it."""
    model = cls().eval()
    x = torch.randn(3, 8)
    opt = recopt.optimize(model, (x,), target="cpu", backend="eager")
    assert int(model.calls) == 0, "optimize must not move the caller's buffer"
    opt(x)
    opt(x)
    assert int(model.calls) == 2, "each call of the optimized model counts, like the model's"


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.lin(x)).relu()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_optimize_leaves_batchnorm_statistics_alone(mode):
    model = BNNet().train(mode == "train")
    x = torch.randn(8, 6) * 3 + 1
    before = _state(model)
    recopt.optimize(model, (x,), target="cpu", backend="eager")
    after = _state(model)
    for k in before:
        assert torch.equal(before[k], after[k]), f"optimize changed {k}"
    assert model.training == (mode == "train")


class MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_optimize_leaves_the_example_inputs_alone():
    model = MutatesInput().eval()
    x = torch.randn(3, 5)
    x0 = x.clone()
    opt = recopt.optimize(model, (x,), target="cpu", backend="eager")
    assert torch.equal(x, x0), "optimize changed the caller's example input"
    # The optimized model still does what the model does, mutation included.
    y = x.clone()
    out = opt(y)
    z = x.clone()
    torch.testing.assert_close(out, model(z))
    torch.testing.assert_close(y, z)


class EditsWeightsInPlace(recopt.Pass):
    """A badly written pass: scales a shared weight in place, which verification catches."""

    name = "test_edits_weights_in_place"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        with torch.no_grad():
            gm.get_submodule(node.target).weight.mul_(3.0)
        return recopt.PassResult(gm, [self.rewritten(node, "scaled a weight in place")])


class EditsWeightsKeepsOutput(recopt.Pass):
    """Edits a shared weight in place without changing outputs (e.g. a no-op renormalisation gone wrong)."""

    name = "test_edits_weights_quietly"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        w = gm.get_submodule(node.target).weight
        with torch.no_grad():
            w.data[0, 0] += 1e-9
        return recopt.PassResult(gm, [self.rewritten(node, "touched a weight")])


@pytest.mark.parametrize("bad", [EditsWeightsInPlace, EditsWeightsKeepsOutput])
def test_a_pass_that_edits_weights_in_place_is_rolled_back_and_the_weights_restored(bad):
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    before = _state(model)
    opt = recopt.optimize(model, (x,), target="cpu", backend="eager", passes=[bad()])
    run = opt.report.pass_run(bad.name)
    assert run.status == "rolled_back"
    for k, v in _state(model).items():
        assert torch.equal(v, before[k]), f"{k} stayed edited after the rollback"
    if bad is EditsWeightsKeepsOutput:
        assert "in place" in run.message and "0.weight" in run.message


def test_capture_check_refuses_a_graph_that_differs_from_the_model():
    """A random op hidden from the tracer (imported by name) is caught by the self-check."""
    from torch import randn as hidden_randn

    class Hidden(nn.Module):
        def forward(self, x):
            return x + hidden_randn(3)

    model = Hidden()
    cap = recopt.capture(model, (torch.randn(2, 3),))
    # Either the graph keeps the random op (Dynamo) or capture refused: never a constant.
    a = _same_seed(cap.graph_module, 5, torch.zeros(2, 3))
    torch.testing.assert_close(a, _same_seed(model, 5, torch.zeros(2, 3)))


def test_optimize_leaves_no_fake_tensors_cached_in_keyed_jagged_inputs():
    """FLOP counting runs on fake tensors; a KJT input must not keep fake caches after optimize."""
    pytest.importorskip("torchrec")
    from test_public_models import _torchrec_dlrm

    model, inputs = _torchrec_dlrm()
    recopt.optimize(model, inputs, target="cpu", backend="eager")
    out = model(*inputs)
    assert type(out) is torch.Tensor
