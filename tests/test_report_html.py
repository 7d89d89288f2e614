import builtins
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn as nn

import recopt
from recopt.passes.base import Site
from recopt.report_html import render_html


def _report():
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.ReLU(), nn.Linear(8, 1)).eval()
    return recopt.optimize(model, (torch.randn(3, 4),), target="h100").report


def test_html_has_summary_pass_table_sites_and_inline_plots():
    rep = _report()
    page = render_html(rep)
    assert "<h2>Passes</h2>" in page and "remove_identity" in page
    assert page.count("data:image/png;base64,") >= 2  # timeline + FLOPs waterfall
    assert "h100" in page


def test_html_plots_fp8_scatter_and_rank_memory_when_sites_carry_them():
    rep = _report()
    rep.sites.append(Site("fp8", "linear_1", "rewritten", details={"error": 0.01, "speedup": 1.3}))
    rep.sites.append(Site("fp8", "linear_2", "rejected", reason_code="slower", details={"error": 0.2, "speedup": 0.8}))
    rep.sites.append(Site("sparse2d", "ebc", "rewritten", details={"per_rank_bytes": [1 << 20, 2 << 20]}))
    page = render_html(rep)
    assert "Error vs speed-up" in page and "Memory per rank" in page


def test_html_without_matplotlib_still_renders_tables(monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    rep = _report()
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    page = render_html(rep)
    assert "recopt[report]" in page and "data:image/png" not in page
    assert "remove_identity" in page


def test_text_is_escaped():
    rep = _report()
    rep.notes.append("<script>alert(1)</script>")
    assert "<script>alert" not in render_html(rep)


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="chromium not installed (apt-get install chromium); CI installs it and never skips")
def test_html_renders_in_headless_chromium(tmp_path):
    assert shutil.which("chromium"), "CI must install chromium (.ci/run does)"
    path = tmp_path / "r.html"
    _report().to_html(str(path))
    png = tmp_path / "r.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                    f"--screenshot={png}", f"file://{path}"], capture_output=True, timeout=120)
    assert png.exists() and png.stat().st_size > 10_000
