"""Write, register and run your own recopt pass with the rule layer (about 30 lines).

The pass fuses ``torch.sigmoid(x) * x`` (a hand-written SiLU, common in
CTR-library code) into one ``F.silu`` call, as a rule: ``match`` finds
candidates, ``check`` returns a reason when one must be left alone, and the
rewrite is a plain torch function that recopt traces and inlines (it never
rejects). It is ``exact``: the pass
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


def match_silu(gm, node):
    """``sigmoid(x) * x`` (either order) -> bindings, or None: not a candidate."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul):
        return None
    a, b = node.args[:2]
    sig, x = (a, b) if _is_sigmoid(a) else (b, a)
    if not _is_sigmoid(sig) or sig.args[0] is not x:
        return None
    return {"x": x, "sigmoid": sig}


def check_silu(gm, m):
    """None if the rewrite is exact here, else a Reason (reported as left alone)."""
    if len(m["sigmoid"].users) > 1:
        return recopt.Reason("sigmoid_reused", "the sigmoid is used elsewhere too")
    return None


def silu(x):                      # the replacement: plain torch, traced and inlined
    return F.silu(x)


@recopt.register_pass
class FuseHandWrittenSiLU(recopt.RulePass):
    name = "fuse_silu"
    semantics = recopt.Semantics.EXACT
    description = "sigmoid(x) * x -> silu(x)"
    rules = (recopt.Rule("silu", match_silu, lambda m: (silu, [m["x"]]), check=check_silu,
                         description="sigmoid(x) * x -> silu(x)"),)


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
