"""Reference models: shapes, jagged-sequence contract, tracing, and recopt capture/optimize."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.fx

from recopt.data.batch import FeatureSpec, example_batch
from recopt.models import (DLRM, DLRMConfig, EventTowerConfig, HSP, InterFormer, InterFormerConfig, Kunlun,
                           KunlunConfig, build_model, count_parameters, paper_config)
from recopt.models.kunlun import KunlunTransformerBlock, PersonalizedFFN

SPEC = FeatureSpec(n_dense=5, sparse_cardinalities=(50, 40, 6, 7), seq_feature_tables=(1, 2), max_seq_len=8,
                   event_names=("click", "view"), sparse_names=("user", "item", "cat", "bucket"))

TINY_KUNLUN = KunlunConfig(
    d_model=16, n_summary=2, n_experts=2, head_hidden=(16,), weightgen_hidden=16,
    towers=(EventTowerConfig(d_model=16, n_heads=2, n_summary=2, n_layers=2, window=2, pffn_rows_per_token=4),
            EventTowerConfig(d_model=8, n_heads=1, n_summary=1, n_layers=1, max_len=5, pffn_rows_per_token=2)))
TINY_INTERFORMER = InterFormerConfig(d_model=16, n_layers=2, n_heads=2, dcn_rank=4, masknet_hidden=16,
                                     head_hidden=(16,))
TINY_DLRM = DLRMConfig(embedding_dim=8, bottom_hidden=(16,), top_hidden=(16,))

BUILDERS = {
    "interformer": lambda: InterFormer(SPEC, TINY_INTERFORMER),
    "kunlun": lambda: Kunlun(SPEC, TINY_KUNLUN),
    "kunlun_pma_gelu_norote": lambda: Kunlun(SPEC, KunlunConfig(
        d_model=16, n_summary=2, summary="pma", attn_activation="gelu_tanh", use_rote=False, head_hidden=(16,),
        towers=(EventTowerConfig(d_model=16, n_summary=2, n_layers=1, window=1),
                EventTowerConfig(d_model=16, n_summary=2, n_layers=1)))),
    "interformer_dot": lambda: InterFormer(SPEC, InterFormerConfig(d_model=16, n_layers=1, interaction="dot",
                                                                   masknet_hidden=16, head_hidden=(16,))),
    "dlrm": lambda: DLRM(SPEC, TINY_DLRM),
    "dlrm_dot": lambda: DLRM(SPEC, DLRMConfig(embedding_dim=8, bottom_hidden=(16,), top_hidden=(16,),
                                              interaction="dot")),
}


def _batch(seed=0, B=6):
    return example_batch(SPEC, batch_size=B, seed=seed)


def _model(name):
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_backward_shapes_and_finite(name):
    model = _model(name).train()
    b = _batch()
    assert b.seq_lengths[0].tolist() == [0, 0] and b.seq_lengths[1].tolist() == [1, 1]  # edge cases present
    out = model(*b.inputs())
    assert out.shape == (6,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.nn.functional.binary_cross_entropy_with_logits(out, b.labels).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the item table is used by the candidate and by the history: it must receive a gradient
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_padding_values_do_not_matter(name):
    """Masks come from the lengths: rewriting every padded position leaves outputs unchanged."""
    model = _model(name)
    b = _batch()
    T = b.seq_ids.shape[2]
    pad = torch.arange(T)[None, None, :] >= b.seq_lengths[:, :, None]            # [B, E, T]
    g = torch.Generator().manual_seed(1)
    noisy_ids = b.seq_ids.clone()
    for c, t in enumerate(SPEC.seq_feature_tables):
        rnd = torch.randint(0, SPEC.sparse_cardinalities[t], pad.shape, generator=g)
        noisy_ids[..., c] = torch.where(pad, rnd, b.seq_ids[..., c])
    noisy_times = torch.where(pad, torch.rand(pad.shape, generator=g) * 1e7, b.seq_times)
    with torch.no_grad():
        ref = model(*b.inputs())
        out = model(b.dense, b.sparse_ids, noisy_ids, b.seq_lengths, noisy_times)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_history_is_used_and_samples_are_independent(name):
    """Changing one valid history item changes that example's output and no other."""
    model = _model(name)
    b = _batch()
    target = 2  # has full-length sequences
    ids = b.seq_ids.clone()
    ids[target, 0, 0, 0] = (ids[target, 0, 0, 0] + 7) % SPEC.sparse_cardinalities[1]
    with torch.no_grad():
        ref = model(*b.inputs())
        out = model(b.dense, b.sparse_ids, ids, b.seq_lengths, b.seq_times)
    changed = (out - ref).abs() > 1e-7
    assert changed[target]
    assert not changed[torch.arange(6) != target].any()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_symbolic_trace_matches_eager(name):
    model = _model(name)
    gm = torch.fx.symbolic_trace(model)
    b = _batch(seed=3, B=5)
    with torch.no_grad():
        torch.testing.assert_close(gm(*b.inputs()), model(*b.inputs()))
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["dense", "sparse_ids", "seq_ids", "seq_lengths", "seq_times"]


@pytest.mark.parametrize("name", ["interformer", "kunlun", "dlrm"])
def test_bf16_autocast_forward_stays_close(name):
    """The harness runs models under bf16 autocast on GPU; the CPU autocast path checks the
    models have no dtype assumptions that break under it (e.g. masks, einsum, embedding bags)."""
    model = _model(name)
    b = _batch(seed=4)
    with torch.no_grad():
        ref = model(*b.inputs())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*b.inputs())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def _targets(gm):
    return {str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes}


