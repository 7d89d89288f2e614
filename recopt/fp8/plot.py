"""Error-vs-speed-up scatter of FP8 site decisions (matplotlib, optional: extra ``report``).

:func:`error_speedup_figure` takes the fp8 pass's sites (``report.sites``
filtered to ``pass_name == "fp8"``, or :class:`SiteDecision` objects /
their dicts) and plots, per site and recipe, the forward error against the
forward speed-up, with the threshold and the 1.05× line. Sites chosen for
FP8 are filled markers. :func:`error_speedup_png` returns PNG bytes for
the HTML report.
"""
from __future__ import annotations

import io
import math

from ..errors import require
from .dispatch import MIN_SPEEDUP


def _rows(items) -> list:
    rows = []
    for it in items:
        d = getattr(it, "details", None)
        if d is None:
            d = it.to_dict() if hasattr(it, "to_dict") else dict(it)
        if not d.get("errors"):
            continue
        rows.append(d)
    return rows


def error_speedup_figure(items, metric: str = "normwise", threshold=None, min_speedup: float = MIN_SPEEDUP):
    """A matplotlib Figure: x = forward speed-up over bf16, y = forward error (log), one point per site×recipe."""
    require("matplotlib", "report", "the FP8 error-vs-speed-up plot")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .metrics import DEFAULT_THRESHOLDS

    threshold = DEFAULT_THRESHOLDS.get(metric) if threshold is None else threshold
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {"tensorwise": "o", "rowwise": "s", "rowwise_gw_hp": "D", "blockwise": "^"}
    for d in _rows(items):
        fwd_recipe = (d.get("roles", {}).get("forward") or {}).get("recipe", "bf16")
        for recipe, per_role in d["errors"].items():
            err = per_role.get("forward", {}).get(metric)
            sp = None
            for key, roles in d.get("speedups", {}).items():
                if key.endswith(":" + recipe) and roles.get("forward") is not None:
                    sp = roles["forward"]
                    break
            if err is None or sp is None or not math.isfinite(sp):
                continue
            chosen = recipe == fwd_recipe
            ax.scatter([sp], [max(err, 1e-6)], marker=markers.get(recipe, "x"),
                       facecolors=None if chosen else "none", edgecolors="C0" if chosen else "C3",
                       label=recipe)
            ax.annotate(d.get("fqn", ""), (sp, max(err, 1e-6)), fontsize=6, alpha=0.7)
    ax.axvline(min_speedup, color="gray", ls="--", lw=1)
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color="gray", ls=":", lw=1)
    ax.set_xlabel("forward speed-up over bf16")
    ax.set_ylabel(f"forward error ({metric})")
    ax.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_title("FP8 sites: error vs speed-up (filled = chosen)")
    fig.tight_layout()
    return fig


def error_speedup_png(items, **kw) -> bytes:
    """PNG bytes of :func:`error_speedup_figure`."""
    fig = error_speedup_figure(items, **kw)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()
