"""Write, register and run your own recopt pass (about 20 lines of pass code).

The pass fuses ``torch.sigmoid(x) * x`` (a hand-written SiLU, common in
CTR-library code) into one ``F.silu`` call. It is ``exact``: the pass
manager checks the rewritten graph against the original and would roll it
back if the outputs moved.

    python examples/custom_pass.py
"""
import operator
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
import recopt  # noqa: E402


@recopt.register_pass
class FuseHandWrittenSiLU(recopt.Pass):
    name = "fuse_silu"
    semantics = recopt.Semantics.EXACT
    description = "sigmoid(x) * x -> silu(x)"

    def run(self, gm, ctx):
        sites = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (operator.mul, torch.mul):
                continue
            a, b = node.args[:2]
            sig, x = (a, b) if _is_sigmoid(a) else (b, a)
            if not _is_sigmoid(sig) or sig.args[0] is not x:
                continue
            if len(sig.users) > 1:
                sites.append(self.rejected(node, "sigmoid_reused", "the sigmoid is used elsewhere too"))
                continue
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(F.silu, (x,))
            node.replace_all_uses_with(fused)
            sites.append(self.rewritten(node, "sigmoid(x) * x -> silu(x)"))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return recopt.PassResult(gm, sites)


def _is_sigmoid(n):
    return getattr(n, "op", None) == "call_function" and n.target in (torch.sigmoid, F.sigmoid)


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 1)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.sigmoid(h) * h)


def main():
    model = Tower().eval()
    x = torch.randn(8, 16)
    opt = recopt.optimize(model, (x,), target="cpu", passes=["default", "fuse_silu"])
    print(opt.report)
    assert opt.report.pass_run("fuse_silu").status == "applied"
    torch.testing.assert_close(opt(x), model(x))
    print("\nrewritten graph:\n" + opt.graph_module.code)


if __name__ == "__main__":
    main()
