"""The sparse2d pass: plain embedding tables → TorchRec collections (exact, single process)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import recopt

pytest.importorskip("torchrec")

from recopt.passes.sparse2d import (load_state_dict_from_before_sparse2d, remap_state_dict,  # noqa: E402
                                    state_dict_mapping)


def _ids(n, hi, seed):
    return torch.randint(0, hi, (n,), generator=torch.Generator().manual_seed(seed))


class Bags(nn.Module):
    """Bag forms: 1-D ids + offsets (sum, with an empty bag), 2-D ids (mean), include_last_offset,
    one table looked up twice (shared), per-sample weights, and nn.Embedding over a [B, T] history."""

    def __init__(self):
        super().__init__()
        self.user = nn.EmbeddingBag(30, 4, mode="sum")
        self.item = nn.EmbeddingBag(40, 4, mode="mean")
        self.tags = nn.EmbeddingBag(20, 4, mode="sum", include_last_offset=True)
        self.weighted = nn.EmbeddingBag(25, 4, mode="sum")
        self.hist = nn.Embedding(40, 4)
        self.head = nn.Linear(4 * 6 + 4, 1)

    def forward(self, user_ids, user_offsets, item_ids, tag_ids, tag_offsets, w_ids, w_offsets, w, hist):
        u = self.user(user_ids, user_offsets)
        i = self.item(item_ids)                        # [B, L] ids: B bags of L
        i2 = self.item(item_ids.flip(1) % 7)           # the same table looked up again
        t = self.tags(tag_ids, tag_offsets)
        ww = self.weighted(w_ids, w_offsets, per_sample_weights=w)
        h = self.hist(hist).mean(dim=1)                # [B, T, D] -> [B, D]
        x = torch.cat([u, i, i2, t, ww, h, u * i], dim=1)
        return self.head(x).squeeze(-1)

    @staticmethod
    def inputs(B=5):
        user_ids = _ids(11, 30, 1)
        user_offsets = torch.tensor([0, 2, 2, 6, 9])   # bag 1 is empty
        item_ids = _ids(B * 3, 40, 2).view(B, 3)
        tag_ids = _ids(8, 20, 3)
        tag_offsets = torch.tensor([0, 1, 3, 3, 5, 8])
        w_ids = _ids(7, 25, 4)
        w_offsets = torch.tensor([0, 1, 2, 4, 6])
        w = torch.rand(7) + 0.5
        hist = _ids(B * 6, 40, 5).view(B, 6)
        return user_ids, user_offsets, item_ids, tag_ids, tag_offsets, w_ids, w_offsets, w, hist


def _optimize(model, inputs, **kw):
    return recopt.optimize(model, inputs, target="cpu", passes=["sparse2d"], backend="eager", strict=True, **kw)


def _sites(opt):
    return {s.module_path or s.node: s for s in opt.report.sites if s.pass_name == "sparse2d"}


def test_every_bag_form_is_rewritten_and_outputs_are_identical():
    model, x = Bags(), Bags.inputs()
    opt = _optimize(model, x)
    sites = opt.report.sites
    assert len(sites) == 6 and all(s.status == "rewritten" for s in sites), [(s.node, s.reason) for s in sites]
    gm = opt.graph_module
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
    colls = {n: type(m) for n, m in gm.named_children() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))}
    assert colls == {"sparse_ebc": EmbeddingBagCollection, "sparse_ebc_weighted": EmbeddingBagCollection,
                     "sparse_ebc_seq": EmbeddingCollection}
    assert gm.sparse_ebc_weighted.is_weighted()
    # the shared table is one table with two features
    shared = [c for c in gm.sparse_ebc.embedding_bag_configs() if c.name == "item"][0]
    assert shared.feature_names == ["item", "item__1"]
    # no plain tables remain and no weight is duplicated
    assert not any(isinstance(m, (nn.EmbeddingBag, nn.Embedding)) and n.count(".") == 0 for n, m in gm.named_children())
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(opt(*x), model(*x), rtol=0, atol=0)
    # a different batch (other sizes, other ids) also matches: the graph is shape-generic
    x2 = list(Bags.inputs(B=5))
    x2[0] = _ids(3, 30, 9)
    x2[1] = torch.tensor([0, 0, 1, 2, 3])
    torch.testing.assert_close(opt(*x2), model(*x2), rtol=0, atol=0)


def test_gradients_match_the_plain_model_under_the_key_mapping():
    model, x = Bags(), Bags.inputs()
    opt = _optimize(model, x)
    opt(*x).sum().backward()
    model(*x).sum().backward()
    new_params = dict(opt.graph_module.named_parameters())
    mapping = state_dict_mapping(opt)
    for name, p in model.named_parameters():
        torch.testing.assert_close(new_params[mapping.get(name, name)].grad, p.grad, rtol=0, atol=0, msg=name)


def test_table_report_has_rows_dim_pooling_bytes_and_inputs():
    opt = _optimize(Bags(), Bags.inputs())
    by_table = {s.details["table"]: s.details for s in opt.report.sites}
    d = by_table["user"]
    assert (d["rows"], d["dim"], d["pooling"], d["bytes"]) == (30, 4, "sum", 30 * 4 * 4)
    assert d["inputs"] == ["user_ids", "user_offsets"]
    assert by_table["weighted"]["weighted"] and by_table["weighted"]["inputs"] == ["w_ids", "w_offsets", "w"]
    assert by_table["hist"]["pooling"] == "none (sequence)"


def test_old_checkpoint_loads_through_the_state_dict_mapping():
    model, x = Bags(), Bags.inputs()
    old_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _optimize(model, x)
    mapping = state_dict_mapping(opt)
    assert mapping["user.weight"] == "sparse_ebc.embedding_bags.user.weight"
    assert mapping["hist.weight"] == "sparse_ebc_seq.embeddings.hist.weight"
    with torch.no_grad():
        for p in opt.graph_module.parameters():
            p.mul_(0)
    load_state_dict_from_before_sparse2d(opt, old_sd)
    fresh = Bags()
    fresh.load_state_dict(old_sd)
    torch.testing.assert_close(opt(*x), fresh(*x), rtol=0, atol=0)
    renamed = remap_state_dict(old_sd, mapping)
    assert set(renamed) == set(opt.graph_module.state_dict())


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.maxbag = nn.EmbeddingBag(10, 4, mode="max")
        self.padded = nn.EmbeddingBag(10, 4, mode="sum", padding_idx=0)
        self.mean_weighted = nn.Embedding(10, 4, max_norm=1.0)
        self.ok = nn.EmbeddingBag(10, 4, mode="sum")
        self.tied = nn.EmbeddingBag(10, 4, mode="sum")

    def forward(self, ids, offsets):
        a = self.maxbag(ids, offsets)
        b = self.padded(ids, offsets)
        c = self.mean_weighted(ids[:5]).sum(0, keepdim=True).expand(a.shape[0], 4)
        d = self.ok(ids, offsets)
        e = self.tied(ids, offsets) @ self.tied.weight.t()        # weight tied to an output layer
        return torch.cat([a, b, c, d, e], dim=1)


def test_unsupported_options_are_rejected_with_reasons():
    ids, offsets = _ids(12, 10, 7), torch.tensor([0, 3, 7, 7])
    model = Unsupported()
    opt = _optimize(model, (ids, offsets))
    codes = {s.details["table"]: (s.status, s.reason_code) for s in opt.report.sites}
    assert codes == {"maxbag": ("rejected", "max_pooling"), "padded": ("rejected", "padding_idx"),
                     "mean_weighted": ("rejected", "max_norm"), "ok": ("rewritten", ""),
                     "tied": ("rejected", "shared_weight")}
    for s in opt.report.sites:
        if s.status == "rejected":
            assert len(s.reason) > 20
    torch.testing.assert_close(opt(ids, offsets), model(ids, offsets), rtol=0, atol=0)


class Chained(nn.Module):
    """The second table's ids depend on the first table's output: one call cannot serve both."""

    def __init__(self):
        super().__init__()
        self.first = nn.EmbeddingBag(10, 3, mode="sum")
        self.second = nn.EmbeddingBag(10, 3, mode="sum")
        self.third = nn.EmbeddingBag(10, 3, mode="mean")

    def forward(self, ids, offsets):
        a = self.first(ids, offsets)
        c = self.third(ids, offsets)
        derived = (a.sum(1).abs() * 100).long() % 10                # one id per bag, from a's values
        b = self.second(derived, torch.arange(a.shape[0]))
        return a + b + c


def test_lookup_whose_ids_depend_on_another_lookup_stays_plain():
    ids, offsets = _ids(9, 10, 8), torch.tensor([0, 2, 5])
    model = Chained()
    opt = _optimize(model, (ids, offsets))
    codes = {s.details["table"]: (s.status, s.reason_code) for s in opt.report.sites}
    assert codes == {"first": ("rewritten", ""), "third": ("rewritten", ""),
                     "second": ("rejected", "offsets_dynamic")}
    torch.testing.assert_close(opt(ids, offsets), model(ids, offsets), rtol=0, atol=0)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 4))

    def forward(self, ids, offsets):
        return F.embedding_bag(ids, self.w, offsets, mode="sum") * 2


def test_functional_embedding_bag_with_get_attr_weight_is_rewritten():
    ids, offsets = _ids(7, 12, 9), torch.tensor([0, 3, 3])
    model = Functional()
    opt = _optimize(model, (ids, offsets))
    (site,) = opt.report.sites
    assert site.status == "rewritten", site.reason
    assert state_dict_mapping(opt) == {"w": "sparse_ebc.embedding_bags.w.weight"}
    assert [n for n, _ in opt.graph_module.named_parameters()] == ["sparse_ebc.embedding_bags.w.weight"]
    torch.testing.assert_close(opt(ids, offsets), model(ids, offsets), rtol=0, atol=0)


def test_torchrec_collection_in_the_model_is_reported_not_rewritten():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    class RecModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])])

        def forward(self, kjt: KeyedJaggedTensor):
            return self.ebc(kjt).values()

    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], _ids(5, 10, 1), torch.tensor([2, 3]))
    opt = _optimize(RecModel(), (kjt,))
    (site,) = opt.report.sites
    assert site.reason_code == "already_collection"
    assert site.details["tables"][0]["rows"] == 10


def test_dlrm_from_recopt_models_is_rewritten_exactly():
    dlrm = pytest.importorskip("recopt.models.dlrm")
    from recopt.data.batch import FeatureSpec, example_batch

    spec = FeatureSpec(n_dense=3, sparse_cardinalities=(10, 20, 7), seq_feature_tables=(1, 2), max_seq_len=5)
    model = dlrm.DLRM(spec)
    batch = example_batch(spec, 6)
    opt = _optimize(model, batch.inputs())
    assert len(opt.report.sites) == len(model.features)
    assert all(s.status == "rewritten" for s in opt.report.sites)
    torch.testing.assert_close(opt(*batch.inputs()), model(*batch.inputs()), rtol=0, atol=0)
    rec = recopt.optimize(dlrm.TorchRecDLRM.from_plain(model), batch.inputs(), target="cpu",
                          passes=["sparse2d"], backend="eager")
    assert [s.reason_code for s in rec.report.sites] == ["already_collection"]
