"""The FP8 site table as text: one row per GEMM site the fp8 pass saw.

``fp8_site_table(report)`` (an :class:`~recopt.report.OptimizationReport`,
or a list of its fp8 sites) gives FQN, M/K/N, consumer op, forward error
per recipe, the best forward speed-up and its basis (measured / predicted),
the decision (with its execution backend when it is not recopt's op, e.g.
``(torchao)``) and the reason code.
"""
from __future__ import annotations

import math


def _sites(items) -> list:
    if hasattr(items, "sites_for"):
        return items.sites_for("fp8")
    return [s for s in items if getattr(s, "pass_name", "fp8") == "fp8"]


def fp8_site_table(items, metric: str = "normwise") -> str:
    sites = _sites(items)
    recipes: list = []
    for s in sites:
        for r in s.details.get("errors", {}):
            if r not in recipes:
                recipes.append(r)
    hdr = ["site", "M", "K", "N", "consumer"] + [f"err {r}" for r in recipes] + \
          ["best fwd speed-up", "basis", "decision", "reason"]
    rows = [hdr]
    for s in sites:
        d = s.details
        errs = d.get("errors", {})
        cells = [d.get("fqn") or s.module_path or s.node, str(d.get("m", "")), str(d.get("k", "")),
                 str(d.get("n", "")), d.get("consumer", "")]
        for r in recipes:
            v = errs.get(r, {}).get("forward", {}).get(metric)
            cells.append("-" if v is None else f"{v:.3f}")
        best = [v.get("forward") for v in d.get("speedups", {}).values() if v.get("forward") is not None]
        best = [b for b in best if math.isfinite(b)]
        cells.append(f"{max(best):.2f}×" if best else "-")
        cells.append(d.get("basis", ""))
        roles = d.get("roles", {})
        picked = {k: v.get("recipe") for k, v in roles.items() if v.get("recipe", "bf16") != "bf16"}
        dec = ", ".join(f"{k}={v}" for k, v in picked.items()) if s.status == "rewritten" else "bf16"
        if s.status == "rewritten" and d.get("backend", "recopt") != "recopt":
            dec += f" ({d['backend']})"
        cells.append(dec)
        cells.append(s.reason_code or "ok")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
