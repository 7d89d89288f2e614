"""recopt on models written by others: TorchRec's own DLRM and nn.TransformerEncoder."""
import pytest
import torch
import torch.nn as nn

import recopt


def _torchrec_dlrm():
    pytest.importorskip("torchrec")
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f"f{i}"])
              for i in range(3)]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[16, 8],
                 over_arch_layer_sizes=[16, 1]).eval()
    lengths = torch.tensor([1, 2, 0, 1, 1, 3, 2, 1, 1, 0, 2, 1])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f0", "f1", "f2"], lengths=lengths,
                                              values=torch.randint(0, 50, (int(lengths.sum()),)))
    return model, (torch.randn(4, 4), kjt)


def test_torchrec_dlrm_is_traced_through_its_archs_with_the_collection_as_a_leaf():
    model, inputs = _torchrec_dlrm()
    opt = recopt.optimize(model, inputs, target="cpu", passes=["default", "sparse2d"])
    assert opt.report.capture_method == "symbolic_trace"
    torch.testing.assert_close(opt(*inputs), model(*inputs))
    modules = [n.target for n in opt.graph_module.graph.nodes if n.op == "call_module"]
    assert "sparse_arch.embedding_bag_collection" in modules
    assert any(m.endswith("_linear") for m in modules), "the MLP layers must be visible to passes"
    site = opt.report.sites_for("sparse2d")[0]
    assert site.reason_code == "already_collection" and len(site.details["tables"]) == 3


def test_transformer_encoder_softmax_attention_keeps_outputs_and_gradients():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 7, 16)
    opt = recopt.optimize(model, (x,), target="cpu", strict=True)
    torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
