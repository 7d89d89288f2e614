"""Train and eval modes, and checkpoints (issue 13, items 3 and 7).

The optimized model follows ``.train()``/``.eval()`` exactly like the model:
dropout (also inside MHA/TransformerEncoderLayer) and BatchNorm batch
statistics in train mode, for symbolic-trace and Dynamo captures alike.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import recopt


def _seeded(fn, seed, *args):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.lin(x), p=0.5, training=self.training)


class DropoutBN(nn.Module):
    """nn.Dropout + BatchNorm, symbolically traceable."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.drop(self.bn(self.lin(x)).relu()))


class DynamoBN(DropoutBN):
    """The same, with a Python branch on a size that symbolic tracing cannot follow."""

    def forward(self, x):
        B, D = x.shape
        h = self.bn(self.lin(x)).relu()
        if B > 1:
            h = self.drop(h)
        return self.out(h)


class MHADropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        a, _ = self.mha(x, x, x)
        return self.out(self.enc(a).mean(1))


def _inputs(cls):
    g = torch.Generator().manual_seed(7)
    if cls is MHADropout:
        return (torch.randn(3, 5, 16, generator=g),)
    return (torch.randn(6, 8, generator=g),)


CLASSES = [FunctionalDropout, DropoutBN, DynamoBN, MHADropout]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("start", ["train", "eval"])
def test_optimized_model_follows_train_and_eval(cls, start):
    torch.manual_seed(0)
    model = cls().train(start == "train")
    args = _inputs(cls)
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    assert opt.training == (start == "train"), "the optimized model starts in the model's mode"
    assert set(opt.report.modes) == {"train", "eval"}
    ref = cls()
    ref.load_state_dict(model.state_dict())
    for mode in ("train", "eval", "train"):
        opt.train(mode == "train")
        ref.train(mode == "train")
        got = _seeded(opt, 3, *args)
        want = _seeded(ref, 3, *args)
        torch.testing.assert_close(got, want, msg=f"{mode} mode differs")
        # Buffers (BatchNorm running stats) move the same way.
        for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(b, a, msg=f"buffer {k} after a {mode} call")
    if cls is not DynamoBN:
        # Dropout is live in train mode: two seeds, two outputs.
        opt.train()
        assert not torch.equal(_seeded(opt, 1, *args), _seeded(opt, 2, *args))


def test_dynamo_captured_batchnorm_uses_batch_statistics_in_train_mode():
    torch.manual_seed(0)
    model = DynamoBN().eval()
    args = _inputs(DynamoBN)
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    assert opt.report.capture_method == "dynamo"
    opt.train()
    mean0 = model.bn.running_mean.clone()
    opt(*args)
    assert not torch.equal(model.bn.running_mean, mean0), "train mode must update the running statistics"


@pytest.mark.parametrize("cls", [DropoutBN, DynamoBN, MHADropout], ids=lambda c: c.__name__)
def test_training_the_optimized_model_matches_training_the_model(cls):
    torch.manual_seed(0)
    model = cls().train()
    twin = cls()
    twin.load_state_dict(model.state_dict())
    twin.train()
    args = _inputs(cls)
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    opt_sgd = torch.optim.SGD(opt.parameters(), lr=0.1)
    twin_sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    for step in range(3):
        for m, o in ((opt, opt_sgd), (twin, twin_sgd)):
            o.zero_grad()
            loss = _seeded(m, 100 + step, *args).pow(2).sum()
            loss.backward()
        for (k, p), q in zip(twin.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=f"grad of {k} at step {step}")
        opt_sgd.step()
        twin_sgd.step()
    for (k, a), b in zip(twin.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, msg=f"{k} after training")
    # And eval after a train-mode optimize matches the model in eval.
    opt.eval()
    twin.eval()
    torch.testing.assert_close(opt(*args), twin(*args))


@pytest.mark.parametrize("cls", [DropoutBN, DynamoBN], ids=lambda c: c.__name__)
def test_state_dict_keys_equal_the_models_and_load_both_ways(cls):
    torch.manual_seed(0)
    model = cls().eval()
    args = _inputs(cls)
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    sd = opt.state_dict()
    assert list(sd) == list(model.state_dict())
    other = cls().eval()
    # optimized → model
    other.load_state_dict(opt.state_dict())
    torch.testing.assert_close(other(*args), opt(*args))
    # model → optimized
    fresh = cls().eval()
    opt.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(opt(*args), fresh(*args))
    assert torch.equal(model.lin.weight, fresh.lin.weight)


