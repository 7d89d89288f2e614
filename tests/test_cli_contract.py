"""The CLI's contract: every misuse is one line on stderr, exit 2, no traceback — before any work starts."""
import os
import subprocess
import sys
import textwrap

import pytest

from recopt.cli import main

MODEL = textwrap.dedent('''
    import os, sys, torch, torch.nn as nn

    def build():
        open(os.path.join(os.path.dirname(__file__), "BUILT"), "w").close()   # the long work started
        return nn.Linear(4, 2).eval(), (torch.randn(3, 4),)

    def broken():
        raise RuntimeError("no weights here\\nsecond line")

    def not_a_pair():
        return nn.Linear(4, 2)

    def not_a_module():
        return "model", (torch.randn(3, 4),)

    def exits0():
        sys.exit(0)

    def exits1():
        sys.exit("bye")
''')


@pytest.fixture
def env(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "model.py").write_text(MODEL)
    (d / "bad_syntax.py").write_text("def build(:\n")
    (d / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    (d / "notes.txt").write_text("x")
    (d / "afile").write_text("x")
    (d / "dir.onnx").mkdir()
    return {"f": str(d / "model.py"), "d": str(d), "syntax": str(d / "bad_syntax.py"),
            "exits": str(d / "exits_on_import.py"), "txt": str(d / "notes.txt"), "file": str(d / "afile")}


B = "{f}:build"
CASES = [
    ([], "required: command"),
    (["frobnicate"], "invalid choice"),
    (["optimize"], "required: model"),
    (["optimize", "nocolon"], "must look like"),
    (["optimize", "missing.py:build"], "does not exist"),
    (["optimize", "{d}:build"], "is a folder"),
    (["optimize", "{txt}:build"], "is not a .py file"),
    (["optimize", "{f}:"], "is not a function name"),
    (["optimize", ":build"], "has no file before"),
    (["optimize", "{f}:nope"], "has no function 'nope'"),
    (["optimize", "{f}:broken"], "raised RuntimeError: no weights here"),
    (["optimize", "{f}:not_a_pair"], "must return (model, example_inputs)"),
    (["optimize", "{f}:not_a_module"], "expected an nn.Module"),
    (["optimize", "{f}:exits0"], "called sys.exit(0)"),
    (["explain", "{f}:exits1"], "called sys.exit('bye')"),
    (["optimize", "{syntax}:build"], "failed: SyntaxError"),
    (["optimize", "{exits}:build"], "must not exit"),
    (["optimize", "recopt:nomodel"], "unknown bundled model 'nomodel'"),
    (["optimize", B, "--target", "tpu"], "--target: unknown target 'tpu'"),
    (["optimize", B, "--target"], "expected one argument"),
    (["optimize", B, "--passes", "warp_drive"], "--passes: unknown pass 'warp_drive'"),
    (["optimize", B, "--passes", ","], "--passes is empty"),
    (["optimize", B, "--config", "{not json"], "--config is not valid JSON"),
    (["optimize", B, "--config", "[1]"], "--config must be a JSON object"),
    (["optimize", B, "--config", '{"nope": {}}'], "--config: unknown pass 'nope'"),
    (["optimize", B, "--backend", "tvm"], "invalid choice: 'tvm'"),
    (["optimize", B, "--unknown-flag"], "unrecognized arguments: --unknown-flag"),
    (["optimize", B, "--out", "{d}"], "--out '{d}' is a folder"),
    (["optimize", B, "--out", "{file}/r.html"], "is a file, so no folder"),
    (["optimize", B, "--json", "/proc/recopt_r.json"], "--json '/proc/recopt_r.json' cannot be written"),
    (["optimize", B, "--json", "{f}"], "is the model file itself"),
    (["optimize", B, "--json", ""], "--json is empty"),
    (["optimize", B, "--out", "{d}/x.html", "--json", "{d}/x.html"], "--out and --json name the same file"),
    (["explain", B, "--json", "{d}"], "--json '{d}' is a folder"),
    (["bench", B, "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["bench", B, "--repeats", "-3"], "--repeats must be at least 1, got -3"),
    (["bench", B, "--repeats", "many"], "argument --repeats: invalid int value"),
    (["bench", B, "--warmup", "-1"], "--warmup must be 0 or more"),
    (["bench", B, "--target", "h900"], "unknown target 'h900'"),
    (["bench", B, "--json", "{file}/b.json"], "is a file"),
    (["export", B], "required: path"),
    (["export", B, "{d}/m.weird"], "cannot tell the export format"),
    (["export", B, "{d}/m.onnx", "--format", "tflite"], "invalid choice: 'tflite'"),
    (["export", B, "{file}/m.onnx"], "is a file, so no folder"),
    (["export", B, "{d}/dir.onnx"], "is a folder"),
    (["export", B, "{f}", "--format", "onnx"], "is the model file itself"),
    (["passes", "extra"], "unrecognized arguments: extra"),
]


def fill(text, env):
    for k, v in env.items():
        text = text.replace("{" + k + "}", v)
    return text


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(c[0])[:60] or "(none)" for c in CASES])
def test_misuse_is_one_line_exit_2_before_any_work(env, argv, needle, capsys):
    argv = [fill(a, env) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith("recopt") and "error:" in lines[0]
    assert "Traceback" not in err
    assert fill(needle, env) in lines[0], lines[0]
    assert not os.path.exists(os.path.join(env["d"], "BUILT")), "the model was built before the check"
    assert not os.path.exists(os.path.join(env["d"], "x.html"))


def test_python_dash_m_recopt(env):
    run = dict(capture_output=True, text=True, timeout=120,
               env=dict(os.environ, PYTHONPATH=os.getcwd()))
    r = subprocess.run([sys.executable, "-m", "recopt", "bench", env["f"] + ":build", "--repeats", "0"], **run)
    assert r.returncode == 2 and r.stderr.strip() == "recopt bench: error: --repeats must be at least 1, got 0"


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "optimize" in capsys.readouterr().out


def test_the_package_and_the_function_share_the_name(tmp_path):
    import torch

    import recopt
    import recopt.export as rx

    assert recopt.export is rx and callable(recopt.export)
    m, x = torch.nn.Linear(3, 2).eval(), (torch.randn(2, 3),)
    res = recopt.export(m, x, str(tmp_path / "a.pt2"), verify=False)          # the function
    res2 = recopt.export.export(m, x, str(tmp_path / "b.pt2"), verify=False)  # the package docstring's usage
    assert res.format == res2.format == "pt2"
    assert recopt.export.load(res2.path).manifest["format"] == "pt2"
