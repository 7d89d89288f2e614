"""No import cycles in recopt/ (static: every import statement, function-level included),
and recopt.passes imports nothing from recopt.models."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "recopt"


def _modules() -> dict:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _type_checking_only(tree) -> set:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    return skip


def _edges(mods: dict) -> dict:
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = m.split(".") if is_pkg else m.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            # importing one's own ancestor package is not a cycle (it is initialising)
            edges[m] |= {t for t in targets if t in mods and t != m and not m.startswith(t + ".")}
    return edges


def _cycles(edges: dict) -> set:
    index, low, stack, on, out = {}, {}, [], set(), set()
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """No tolerated cycles: a piece two modules share lives in a module below both."""
    bad = sorted(sorted(c) for c in _cycles(_edges(_modules())))
    assert not bad, f"import cycles: {bad}"


def test_cycle_finder_sees_function_level_imports(tmp_path, monkeypatch):
    """The checker itself: a cycle closed by an import inside a function is found."""
    pkg = tmp_path / "recopt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    assert _cycles(_edges(_modules())) == {frozenset({"recopt.a", "recopt.b"})}


def _imports_matching(edges: dict, importers: tuple, imported: tuple) -> list:
    return sorted((m, t) for m, ts in edges.items() if m.startswith(importers)
                  for t in ts if t == imported[0] or t.startswith(imported))


def test_passes_and_graph_import_no_models():
    """No module of recopt.passes or recopt.graph imports recopt.models (function-level included):
    a pass must find its patterns the way it would in a user's model, and builds what it inserts
    from recopt.modules / recopt.ops."""
    bad = _imports_matching(_edges(_modules()), ("recopt.passes", "recopt.graph"), ("recopt.models", "recopt.models."))
    assert not bad, f"imports of recopt.models from passes/graph: {bad}"


def test_runtime_layers_import_nothing_above_them():
    """recopt.modules and recopt.ops (what rewritten graphs call at run time) import neither
    passes, models, nor the optimizer layers above them; recopt.models may import recopt.modules."""
    above = ("recopt.passes", "recopt.models", "recopt.api", "recopt.capture", "recopt.verify",
             "recopt.lower", "recopt.export", "recopt.distill", "recopt.fp8")
    bad = _imports_matching(_edges(_modules()), ("recopt.modules", "recopt.ops"), above)
    assert not bad, f"run-time modules importing layers above them: {bad}"


def test_importing_recopt_ops_registers_the_run_time_ops():
    """A loaded program that calls torch.ops.recopt.grad_scale (ExFM's GS_β) or gdpa deserializes
    after `import recopt.ops` alone (what recopt.export's loader imports)."""
    import subprocess

    code = ("import torch, recopt.ops; "
            "assert hasattr(torch.ops.recopt, 'grad_scale') and hasattr(torch.ops.recopt, 'gdpa'); "
            "import sys; assert 'recopt.distill' not in sys.modules and 'recopt.passes.exfm' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT.parent))
    assert out.returncode == 0, out.stderr[-2000:]
