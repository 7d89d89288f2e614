"""Verification tries the edges: reproducers of silent wrong answers (issue #13).

Each model below was optimized into something that computes another
function on inputs the example did not show; verification must now catch
the rewrite (roll it back, naming the case) or the rewrite must be exact.
Every test compares the optimized model with the original on the edge
input, so it fails whether the cause is the matcher or verification.
"""
import math

import pytest
import torch
import torch.nn as nn

import recopt
from recopt.edge_inputs import IDS, LENGTHS, MASK, OFFSETS, edge_input_sets, infer_input_kinds


def _same(opt, model, *args):
    from recopt.verify import compare_outputs

    with torch.no_grad():
        want, got = model(*args), opt(*args)
    m = compare_outputs(want, got)
    assert m is None, f"optimized model differs from the original: {m}\n{opt.report}"


class ColdStartAttention(nn.Module):
    """`masked_fill(mask == 0, -1e9)`: a user with no history attends uniformly."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, lengths):
        T = x.size(1)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(x.size(-1))
        scores = scores.masked_fill(mask[:, None, :] == 0, -1e9)
        return torch.softmax(scores, -1) @ self.v(x)


def test_cold_start_user_masked_fill_is_exact_or_rolled_back():
    torch.manual_seed(0)
    m = ColdStartAttention().eval()
    opt = recopt.optimize(m, (torch.randn(4, 8, 16), torch.tensor([8, 3, 5, 2])), target="cpu")
    _same(opt, m, torch.randn(2, 8, 16), torch.tensor([0, 3]))
    run = opt.report.pass_run("gdpa")
    if run.status == "rolled_back":
        assert "cold start" in run.message or "has a 0" in run.message


class PaddedMHA(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def test_mha_all_padded_row_keeps_nan_like_the_model():
    torch.manual_seed(0)
    m = PaddedMHA().eval()
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[1, 4:] = True
    opt = recopt.optimize(m, (torch.randn(4, 6, 16), pad), target="cpu")
    cold = torch.zeros(2, 6, dtype=torch.bool)
    cold[0] = True  # every key padded: the model returns NaN for that row
    _same(opt, m, torch.randn(2, 6, 16), cold)


class BandAttention(nn.Module):
    """Pointwise attention under a band |i - j| <= 4: at length 3 the band covers everything."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        T = x.size(1)
        i = torch.arange(T)
        band = (i[:, None] - i[None, :]).abs() <= 4
        return (torch.nn.functional.silu(q @ k.transpose(-2, -1)) * band) @ v


def test_band_width_from_a_length_3_example_holds_at_other_lengths():
    torch.manual_seed(0)
    m = BandAttention().eval()
    opt = recopt.optimize(m, (torch.randn(2, 3, 16),), target="cpu")
    _same(opt, m, torch.randn(2, 10, 16))


class CausalAttention(nn.Module):
    """Pointwise attention under a causal mask built from index comparisons."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        T = x.size(1)
        i = torch.arange(T)
        causal = i[:, None] >= i[None, :]
        return (torch.nn.functional.silu(q @ k.transpose(-2, -1)) * causal) @ v


def test_causal_mask_seen_at_length_1_stays_causal():
    torch.manual_seed(0)
    m = CausalAttention().eval()
    opt = recopt.optimize(m, (torch.randn(3, 1, 16),), target="cpu")
    _same(opt, m, torch.randn(3, 7, 16))


class GatedAttention(nn.Module):
    """A per-example gate of shape [B, 1, 1] after the activation."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.g = nn.Linear(d, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        gate = torch.sigmoid(self.g(x.mean(1)))[:, :, None]  # [B, 1, 1]
        return (torch.nn.functional.silu(q @ k.transpose(-2, -1)) * gate) @ v


def test_batch_gate_seen_at_batch_1_is_not_a_scalar():
    torch.manual_seed(0)
    m = GatedAttention().eval()
    opt = recopt.optimize(m, (torch.randn(1, 5, 16),), target="cpu")
    _same(opt, m, torch.randn(4, 5, 16))


# -- what the edge sets are ------------------------------------------------

