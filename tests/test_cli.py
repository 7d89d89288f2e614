import json
import os
import subprocess
import sys
import textwrap

import pytest

from recopt.cli import main

MODEL_FILE = textwrap.dedent('''
    import torch, torch.nn as nn

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.i, self.b = nn.Linear(8, 16), nn.Identity(), nn.Linear(16, 1)
        def forward(self, x):
            return self.b(torch.relu(self.i(self.a(x))))

    def build():
        torch.manual_seed(0)
        return Tower().eval(), (torch.randn(4, 8),)

    def broken():
        raise RuntimeError("no weights here")

    def not_a_pair():
        return Tower()
''')


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "mymodel.py"
    p.write_text(MODEL_FILE)
    return str(p)


def test_optimize_prints_report_and_writes_json_and_html(model_file, tmp_path, capsys):
    out_html, out_json = tmp_path / "r.html", tmp_path / "r.json"
    code = main(["optimize", f"{model_file}:build", "--target", "h100", "--quiet",
                 "--out", str(out_html), "--json", str(out_json)])
    assert code == 0
    d = json.loads(out_json.read_text())
    assert d["target"]["name"] == "h100"
    assert any(s["pass_name"] == "remove_identity" and s["status"] == "rewritten" for s in d["sites"])
    page = out_html.read_text()
    assert page.startswith("<!doctype html>") and "remove_identity" in page and "</html>" in page
    assert "data:image/png;base64," in page  # plots embedded: one file, nothing external
    assert "src='http" not in page


def test_explain_lists_each_candidate_and_decision(model_file, capsys):
    assert main(["explain", f"{model_file}:build"]) == 0
    out = capsys.readouterr().out
    assert "remove_identity (exact): applied" in out
    assert "would rewrite" in out


@pytest.mark.parametrize("argv, needle", [
    (["optimize", "missing_file.py:build"], "does not exist"),
    (["optimize", "{f}:nope"], "has no function 'nope'"),
    (["optimize", "{f}:broken"], "raised RuntimeError: no weights here"),
    (["optimize", "{f}:not_a_pair"], "must return (model, example_inputs)"),
    (["optimize", "{f}:build", "--target", "tpu"], "unknown target 'tpu'"),
    (["optimize", "{f}:build", "--passes", "warp_drive"], "unknown pass 'warp_drive'"),
    (["explain", "no_colon_here"], "must look like"),
    (["bench", "{f}:build", "--target", "h900"], "unknown target"),
])
def test_bad_arguments_give_one_line_and_exit_2(model_file, argv, needle, capsys):
    argv = [a.replace("{f}", model_file) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert needle in err[0] and err[0].startswith("recopt ")


def test_bench_times_variants_side_by_side(model_file, tmp_path, capsys):
    out_json = tmp_path / "b.json"
    assert main(["bench", f"{model_file}:build", "--no-compile", "--repeats", "3", "--warmup", "1", "--quiet",
                 "--json", str(out_json)]) == 0
    d = json.loads(out_json.read_text())
    assert [v["name"] for v in d["variants"]] == ["eager", "recopt eager"]
    assert all(v["median_s"] > 0 for v in d["variants"])
    out = capsys.readouterr().out
    assert "speed-up vs eager" in out
    assert "speed-up: measured" in out and "predicted for" in out  # measured beside predicted (issue 18)


def test_bundled_model_and_listing_commands(capsys):
    assert main(["optimize", "recopt:dlrm", "--quiet"]) == 0
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "dead_code" in out and "exact" in out
    assert main(["targets"]) == 0
    assert "h100" in capsys.readouterr().out


def test_console_entry_point_runs_as_a_module(model_file):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "recopt.cli", "optimize", "missing.py:build"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "recopt optimize: error: model file 'missing.py' does not exist"


def test_export_subcommand_writes_a_verified_artifact(model_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    assert main(["export", f"{model_file}:build", str(path)]) == 0
    assert path.exists()
    assert "parity verified" in capsys.readouterr().out


def test_export_subcommand_bad_suffix_is_one_line_exit_2(model_file, tmp_path, capsys):
    assert main(["export", f"{model_file}:build", str(tmp_path / "m.weird")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recopt export: error:")
