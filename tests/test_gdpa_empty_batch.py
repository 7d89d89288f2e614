"""An empty batch through the GDPA op when K/V are shared by the batch (a weight as keys: the
reassociated PFFN of InterFormer). torch broadcasts a size-1 batch to 0; the op must too."""
import pytest
import torch

from recopt.ops import gdpa


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("activation", ["raw", "gelu", "softmax"])
def test_keys_shared_by_the_batch_broadcast_to_any_batch_size_including_0(batch, activation):
    torch.manual_seed(0)
    q = torch.randn(batch, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 7, 8, requires_grad=True)      # shared by the batch
    v = torch.randn(batch, 2, 7, 4, requires_grad=True) if batch != 1 else torch.randn(1, 2, 7, 4,
                                                                                        requires_grad=True)
    out = gdpa(q, k, v, activation=activation, pre_scale=0.3)
    s = (q @ k.transpose(-2, -1)) * 0.3
    p = torch.softmax(s, -1) if activation == "softmax" else (
        torch.nn.functional.gelu(s) if activation == "gelu" else s)
    want = p @ v
    assert out.shape == want.shape == (batch, 2, 5, 4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
