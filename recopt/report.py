"""OptimizationReport: what each pass did, where, and why not elsewhere."""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch


class _Status(str, enum.Enum):
    """A status that is also its string (``== "rewritten"``, JSON, f-strings)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class SiteStatus(_Status):
    """What a pass did at one candidate site."""

    REWRITTEN = "rewritten"
    REJECTED = "rejected"


class RunStatus(_Status):
    """What became of one pass's run in the pipeline."""

    APPLIED = "applied"
    NO_CHANGE = "no_change"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


REWRITTEN, REJECTED = SiteStatus.REWRITTEN, SiteStatus.REJECTED
APPLIED, NO_CHANGE, ROLLED_BACK, FAILED = (RunStatus.APPLIED, RunStatus.NO_CHANGE,
                                           RunStatus.ROLLED_BACK, RunStatus.FAILED)


@dataclass
class Site:
    """One candidate a pass looked at.

    ``status`` is a :class:`SiteStatus` (``"rewritten"`` or ``"rejected"``); a rejected site carries a
    short stable ``reason_code`` (for tests and tooling) and a sentence
    ``reason`` for people. FLOP/byte fields are per call of the graph on the
    example inputs, filled where the pass changes them.
    """

    pass_name: str
    node: str
    status: SiteStatus
    reason: str = ""
    reason_code: str = ""
    module_path: str = ""
    op: str = ""
    flops_before: Optional[float] = None
    flops_after: Optional[float] = None
    bytes_before: Optional[float] = None
    bytes_after: Optional[float] = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["details"] = _jsonable(d["details"])
        return d


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Size):
        return list(x)
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return repr(x)




@dataclass
class PassRun:
    """One pass's run in the pipeline.

    ``status``: ``applied`` (rewrote and verified), ``no_change`` (nothing to
    rewrite), ``rolled_back`` (verification failed: ``message`` names the
    output and the size of the difference), ``failed`` (the pass raised:
    ``message`` holds the error).
    """

    name: str
    semantics: str
    status: RunStatus
    duration_s: float
    verify_s: float = 0.0
    config: dict = field(default_factory=dict)
    message: str = ""
    flops_before: Optional[float] = None
    flops_after: Optional[float] = None
    bytes_before: Optional[float] = None
    bytes_after: Optional[float] = None
    n_rewritten: int = 0
    n_rejected: int = 0


