"""A self-contained HTML page for an OptimizationReport (plots inlined as PNG).

Sections: summary, pass timeline (time per pass), FLOPs waterfall (per
applied pass), per-pass site tables (status and reason), and where the data
exists an FP8 error-vs-speedup scatter (sites whose ``details`` carry
``error`` and ``speedup``) and per-rank memory bars (sites whose
``details`` carry ``per_rank_bytes``). Plots need matplotlib (the
``report`` extra); without it the page has the tables and says so.
"""
from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # type hints only: report.py imports this module
    from .report import OptimizationReport

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.rewritten,.applied{color:#11772b}.rejected,.rolled_back,.failed{color:#a32020}
.no_change{color:#777}.code{font-family:ui-monospace,monospace;font-size:.85em}
.summary td:first-child{font-weight:600}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.note{color:#555;font-style:italic}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(report: OptimizationReport) -> dict:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out = {}
    if report.passes:
        names = [p.name for p in report.passes]
        pass_ms = [p.duration_s * 1e3 for p in report.passes]
        verify_ms = [p.verify_s * 1e3 for p in report.passes]
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
        ax.barh(names, pass_ms, label="pass", color="#4c72b0")
        ax.barh(names, verify_ms, left=pass_ms, label="verification", color="#dd8452")
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds")
        ax.set_title("Pass timeline")
        ax.legend(loc="lower right")
        out["timeline"] = _png(fig)
    applied = [p for p in report.passes if p.status == "applied" and p.flops_before and p.flops_after is not None]
    if report.flops_before:
        labels = ["captured"] + [p.name for p in applied]
        values = [report.flops_before] + [p.flops_after for p in applied]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        prev = report.flops_before
        for i, (lab, v) in enumerate(zip(labels, values)):
            if i == 0:
                ax.bar(i, v / 1e6, color="#4c72b0")
            else:
                delta = v - prev
                ax.bar(i, abs(delta) / 1e6 if delta else 0.0, bottom=min(prev, v) / 1e6,
                       color="#55a868" if delta < 0 else "#c44e52")
                prev = v
        ax.bar(len(labels), values[-1] / 1e6, color="#8172b3")
        ax.set_xticks(range(len(labels) + 1), labels + ["final"], rotation=20, ha="right")
        ax.set_ylabel("MFLOPs per call")
        ax.set_title("FLOPs waterfall")
        out["waterfall"] = _png(fig)
    pts = [(s.details.get("error"), s.details.get("speedup"), s.status, s.node) for s in report.sites
           if isinstance(s.details.get("error"), (int, float)) and isinstance(s.details.get("speedup"), (int, float))]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for status, color in (("rewritten", "#55a868"), ("rejected", "#c44e52")):
            xs = [p[0] for p in pts if p[2] == status]
            ys = [p[1] for p in pts if p[2] == status]
            if xs:
                ax.scatter(xs, ys, label=status, color=color)
        ax.set_xscale("log")
        ax.axhline(1.0, color="#999", lw=0.8)
        ax.set_xlabel("error vs high precision")
        ax.set_ylabel("speed-up over bf16")
        ax.set_title("Per-site error vs speed-up")
        ax.legend()
        out["scatter"] = _png(fig)
    mem = [(s.node, s.details["per_rank_bytes"]) for s in report.sites
           if isinstance(s.details.get("per_rank_bytes"), list) and s.details["per_rank_bytes"]]
    if mem:
        name, per_rank = mem[0]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(len(per_rank)), [b / 2**20 for b in per_rank], color="#4c72b0")
        ax.set_xlabel("rank")
        ax.set_ylabel("MiB")
        ax.set_title(f"Per-rank memory ({name})")
        out["memory"] = _png(fig)
    return out


def _e(x) -> str:
    return html.escape(str(x))


def render_html(report: OptimizationReport, title: Optional[str] = None) -> str:
    """The report as one self-contained HTML document (a string)."""
    plots = _plots(report)
    t = report.target or {}
    title = title or f"recopt report — {t.get('name', '?')}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"]
    flops = ""
    if report.flops_before is not None and report.flops_after is not None:
        change = (report.flops_after - report.flops_before) / report.flops_before * 100 if report.flops_before else 0
        flops = f"{report.flops_before / 1e6:.2f} → {report.flops_after / 1e6:.2f} MFLOPs per call ({change:+.1f}%)"
    if report.flops_incomplete:
        flops = (flops or "-") + f" — FLOPs incomplete: {'; '.join(report.flops_incomplete)}"
    rows = [("target", f"{t.get('name', '?')} (profile v{t.get('version', '?')}: {t.get('source', '')})"),
            ("capture", report.capture_method), ("backend", report.backend), ("FLOPs", flops or "-"),
            ("activation traffic (estimate)",
             f"{report.bytes_before / 1e6:.2f} → {report.bytes_after / 1e6:.2f} MB per call"
             if report.bytes_before and report.bytes_after is not None else "-"),
            ("time", f"capture {report.capture_s * 1e3:.0f} ms, total {report.total_s * 1e3:.0f} ms"),
            ("sites", f"{len(report.rewritten)} rewritten, {len(report.rejected)} rejected")]
    parts.append("<table class='summary'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
                 + "</table>")
    for d in report.capture_diagnostics:
        parts.append(f"<p class='note'>capture note: {_e(d)}</p>")
    if report.guards:
        parts.append(f"<p class='note'>specialised on shape guards: {_e('; '.join(report.guards[:8]))}</p>")
    for n in report.notes:
        parts.append(f"<p class='note'>{_e(n)}</p>")
    if not plots:
        parts.append("<p class='note'>plots need matplotlib: pip install 'recopt[report]'</p>")

    parts.append("<h2>Passes</h2>")
    if "timeline" in plots:
        parts.append(f"<img alt='pass timeline' src='{plots['timeline']}'>")
    parts.append("<table><tr><th>pass</th><th>semantics</th><th>status</th><th>rewritten</th><th>rejected</th>"
                 "<th>pass ms</th><th>verify ms</th><th>config</th><th>message</th></tr>")
    for p in report.passes:
        parts.append(
            f"<tr><td>{_e(p.name)}</td><td>{_e(p.semantics)}</td><td class='{_e(p.status)}'>{_e(p.status)}</td>"
            f"<td>{p.n_rewritten}</td><td>{p.n_rejected}</td><td>{p.duration_s * 1e3:.1f}</td>"
            f"<td>{p.verify_s * 1e3:.1f}</td><td class='code'>{_e(p.config)}</td><td>{_e(p.message)}</td></tr>")
    parts.append("</table>")
    if "waterfall" in plots:
        parts.append("<h2>FLOPs</h2>" + f"<img alt='FLOPs waterfall' src='{plots['waterfall']}'>")
    if "scatter" in plots:
        parts.append("<h2>Error vs speed-up</h2>" + f"<img alt='error vs speed-up' src='{plots['scatter']}'>")
    if "memory" in plots:
        parts.append("<h2>Memory per rank</h2>" + f"<img alt='per-rank memory' src='{plots['memory']}'>")

    parts.append("<h2>Sites</h2>")
    for p in report.passes:
        sites = report.sites_for(p.name)
        if not sites:
            continue
        parts.append(f"<h3>{_e(p.name)}</h3><table><tr><th>node</th><th>module</th><th>op</th><th>status</th>"
                     "<th>reason</th><th>FLOPs before → after</th></tr>")
        for s in sites:
            reason = s.reason if s.status == "rewritten" else f"[{s.reason_code}] {s.reason}"
            fl = ""
            if s.flops_before is not None and s.flops_after is not None:
                fl = f"{s.flops_before / 1e6:.2f} → {s.flops_after / 1e6:.2f} M"
            parts.append(f"<tr><td class='code'>{_e(s.node)}</td><td class='code'>{_e(s.module_path or '-')}</td>"
                         f"<td class='code'>{_e(s.op)}</td><td class='{_e(s.status)}'>{_e(s.status)}</td>"
                         f"<td>{_e(reason)}</td><td>{_e(fl)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: OptimizationReport, path: str, title: Optional[str] = None) -> str:
    """Write :func:`render_html` to ``path``; return the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report, title))
    return path
