"""Probe statistics: batched Welford, the sketched form, weight stats, hooks and graph recording."""
import torch
import torch.nn as nn

from recopt.fp8.probe import ActivationStats, ModuleProbe, WeightStats, collect_graph_stats, measure_overhead


def _batches(k=12, n_batches=5, rows=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g)
    return [torch.randn(rows, k, generator=g) @ mix + torch.arange(k) * (i + 1) * 0.1 for i in range(n_batches)]


def test_batched_welford_equals_two_pass_mean_and_covariance():
    bs = _batches()
    st = ActivationStats(12)
    for b in bs:
        st.update(b)
    allx = torch.cat(bs).double()
    torch.testing.assert_close(st.mean, allx.mean(0))
    torch.testing.assert_close(st.covariance(), torch.cov(allx.t()))
    assert st.n == allx.shape[0] and st.typical_rows == 37
    torch.testing.assert_close(st.amax, allx.abs().amax(0))


def test_sketched_form_keeps_exact_diagonal_and_top_directions():
    g = torch.Generator().manual_seed(3)
    k, r = 96, 8
    basis = torch.linalg.qr(torch.randn(k, r, generator=g))[0]
    bs = [torch.randn(64, r, generator=g) * 10 @ basis.t() + 0.1 * torch.randn(64, k, generator=g) for _ in range(6)]
    st = ActivationStats(k, full_cov_max_k=32, rank=12)
    assert not st.full
    for b in bs:
        st.update(b)
    exact = torch.cov(torch.cat(bs).double().t())
    approx = st.covariance()
    torch.testing.assert_close(approx.diagonal(), exact.diagonal(), rtol=1e-6, atol=1e-8)
    assert float((approx - exact).norm() / exact.norm()) < 0.05
    assert st.sketch.shape[0] <= 2 * 12


def test_samples_reproduce_learned_moments():
    bs = _batches(k=8, n_batches=10, rows=200)
    st = ActivationStats(8)
    for b in bs:
        st.update(b)
    x = st.sample(20000, torch.Generator().manual_seed(1)).double()
    assert x.shape == (20000, 8)
    torch.testing.assert_close(x.mean(0), st.mean, atol=0.15, rtol=0.05)
    cov = st.covariance()
    assert float((torch.cov(x.t()) - cov).norm() / cov.norm()) < 0.05


def test_weight_stats_flip_flop_tracks_a_moving_weight():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 10, generator=g)
    ws = WeightStats(6, 10, momentum=0.5)
    ws.update(w0)
    assert torch.equal(ws.sample(), w0.float())  # a weight that never moved is sampled as itself
    for _ in range(20):
        ws.update(w0 + 0.01 * torch.randn(6, 10, generator=g))
    s = ws.sample(torch.Generator().manual_seed(2))
    assert s.shape == (6, 10)
    assert 0 < float((s - w0).abs().mean()) < 0.1
    assert abs(float(ws.u.diagonal().sum()) / 6 - 1) < 1e-6  # normalised: tr(U)/rows = 1


def test_module_probe_samples_every_interval_and_removes_hooks():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    probe = ModuleProbe(model, interval=3, weight_interval=5)
    for _ in range(10):
        model(torch.randn(5, 8))
    assert probe.calls["0"] == 10
    assert probe.activations["0"].n == 4 * 5  # calls 0, 3, 6, 9
    assert probe.activations["2"].k == 16
    assert probe.weights["2"].updates == 2  # calls 0, 5
    probe.remove()
    model(torch.randn(5, 8))
    assert probe.calls["0"] == 10
    probe.attach()
    model(torch.randn(5, 8))
    assert probe.calls["0"] == 11 and probe.activations["0"].n == 20


def test_overhead_measurement_runs_and_reports():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    probe = ModuleProbe(model, interval=10)
    res = measure_overhead(step, probe, steps=40)
    assert set(res) == {"plain_s", "probed_s", "overhead", "steps"} and res["steps"] == 40
    assert res["plain_s"] > 0 and res["probed_s"] > 0
    assert not model[0]._forward_pre_hooks  # probe detached after measuring
    assert probe.calls["0"] == 40 and probe.activations["0"].n == 4 * 64  # counters persist across rounds


def test_collect_graph_stats_records_site_inputs():
    import torch.fx as fx

    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    gm = fx.symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    batches = [(torch.randn(10, 8),) for _ in range(3)]
    st = collect_graph_stats(gm, {"_2": nodes["_2"].args[0].name}, {"_2": 16}, batches)
    h = torch.cat([model[1](model[0](b[0])) for b in batches]).double()
    torch.testing.assert_close(st["_2"].mean, h.mean(0))
    assert st["_2"].n == 30
