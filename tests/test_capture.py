import pytest
import torch
import torch.nn as nn

import recopt
from recopt.errors import CaptureError, InputError

from core_models import EmbeddingMLP, ShapeBranchModel, ValueBranchModel


def test_symbolic_trace_with_shapes_on_every_tensor_node():
    m = EmbeddingMLP()
    cap = recopt.capture(m, EmbeddingMLP.example_inputs())
    assert cap.method == "symbolic_trace"
    assert not cap.guards
    for n in cap.graph_module.graph.nodes:
        if n.op in ("call_module", "call_function", "call_method"):
            assert "tensor_meta" in n.meta, n.name
    out = cap.graph_module(*EmbeddingMLP.example_inputs())
    m.eval(); cap.graph_module.eval()
    torch.testing.assert_close(cap.graph_module(*EmbeddingMLP.example_inputs()), m(*EmbeddingMLP.example_inputs()))
    assert out.shape == (6,)


def test_shape_branch_falls_back_to_dynamo_and_records_guards():
    m = ShapeBranchModel()
    x = torch.randn(6, 3, 8)
    cap = recopt.capture(m, (x,))
    assert cap.method == "dynamo"
    assert any("symbolic_trace failed" in d for d in cap.diagnostics)
    assert cap.guards, "the size branch must be recorded as a guard"
    assert cap.guards_hold((torch.randn(7, 3, 8),))
    assert not cap.guards_hold((torch.randn(2, 3, 8),))  # takes the other branch
    torch.testing.assert_close(cap.graph_module(x), m(x))


def test_value_branch_fails_with_the_source_line_and_a_fix():
    with pytest.raises(CaptureError) as e:
        recopt.capture(ValueBranchModel(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "ValueBranchModel" in msg
    assert "core_models.py" in msg
    assert "on_untraceable='eager'" in msg


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        m = nn.Linear(4, 4)
    with pytest.raises(InputError, match="meta device"):
        recopt.capture(m, (torch.randn(2, 4),))


def test_inputs_not_matching_forward_are_refused_with_signature():
    with pytest.raises(InputError, match=r"forward\(dense, user_ids"):
        recopt.capture(EmbeddingMLP(), (torch.randn(2, 4),))


def test_inputs_with_wrong_shape_are_refused_before_capture():
    with pytest.raises(InputError, match="fails on example_inputs"):
        recopt.capture(nn.Linear(4, 4), (torch.randn(2, 5),))


def test_capture_keeps_training_mode_and_buffers():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    m.train()
    before = m[1].running_mean.clone()
    cap = recopt.capture(m, (torch.randn(8, 4),))
    assert m.training and cap.graph_module.training
    assert torch.equal(m[1].running_mean, before)
    assert torch.equal(cap.graph_module.get_submodule("1").running_mean, before)


def test_modules_marked_as_recopt_leaves_stay_one_node():
    class Fused(nn.Module):
        __recopt_leaf__ = True

        def forward(self, x):
            return torch.relu(x) * 2

    m = nn.Sequential(nn.Linear(4, 4), Fused())
    cap = recopt.capture(m, (torch.randn(2, 4),))
    kinds = [(n.op, n.target) for n in cap.graph_module.graph.nodes if n.op == "call_module"]
    assert ("call_module", "1") in kinds