def test_train_graph_keeps_the_attention_dropout_stream():
    """In the train graph attention dropout is live: each MHA keeps the module's random stream.

    ``self.mha`` (weights asked for: softmax -> F.dropout -> bmm) is fused with GDPA's
    dropout, which draws as F.dropout on the same probabilities; the encoder's
    self-attention (need_weights=False: dropout inside SDPA) stays SDPA."""
    torch.manual_seed(0)
    model = MHADropout().train()
    args = _inputs(MHADropout)
    opt = recopt.optimize(model, args, target="cpu", backend="eager",
                          configs={"gdpa": {"cpu_sites": "all"},  # cpu: fuse anyway, to test it
                                   "decompose_attention": {"cpu_sites": "all"}})
    assert len(opt.report.sites_for("gdpa", "rewritten")) == 2, "eval graph: both MHAs fused"
    assert opt.train_report is not None
    # two MHAs: self.mha, and the encoder layer's self_attn (opened by decompose_attention)
    assert len(opt.train_report.sites_for("decompose_attention", "rewritten")) == 3
    assert len(opt.train_report.sites_for("gdpa", "rewritten")) == 1
    assert [s.reason_code for s in opt.train_report.sites_for("gdpa", "rejected")] == ["sdpa_dropout"]
    assert "separate graphs" in opt.report.modes_note
    model.train(), opt.train()
    torch.manual_seed(11)
    want = model(*args)
    torch.manual_seed(11)
    got = opt(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(opt(*args), got), "dropout is live in train mode"


def test_model_without_mode_dependent_layers_gets_one_graph():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = recopt.optimize(model, (torch.randn(3, 4),), target="cpu", backend="eager")
    assert opt.graph_for(True) is opt.graph_for(False)
    assert opt.train_report is None and "one graph" in opt.report.modes_note


class BNOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(x)


def test_train_mode_that_cannot_be_captured_runs_the_model_eagerly_and_says_so():
    """BatchNorm cannot run in train mode on a batch of 1: eval is optimized, train runs eagerly, named."""
    model = BNOnly().eval()
    opt = recopt.optimize(model, (torch.randn(1, 4),), target="cpu", backend="eager")
    assert opt.report.modes == ["eval"] and "eagerly" in opt.report.modes_note
    opt.train()
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match="train mode was not captured"):
        got = opt(x)
    ref = BNOnly().train()
    torch.testing.assert_close(got, ref(x))


def test_export_takes_the_eval_graph_even_from_a_model_in_train_mode():
    from recopt.export.program import resolve_source

    torch.manual_seed(0)
    model = FunctionalDropout().train()
    args = _inputs(FunctionalDropout)
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    assert opt.training
    src = resolve_source(opt, args)
    assert src.module is opt.graph_for(False) and src.module is not opt.graph_for(True)
    src.module.eval()
    torch.testing.assert_close(_seeded(src.module, 1, *args), _seeded(src.module, 2, *args))


def _helper_dropout(module, x):
    return F.dropout(x, 0.5, module.training)


class HiddenModeDependence(nn.Module):
    """Reads the mode through a helper outside the class: the class scan cannot see it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return _helper_dropout(self, self.lin(x))


def test_a_mode_dependence_the_scan_misses_is_caught_by_the_train_mode_check():
    from recopt.modes import mode_dependent_modules

    model = HiddenModeDependence().eval()
    assert mode_dependent_modules(model) == []
    args = _inputs(FunctionalDropout)
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    assert opt.graph_for(True) is not opt.graph_for(False)
    opt.train()
    model.train()
    torch.testing.assert_close(_seeded(opt, 4, *args), _seeded(model, 4, *args))


def test_converting_the_optimized_model_keeps_one_set_of_tensors_for_both_graphs():
    """opt.double() (like .to/.cuda) converts the model's tensors and rebinds both graphs to them,
    so the statistics train mode updates are those eval mode reads."""
    torch.manual_seed(0)
    model = DropoutBN().eval()
    args = _inputs(DropoutBN)
    opt = recopt.optimize(model, args, target="cpu", backend="eager")
    assert opt.graph_for(True) is not opt.graph_for(False)
    opt.double()
    assert model.lin.weight.dtype == torch.float64
    x = args[0].double()
    opt.train()
    opt(x)
    ref = DropoutBN().double()
    ref.load_state_dict(model.state_dict())
    opt.eval()
    ref.eval()
    torch.testing.assert_close(opt(x), ref(x))
    for gm in (opt.graph_for(True), opt.graph_for(False)):
        shared = {id(t) for t in list(model.parameters()) + list(model.buffers())}
        assert {id(t) for t in list(gm.parameters()) + list(gm.buffers())} <= shared


def test_mode_scan_ignores_zero_probability_dropout_and_sees_the_rest():
    from recopt.modes import mode_dependent_modules

    assert mode_dependent_modules(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))) == []
    enc0 = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    assert mode_dependent_modules(enc0) == []
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    assert any("MultiheadAttention" in m for m in mode_dependent_modules(enc))
    assert mode_dependent_modules(nn.Sequential(nn.BatchNorm1d(3))) == ["0 (BatchNorm1d)"]
    assert mode_dependent_modules(FunctionalDropout()) == ["(root) (FunctionalDropout)"]
