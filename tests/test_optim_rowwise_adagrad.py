"""MomentumScaledRowWiseAdagrad: hand-computed updates and the FBGEMM lr·√G mapping."""
import math

import pytest
import torch

from recopt.optim import MomentumScaledRowWiseAdagrad, fbgemm_rowwise_adagrad_params


def _hand_step(w, g, v, lr, eps, c, wd=0.0):
    """One row-wise AdaGrad step written out per row with Python floats."""
    w, v = [list(r) for r in w], list(v)
    for i, row in enumerate(g):
        if all(x == 0.0 for x in row):
            continue
        gt = [x + wd * w[i][d] for d, x in enumerate(row)]
        v[i] += sum(x * x for x in gt) / len(gt)
        mult = lr / (math.sqrt(v[i] / c) + eps)
        w[i] = [w[i][d] - mult * gt[d] for d in range(len(gt))]
    return w, v


@pytest.mark.parametrize("replicas,wd", [(1, 0.0), (4, 0.0), (2, 0.05)])
def test_matches_hand_computed_update_over_two_steps(replicas, wd):
    w0 = torch.randn(5, 3)
    p = torch.nn.Parameter(w0.clone())
    opt = MomentumScaledRowWiseAdagrad([p], lr=0.3, eps=1e-2, replicas=replicas, weight_decay=wd)
    w_ref, v_ref = w0.tolist(), [0.0] * 5
    for touched in ([0, 2, 4], [2, 3]):
        g = torch.zeros(5, 3)
        g[touched] = torch.randn(len(touched), 3)
        p.grad = g.clone()
        opt.step()
        w_ref, v_ref = _hand_step(w_ref, g.tolist(), v_ref, 0.3, 1e-2, replicas, wd)
        torch.testing.assert_close(p.detach(), torch.tensor(w_ref), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["sum"], torch.tensor(v_ref), rtol=1e-5, atol=1e-7)
    # row 1 was never touched: weight and accumulator unchanged
    assert torch.equal(p.detach()[1], w0[1]) and opt.state[p]["sum"][1] == 0


def test_momentum_scale_is_lr_times_sqrt_replicas_when_eps_scales_too():
    g = torch.randn(4, 6)
    a = torch.nn.Parameter(torch.randn(4, 6))
    b = torch.nn.Parameter(a.detach().clone())
    oa = MomentumScaledRowWiseAdagrad([a], lr=0.1, eps=1e-3, replicas=9)
    ob = MomentumScaledRowWiseAdagrad([b], lr=0.1 * 3, eps=1e-3 * 3, replicas=1)
    for _ in range(3):
        a.grad, b.grad = g.clone(), g.clone()
        oa.step(), ob.step()
        g = torch.randn(4, 6)
    torch.testing.assert_close(a, b)


def test_sparse_gradient_equals_dense_gradient():
    w0 = torch.randn(8, 4)
    ids = torch.tensor([1, 5, 5, 7, 1, 2])
    offsets = torch.tensor([0, 3])
    dense_emb = torch.nn.EmbeddingBag(8, 4, mode="sum")
    sparse_emb = torch.nn.EmbeddingBag(8, 4, mode="sum", sparse=True)
    with torch.no_grad():
        dense_emb.weight.copy_(w0), sparse_emb.weight.copy_(w0)
    od = MomentumScaledRowWiseAdagrad(dense_emb.parameters(), lr=0.2, replicas=2)
    os_ = MomentumScaledRowWiseAdagrad(sparse_emb.parameters(), lr=0.2, replicas=2)
    up = torch.randn(2, 4)
    (dense_emb(ids, offsets) * up).sum().backward()
    (sparse_emb(ids, offsets) * up).sum().backward()
    assert sparse_emb.weight.grad.is_sparse
    od.step(), os_.step()
    torch.testing.assert_close(dense_emb.weight, sparse_emb.weight)
    torch.testing.assert_close(od.state[dense_emb.weight]["sum"], os_.state[sparse_emb.weight]["sum"])


def test_one_dim_and_scalar_parameters_are_elementwise():
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    s = torch.nn.Parameter(torch.tensor(3.0))
    opt = MomentumScaledRowWiseAdagrad([b, s], lr=0.5, eps=1e-8)
    b.grad, s.grad = torch.tensor([0.2, 0.0, -4.0]), torch.tensor(-1.5)
    opt.step()
    # first AdaGrad step with v = g²: w - lr·sign(g) (eps negligible)
    torch.testing.assert_close(b.detach(), torch.tensor([0.5, -2.0, 1.0]))
    torch.testing.assert_close(s.detach(), torch.tensor(3.5))


@pytest.mark.parametrize("bad", [dict(lr=0), dict(eps=0), dict(replicas=0), dict(replicas=1.5),
                                 dict(weight_decay=-1)])
def test_bad_hyperparameters_are_rejected(bad):
    kw = dict(lr=0.1, eps=1e-8, replicas=1, weight_decay=0.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        MomentumScaledRowWiseAdagrad([torch.nn.Parameter(torch.ones(2, 2))], **kw)


def test_fused_fbgemm_rowwise_adagrad_matches_with_lr_sqrt_replicas():
    pytest.importorskip("fbgemm_gpu")
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)

    rows, dim, replicas = 12, 4, 4
    fused = fbgemm_rowwise_adagrad_params(0.1, 1e-3, replicas)
    assert fused["learning_rate"] == pytest.approx(0.2) and fused["eps"] == pytest.approx(2e-3)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=fused["optimizer"],
        learning_rate=fused["learning_rate"], eps=fused["eps"], pooling_mode=PoolingMode.SUM)
    ref = torch.nn.Parameter(tbe.split_embedding_weights()[0].detach().clone())
    opt = MomentumScaledRowWiseAdagrad([ref], lr=0.1, eps=1e-3, replicas=replicas)
    for _ in range(3):
        ids = torch.randint(0, rows, (9,))  # duplicates included: "exact" coalesces them
        offsets = torch.tensor([0, 2, 6, 9])
        up = torch.randn(3, dim)
        tbe(ids, offsets).backward(up)
        opt.zero_grad()
        torch.nn.functional.embedding_bag(ids, ref, offsets[:-1], mode="sum").backward(up)
        opt.step()
        torch.testing.assert_close(tbe.split_embedding_weights()[0], ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tbe.get_optimizer_state()[0]["sum"], opt.state[ref]["sum"], rtol=1e-5, atol=1e-6)