def test_kunlun_graph_shows_the_patterns_passes_look_for():
    gm = torch.fx.symbolic_trace(_model("kunlun"))
    t = _targets(gm)
    assert {"softmax", "gelu", "einsum", "matmul", "abs", "log1p"} <= t  # attention, PFFN, HSP, band, ROTE


def test_interformer_graph_has_materialized_pffn_and_softmax_attention():
    gm = torch.fx.symbolic_trace(_model("interformer"))
    t = _targets(gm)
    assert {"einsum", "bmm", "softmax", "matmul"} <= t


def test_pffn_is_the_literal_two_matmul_form():
    torch.manual_seed(0)
    ffn = PersonalizedFFN(d_e=8, d_ctx=6, rows_per_token=3, act="gelu_tanh")
    s, x_sum = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    w1 = ffn.w1_gen(x_sum).reshape(2, 12, 8)
    w2 = ffn.w2_gen(x_sum).reshape(2, 12, 8)
    ref = torch.nn.functional.gelu(ffn.norm(s) @ w1.transpose(-1, -2), approximate="tanh") @ w2
    torch.testing.assert_close(ffn(s, x_sum), ref)


def test_sliding_window_limits_the_receptive_field():
    torch.manual_seed(0)
    cfg = EventTowerConfig(d_model=8, n_heads=2, window=1, pffn_rows_per_token=2)
    block = KunlunTransformerBlock(cfg, d_ctx=8, max_len=10, kcfg=KunlunConfig()).eval()
    s, x_sum = torch.randn(1, 10, 8), torch.randn(1, 2, 8)
    keep = torch.ones(1, 10, dtype=torch.bool)
    rope = (torch.ones(1, 1, 10, 4), torch.zeros(1, 1, 10, 4))
    s2 = s.clone()
    s2[0, 6] += 1.0
    with torch.no_grad():
        diff = (block(s2, x_sum, keep, rope) - block(s, x_sum, keep, rope)).abs().sum(-1)[0]
    assert (diff[[5, 6, 7]] > 0).all()
    assert (diff[[0, 1, 2, 3, 4, 8, 9]] == 0).all()


def test_hsp_matches_sum_of_kronecker_terms():
    torch.manual_seed(0)
    hsp = HSP(d=8, n_heads=2, n_out=3, n_seeds=6, rank=2).eval()
    s, keep = torch.randn(2, 7, 8), torch.tensor([[True] * 7, [True] * 2 + [False] * 5])
    out = hsp(s, keep)
    q = hsp.norm(hsp.seeds).expand(2, -1, -1)
    h = hsp.attn(q, s, keep[:, None, None, :])
    ref = sum(hsp.Z[i].T @ h @ hsp.W[i] for i in range(2))
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kunlun_event_level_personalization_builds_distinct_towers():
    model = _model("kunlun")
    t0, t1 = model.towers
    assert t0.input_proj.out_features == 16 and t1.input_proj.out_features == 8
    assert len(t0.blocks) == 2 and len(t1.blocks) == 1
    assert model.tower_lens == (8, 5)


def test_kunlun_rejects_tower_count_mismatch():
    with pytest.raises(ValueError, match="one tower per event type"):
        Kunlun(SPEC, KunlunConfig(towers=(EventTowerConfig(),)))


def test_build_model_and_paper_configs():
    for name in ("interformer", "kunlun", "dlrm"):
        m = build_model(name, SPEC)
        assert count_parameters(m) > 0
        assert paper_config(name) is not None
    with pytest.raises(KeyError, match="choose one of"):
        build_model("nope", SPEC)


# ----------------------------------------------------------------------------- TorchRec flavour

def test_torchrec_dlrm_matches_plain_dlrm():
    pytest.importorskip("torchrec")
    from recopt.models import TorchRecDLRM

    plain = _model("dlrm")
    rec = TorchRecDLRM.from_plain(plain).eval()
    b = _batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(rec(*b.inputs()), plain(*b.inputs()), rtol=1e-5, atol=1e-5)
    names = [c.name for c in rec.ebc.embedding_bag_configs()]
    assert names == list(plain.tables.keys())
    gm = torch.fx.symbolic_trace(rec)
    with torch.no_grad():
        torch.testing.assert_close(gm(*b.inputs()), plain(*b.inputs()), rtol=1e-5, atol=1e-5)
    out = rec.train()(*b.inputs())
    out.sum().backward()
    assert rec.ebc.embedding_bags["item"].weight.grad is not None


# ----------------------------------------------------------------------------- recopt core API

def _recopt():
    return importlib.import_module("recopt")


CORE_MODELS = ["interformer", "kunlun", "dlrm"]


@pytest.mark.parametrize("name", CORE_MODELS)
def test_recopt_capture_traces_every_model(name):
    recopt = _recopt()
    if not hasattr(recopt, "capture"):
        pytest.skip("recopt.capture has not landed yet")
    model = _model(name)
    b = _batch()
    captured = recopt.capture(model, b.inputs())
    with torch.no_grad():
        torch.testing.assert_close(captured.graph_module(*b.inputs()), model(*b.inputs()))


@pytest.mark.parametrize("name", CORE_MODELS)
def test_recopt_optimize_default_passes_keep_outputs(name):
    recopt = _recopt()
    if not hasattr(recopt, "optimize"):
        pytest.skip("recopt.optimize has not landed yet")
    model = _model(name)
    b = _batch()
    with torch.no_grad():
        ref = model(*b.inputs())
    optimized = recopt.optimize(model, b.inputs(), target="cpu", backend="eager")
    assert hasattr(optimized, "report")
    with torch.no_grad():
        torch.testing.assert_close(optimized(*b.inputs()), ref, rtol=1e-4, atol=1e-4)