@dataclass
class OptimizationReport:
    """Everything ``recopt.optimize`` did, as data.

    ``sites`` holds one :class:`~recopt.passes.base.Site` per candidate every
    pass saw (rewritten or rejected with a reason). Sites of a rolled-back
    pass are kept with status ``rejected`` and reason code ``rolled_back``.
    """

    target: dict = field(default_factory=dict)
    capture_method: str = ""
    capture_diagnostics: list = field(default_factory=list)
    guards: list = field(default_factory=list)
    modes: list = field(default_factory=list)
    modes_note: str = ""
    backend: str = ""
    passes: list = field(default_factory=list)
    sites: list = field(default_factory=list)
    flops_before: Optional[float] = None
    flops_after: Optional[float] = None
    bytes_before: Optional[float] = None
    bytes_after: Optional[float] = None
    # Why a FLOP figure above is missing or too low: an op whose FLOP formula
    # raised (counted as 0), or a graph that could not be counted. Empty: complete.
    flops_incomplete: list = field(default_factory=list)
    capture_s: float = 0.0
    total_s: float = 0.0
    notes: list = field(default_factory=list)
    # Names of the input sets every rewrite was verified on (example, batch 1,
    # cold start, ...), and the modes ("eval", "train"). Empty when verify=False.
    verify_sets: list = field(default_factory=list)
    verify_modes: list = field(default_factory=list)
    # Filled by recopt.measure.measure_speedup (optimize(measure=True), `recopt bench`):
    # median original / median optimized time on the machine that ran it.
    measured_speedup: Optional[float] = None
    measured: dict = field(default_factory=dict)

    # -- queries -------------------------------------------------------
    def sites_for(self, pass_name: str, status: Optional[str] = None) -> list:
        return [s for s in self.sites if s.pass_name == pass_name and (status is None or s.status == status)]

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.status == REWRITTEN]

    @property
    def rejected(self) -> list:
        return [s for s in self.sites if s.status == REJECTED]

    @property
    def predicted_speedup(self) -> Optional[float]:
        """Roofline time before / after for the target (FLOPs and activation traffic at
        its peaks); ``None`` where the target has no peaks (the CPU) or the figures are missing."""
        from .targets import Target

        if not self.target or self.flops_before is None or self.flops_after is None:
            return None
        try:
            tgt = Target.from_dict(self.target)
        except (TypeError, ValueError):
            return None
        before = tgt.roofline_seconds(self.flops_before, self.bytes_before or 0.0)
        after = tgt.roofline_seconds(self.flops_after, self.bytes_after or 0.0)
        if not before or not after:
            return None
        return before / after

    def speedup_line(self) -> str:
        """One line: the measured speed-up on this machine beside the target's predicted one."""
        pred = self.predicted_speedup
        tname = self.target.get("name", "?")
        pred_s = (f"predicted for {tname}: {pred:.2f}x (roofline of FLOPs and traffic"
                  + ("; FLOPs incomplete, see above)" if self.flops_incomplete else ")") if pred is not None
                  else f"predicted for {tname}: none (no peak figures for this target)")
        m = self.measured
        if self.measured_speedup is None:
            return (f"speed-up: not measured (optimize(..., measure=True) or `recopt bench` measure it); "
                    f"{pred_s}. 'applied' does not mean faster.")
        band = abs(1.0 - m.get("noise", 1.0))
        where = f"{m.get('device', '?')}, batch {m.get('batch')}, {m.get('threads')} thread(s)"
        verdict = "faster" if self.measured_speedup > 1.0 + band else (
            "slower" if self.measured_speedup < 1.0 - band else "no difference beyond noise")
        return (f"speed-up: measured {self.measured_speedup:.2f}x on this machine ({where}; "
                f"{m.get('original_ms', float('nan')):.3f} -> {m.get('optimized_ms', float('nan')):.3f} ms; "
                f"noise +/-{band:.2f}: {verdict}); {pred_s}")

    def pass_run(self, name: str) -> Optional[PassRun]:
        for p in self.passes:
            if p.name == name:
                return p
        return None

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("sites", "passes")}
        d["passes"] = [asdict(p) for p in self.passes]
        d["sites"] = [s.to_dict() for s in self.sites]
        return d

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=True, default=str)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def to_html(self, path: Optional[str] = None) -> str:
        """A self-contained HTML page (plots need matplotlib); written to ``path`` if given."""
        from .report_html import render_html

        text = render_html(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizationReport":
        d = dict(d)
        d["passes"] = [PassRun(**p) for p in d.get("passes", [])]
        d["sites"] = [Site(**s) for s in d.get("sites", [])]
        return cls(**d)

    # -- text ----------------------------------------------------------
    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, max_sites: int = 60) -> str:
        lines = []
        tname = self.target.get("name", "?")
        lines.append(
            f"recopt report — target {tname}, capture {self.capture_method or '-'}, backend {self.backend or '-'}"
        )
        if self.capture_diagnostics:
            for d in self.capture_diagnostics:
                lines.extend(_wrap(f"capture note: {d}", 100, "  ", "    "))
        if self.modes_note:
            lines.extend(_wrap(f"modes: {self.modes_note}", 100, "  ", "    "))
        if self.guards:
            lines.append(f"  specialised on {len(self.guards)} shape guard(s), e.g. {self.guards[0]}")
        if self.flops_before is not None and self.flops_after is not None:
            lines.append(
                f"  FLOPs per call: {_human(self.flops_before)} → {_human(self.flops_after)}"
                + (f" ({_pct(self.flops_before, self.flops_after)})" if self.flops_before else "")
            )
        if self.flops_incomplete:
            lines.extend(_wrap(f"FLOPs incomplete: {'; '.join(self.flops_incomplete)}", 100, "  ", "    "))
        if self.bytes_before and self.bytes_after is not None:
            lines.append(
                f"  activation traffic (estimate): {_human(self.bytes_before)}B → {_human(self.bytes_after)}B"
                f" ({_pct(self.bytes_before, self.bytes_after)})"
            )
        lines.extend(_wrap(self.speedup_line(), 100, "  ", "    "))
        lines.append(f"  capture {self.capture_s * 1e3:.0f} ms, total {self.total_s * 1e3:.0f} ms")
        if self.verify_sets:
            lines.extend(_wrap(
                f"verified each rewrite on {len(self.verify_sets)} input sets in "
                f"{' and '.join(self.verify_modes or ['eval'])} mode: {', '.join(self.verify_sets)}",
                100, "  ", "    "))
        lines.append("")
        rows = [("pass", "semantics", "status", "rewritten", "rejected", "time ms", "note")]
        for p in self.passes:
            rows.append(
                (p.name, p.semantics, p.status, str(p.n_rewritten), str(p.n_rejected),
                 f"{(p.duration_s + p.verify_s) * 1e3:.1f}", p.message)
            )
        lines.extend(_table(rows, wrap_last=60))
        if self.sites:
            lines.append("")
            rows = [("pass", "site", "module", "status", "reason")]
            for s in self.sites[:max_sites]:
                reason = s.reason if s.status == REWRITTEN else f"[{s.reason_code}] {s.reason}"
                rows.append((s.pass_name, s.node, s.module_path or "-", s.status, reason))
            lines.extend(_table(rows, wrap_last=70))
            if len(self.sites) > max_sites:
                lines.append(f"... {len(self.sites) - max_sites} more sites (report.to_json() has all)")
        for n in self.notes:
            lines.extend(_wrap(f"note: {n}", 100, "", "      "))
        return "\n".join(lines)


def _wrap(text: str, width: int, first: str = "", rest: str = "") -> list:
    """``text`` wrapped at word boundaries (never cut mid-word; a word longer
    than the width gets a line of its own)."""
    import textwrap

    return textwrap.wrap(" ".join(str(text).split()), width=width, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]


def _table(rows: list, wrap_last: int = 0) -> list:
    """Rows as aligned columns; with ``wrap_last`` the last column is wrapped
    at that width onto continuation lines (words are never cut)."""
    cells = []
    for r in rows:
        last = " ".join(str(r[-1]).split())
        parts = _wrap(last, wrap_last) if wrap_last and len(last) > wrap_last else [last]
        cells.append((list(r[:-1]) + [parts[0]], parts[1:]))
    widths = [max(len(c[0][i]) for c in cells) for i in range(len(rows[0]))]
    out = []
    for j, (r, more) in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        pad = sum(widths[:-1]) + 2 * (len(widths) - 1)
        out.extend(" " * pad + m for m in more)
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _human(x: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f}{unit}"
    return f"{x:.0f}"


def _pct(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f}%"
