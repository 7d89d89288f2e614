"""`import recopt` and the core flow need torch only; extras fail with a clear message."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK = textwrap.dedent('''
    import sys
    BLOCKED = ("torchrec", "fbgemm_gpu", "triton", "onnx", "onnxruntime", "onnxscript", "matplotlib",
               "pyarrow", "tqdm")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
''')


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


def test_core_flow_runs_without_any_optional_dependency():
    r = _run('''
        import torch, torch.nn as nn
        import recopt
        m = nn.Sequential(nn.Linear(8, 8), nn.Identity(), nn.ReLU(), nn.Linear(8, 1)).eval()
        x = torch.randn(4, 8)
        opt = recopt.optimize(m, (x,), target="cpu")
        torch.testing.assert_close(opt(x), m(x))
        assert opt.report.pass_run("remove_identity").status == "applied", opt.report
        html = opt.report.to_html()
        assert "recopt[report]" in html     # plots need matplotlib: said, not crashed
        import recopt.models                # plain PyTorch models: torch only
        print("ok")
    ''')
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_missing_extra_names_it():
    r = _run('''
        import recopt, torch
        try:
            import recopt.distributed
            recopt.distributed.shard_2d(torch.nn.Linear(2, 2), sharding_group_size=1)
        except ImportError as e:
            print("ERR", e)
    ''')
    assert "ERR" in r.stdout and "recopt[rec]" in r.stdout, r.stdout + r.stderr


def test_a_broken_kernel_launcher_fails_the_import_instead_of_routing_to_the_reference():
    """Only triton's absence turns the kernels off; an error inside recopt's own launcher module
    (here: it cannot be imported) must surface, not silently send every GDPA call to the reference."""
    for mod in ("recopt.ops._gdpa_triton", "recopt.ops._gdpa_softmax_triton"):
        code = f"import sys\nsys.modules[{mod!r}] = None\nimport recopt.ops.gdpa\n"
        env = dict(os.environ, PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode != 0, (mod, r.stdout)
        assert "ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr, r.stderr[-2000:]