class Rec(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.bag = nn.EmbeddingBag(30, 8, mode="sum")

    def forward(self, seq_ids, seq_lengths, mask, ids, offsets):
        T = seq_ids.size(1)
        valid = torch.arange(T)[None, :] < seq_lengths[:, None]
        x = self.emb(seq_ids) * (valid & mask)[..., None]
        return x.sum(1) + self.bag(ids, offsets)


def _rec_inputs(B=6, T=10):
    return (torch.randint(0, 50, (B, T)), torch.randint(1, T + 1, (B,)), torch.rand(B, T) > 0.3,
            torch.randint(0, 30, (3 * B,)), torch.arange(0, 3 * B, 3))


def test_input_kinds_are_inferred_from_the_example_and_tables():
    infos, batch, seq = infer_input_kinds(_rec_inputs(), torch.fx.symbolic_trace(Rec()),
                                          ["seq_ids", "seq_lengths", "mask", "ids", "offsets"])
    kinds = {i.name: i.kind for i in infos}
    assert batch == 6 and seq == [10]
    assert kinds == {"seq_ids": IDS, "seq_lengths": LENGTHS, "mask": MASK, "ids": IDS, "offsets": OFFSETS}
    assert infos[0].id_bound == (0, 50) and infos[3].id_bound == (0, 30)
    assert infos[0].dims == ["batch", 10] and infos[1].length_of == 10


def test_edge_sets_cover_the_cases_and_keep_ids_in_their_tables():
    args = _rec_inputs()
    gm = torch.fx.symbolic_trace(Rec())
    sets = edge_input_sets(args, gm, ["seq_ids", "seq_lengths", "mask", "ids", "offsets"])[0]
    names = [s.name for s in sets]
    assert names[:4] == ["batch 1", "batch 1 with every length 0 and every mask row all False (cold start)",
                         "batch 3", "sequence dim 10 of seq_ids, mask at 1"]
    by_name = {s.name: s.tries[0]() for s in sets}
    cold = by_name[names[1]]
    assert cold[1].tolist() == [0] and not cold[2].any()
    rows = by_name[names[-1]]
    assert "seq_lengths has a 0" in names[-1] and "mask has an all-False and an all-True row" in names[-1]
    assert rows[1].tolist()[:3] == [0, 10, 1] and not rows[2][0].any() and rows[2][1].all()
    short = by_name["sequence dim 10 of seq_ids, mask at 1"]
    assert short[0].shape[1] == 1 and int(short[1].max()) <= 1
    for a in by_name.values():
        assert 0 <= int(a[0].min()) and int(a[0].max()) < 50 and int(a[3].max()) < 30
        Rec()(*a)  # every set is one the model accepts


def test_report_states_the_sets_and_a_dim_the_model_hard_codes_is_kept_fixed():
    class HardCodedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).reshape(5, 12)  # batch 5 hard-coded

    opt = recopt.optimize(HardCodedBatch().eval(), (torch.randn(5, 3, 4),), target="cpu",
                          passes=["remove_identity"])
    rep = opt.report
    assert rep.verify_sets[0] == "the example inputs" and "batch 1" not in rep.verify_sets
    assert any("batch size kept fixed at 5" in n for n in rep.notes)
    assert f"on {len(rep.verify_sets)} input sets" in rep.to_text()


def test_sparse_id_columns_feeding_tables_of_different_sizes_still_get_batch_1():
    """Each column of a [B, F] id matrix feeds its own table: redrawn ids stay in that column's range."""

    class MultiTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = nn.ModuleList([nn.Embedding(n, 4) for n in (500, 7, 40)])
            self.out = nn.Linear(12, 1)

        def forward(self, ids):
            return self.out(torch.cat([t(ids[:, j]) for j, t in enumerate(self.tables)], dim=-1))

    torch.manual_seed(0)
    ids = torch.stack([torch.randint(0, n, (16,)) for n in (500, 7, 40)], dim=1)
    opt = recopt.optimize(MultiTable().eval(), (ids,), target="cpu")
    assert "batch 1" in opt.report.verify_sets, opt.report.notes
    assert not any("batch size kept fixed" in n for n in opt.report.notes)

