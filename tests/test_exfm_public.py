"""The aux_head pass on public-style students (DeepCTR-like DNN with BatchNorm/Dropout, a [B, T] sequence
student with a two-layer head), through both captures, in train and eval, at batches the example did not
show: the serving output stays bit-identical and the distillation heads keep the batch."""
import pytest
import torch
import torch.nn as nn

import recopt
from recopt.passes.exfm import apply_aux_head, strip_distill_heads


class DNNStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(50, 8, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(24, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(16, 1)

    def forward(self, dense, ids):
        return self.head(self.mlp(torch.cat([dense, self.emb(ids)], 1))).squeeze(-1)


class SeqStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(40, 16)
        self.enc = nn.Linear(16, 16)
        self.h1, self.h2, self.dp = nn.Linear(16, 16), nn.Linear(16, 1), nn.Dropout(0.3)

    def forward(self, seq):
        x = torch.relu(self.enc(self.e(seq))).mean(1)
        return self.h2(self.dp(torch.relu(self.h1(x)))).reshape(seq.shape[0])


def _dnn(b, g):
    return torch.randn(b, 16, generator=g), torch.randint(0, 50, (b, 3), generator=g)


def _seq(b, g, t=5):
    return (torch.randint(0, 40, (b, t), generator=g),)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dnn_student_serving_output_identical_at_unseen_batches(mode):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = DNNStudent().train(mode == "train")
    gm, site = apply_aux_head(m, _dnn(8, g), {"head_layers": 2})
    gm.train(mode == "train")
    for b in (2, 7, 33):  # batch 1 has no batch statistics in train mode (eager refuses it too)
        x = _dnn(b, g)
        torch.manual_seed(3)
        ref = m(*x)
        torch.manual_seed(3)
        serving, distill = gm(*x)
        assert torch.equal(serving, ref) and distill.shape == ref.shape and torch.isfinite(distill).all()
    served = strip_distill_heads(gm).train(mode == "train")
    x = _dnn(5, g)
    torch.manual_seed(3)
    ref = m(*x)
    torch.manual_seed(3)
    assert torch.equal(served(*x), ref)


@pytest.mark.parametrize("method,mode", [("symbolic_trace", "eval"), ("symbolic_trace", "train"),
                                         ("dynamo", "train")])
def test_sequence_student_through_optimize_at_unseen_batches_and_lengths(method, mode):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    m = SeqStudent().train(mode == "train")
    opt = recopt.optimize(m, _seq(8, g), target="cpu", passes=["aux_head"], backend="eager", capture_method=method,
                          configs={"aux_head": {"head_layers": 2}})
    assert [s.status.value for s in opt.report.sites_for("aux_head")] == ["rewritten"]
    for b, t in ((1, 5), (7, 9), (0, 5)):
        x = _seq(b, g, t)
        torch.manual_seed(3)
        ref = m(*x)
        torch.manual_seed(3)
        serving, distill = opt(*x)
        assert torch.equal(serving, ref) and distill.shape == (b,)
