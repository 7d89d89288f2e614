"""The bundled InterFormer and Kunlun at sequence length 0 and 1, and the verifier's edge sets
that vary their sequence length: usable (the models run on them) instead of dropped."""
import pytest
import torch

from recopt.edge_inputs import edge_input_sets
from recopt.examples_factory import bundled_factory


@pytest.mark.parametrize("name", ["interformer", "kunlun"])
def test_bundled_model_runs_at_length_0_and_1(name):
    model, (dense, sparse, seq_ids, seq_len, seq_t) = bundled_factory(name)()
    for T in (0, 1):
        args = (dense, sparse, seq_ids[..., :T, :], seq_len.clamp(max=T), seq_t[..., :T])
        with torch.no_grad():
            out = model(*args)
        assert out.shape == (dense.shape[0],) and torch.isfinite(out).all(), (name, T)


@pytest.mark.parametrize("name", ["interformer", "kunlun"])
def test_sequence_length_edge_sets_are_accepted_by_the_bundled_models(name):
    model, args = bundled_factory(name)()
    T = args[2].shape[2]
    sets, infos, _, seq_sizes = edge_input_sets(args)
    assert T in seq_sizes
    seq_sets = [s for s in sets if s.varies == f"seq:{T}"]
    assert {s.name.rsplit(" at ", 1)[1] for s in seq_sets} >= {"1"}
    for s in seq_sets:
        built = s.tries[0]()
        ids, lengths, times = built[2], built[3], built[4]
        n = ids.shape[2]
        assert n != T and times.shape[2] == n, s.name          # timestamps follow the ids' length
        for c, table in enumerate(model.seq_tables):            # each id column stays inside its table
            assert int(ids[..., c].max()) < model.embeddings[table].num_embeddings
        with torch.no_grad():
            assert torch.isfinite(model(*built)).all(), s.name
