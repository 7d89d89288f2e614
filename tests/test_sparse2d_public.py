"""The sparse2d pass on embedding code as public recsys code writes it, at batches the example did not
show: empty batches, lookups whose batch sizes differ at run time, bad offsets, sparse=True, training
with the row-wise AdaGrad. Each test reproduces a bug found here."""
import copy

import pytest
import torch
import torch.nn as nn

import recopt

pytest.importorskip("torchrec")

from recopt.optim import MomentumScaledRowWiseAdagrad  # noqa: E402


class TwoBags(nn.Module):
    def __init__(self, mode="sum", last=False, sparse=False):
        super().__init__()
        self.u = nn.EmbeddingBag(50, 8, mode=mode, include_last_offset=last, sparse=sparse)
        self.i = nn.EmbeddingBag(40, 8, mode=mode, include_last_offset=last, sparse=sparse)
        self.out = nn.Linear(16, 1)

    def forward(self, uid, uoff, iid, ioff):
        return self.out(torch.cat([self.u(uid, uoff), self.i(iid, ioff)], 1))


def _bags(b, g, hi=40, last=False):
    lens = torch.randint(0, 4, (b,), generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return torch.randint(0, hi, (int(lens.sum()),), generator=g), (off if last else off[:-1])


def _batch(b, g, last=False, b_item=None):
    return _bags(b, g, last=last) + _bags(b if b_item is None else b_item, g, last=last)


def _opt(m, ex):
    opt = recopt.optimize(m, ex, target="cpu", passes=["sparse2d"], backend="eager")
    assert [s.status.value for s in opt.report.sites_for("sparse2d")] == ["rewritten", "rewritten"]
    return opt


@pytest.mark.parametrize("mode,last", [("sum", False), ("mean", False), ("sum", True)])
def test_empty_and_unseen_batches_are_exact(mode, last):
    # Bug: an empty batch made a stride-0 KeyedJaggedTensor, which TorchRec's to_dict cannot split
    # (IndexError) while nn.EmbeddingBag returns [0, D]; with include_last_offset the verifier's batch-1
    # input is such an empty batch, so every include_last_offset table was rolled back.
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = TwoBags(mode, last).eval()
    opt = _opt(m, _batch(8, g, last))
    for b in (0, 1, 7):
        x = _batch(b, g, last)
        assert torch.equal(opt(*x), m(*x))


def test_grouped_lookups_with_different_batch_sizes_raise_not_mix_bags():
    # Bug: two tables gathered into one collection because the example gave both 8 bags; at run time
    # the user side had 5 bags and the item side 3, the one KJT's stride (4) split the lengths at the
    # wrong place and both outputs were silently wrong (eager: 5 and 3 correct rows).
    class Towers(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.EmbeddingBag(50, 8, mode="sum")
            self.i = nn.EmbeddingBag(40, 8, mode="sum")

        def forward(self, uid, uoff, iid, ioff):
            return self.u(uid, uoff).sum(0) + self.i(iid, ioff).sum(0)

    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    m = Towers().eval()
    opt = _opt(m, _batch(8, g))
    x = _batch(5, g, b_item=3)
    m(*x)  # eager accepts it
    with pytest.raises(ValueError, match=r"'u' \(5 bags\), 'i' \(3 bags\).*same batch size"):
        opt(*x)


@pytest.mark.parametrize("offsets,match", [([1], "offsets\\[0\\] has to be 0"),
                                           ([0, 2, 1], "must not decrease"),
                                           ([0, 5], "can not be greater")])
def test_offsets_eager_refuses_are_refused(offsets, match):
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    m = TwoBags().eval()
    opt = _opt(m, _batch(8, g))
    uoff = torch.tensor(offsets)
    x = (torch.tensor([1, 2, 3]), uoff, torch.arange(len(offsets)), torch.arange(len(offsets)))
    # torch checks these offsets inside a parallel loop: on one thread the decreasing ones pass unseen
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        with pytest.raises(RuntimeError):
            m(*x)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match=match):
        opt(*x)


def test_out_of_range_and_negative_ids_raise_like_eager():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    m = TwoBags().eval()
    opt = _opt(m, _batch(8, g))
    for bad in (-1, 50):
        x = (torch.tensor([1, bad]), torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
        with pytest.raises((RuntimeError, IndexError)):
            m(*x)
        with pytest.raises((RuntimeError, IndexError)):
            opt(*x)


def test_sparse_true_is_rejected_with_a_reason():
    # Bugs: optimize crashed in the gradient check on sparse gradients (NotImplementedError from
    # aten::ne on SparseCPU); once past it, the rewrite turned sparse weight gradients into dense ones.
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    m = TwoBags(sparse=True)
    opt = recopt.optimize(m, _batch(8, g), target="cpu", passes=["sparse2d"], backend="eager")
    assert {s.reason_code for s in opt.report.sites_for("sparse2d")} == {"sparse_gradients"}
    opt.train()
    opt(*_batch(4, g)).sum().backward()
    assert m.u.weight.grad.is_sparse


def test_training_with_rowwise_adagrad_matches_the_plain_model_at_unseen_batches():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    m = TwoBags("mean")
    ref = copy.deepcopy(m)
    opt = _opt(m, _batch(8, g))
    opt.train()
    ref.train()
    o1 = MomentumScaledRowWiseAdagrad(opt.parameters(), lr=0.1, replicas=2)
    o2 = MomentumScaledRowWiseAdagrad(ref.parameters(), lr=0.1, replicas=2)
    for b in (3, 1, 0, 11):
        x = _batch(b, g)
        for model, o in ((opt, o1), (ref, o2)):
            o.zero_grad()
            model(*x).pow(2).sum().backward()
            o.step()
    assert torch.equal(m.out.weight, ref.out.weight)
    new = dict(opt.named_parameters())
    w_u = next(v for k, v in new.items() if k.endswith("embedding_bags.u.weight"))
    assert torch.equal(w_u, ref.u.weight)


def test_weight_tied_by_assignment_to_an_output_layer_is_rejected():
    # Bug: `out.weight = emb.weight` (tied input/output embeddings) was rewritten: the tie is a
    # call_module use, which the get_attr scan missed, so the documented shared_weight rejection
    # never fired and shard_2d would have split the tied pair.
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            self.out = nn.Linear(8, 30)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x).mean(1))

    torch.manual_seed(0)
    opt = recopt.optimize(Tied(), (torch.randint(0, 30, (4, 3)),), target="cpu", passes=["sparse2d"],
                          backend="eager")
    assert [s.reason_code for s in opt.report.sites_for("sparse2d")] == ["shared_weight"]
