"""The reason codes the attention passes emit are the ones they declare and docs/gdpa.md documents."""
import re
from pathlib import Path

import recopt.graph.attention as attention_mod
import recopt.graph.masks as masks_mod
import recopt.passes.gdpa.decompose as decompose_mod
import recopt.passes.gdpa.pffn as pffn_mod
import recopt.passes.gdpa.sdpa as sdpa_mod
import recopt.passes.gdpa_fusion as fusion_mod

ROOT = Path(__file__).resolve().parents[1]


def _emitted(*modules) -> set:
    codes = set()
    for mod in modules:
        src = Path(mod.__file__).read_text()
        codes |= set(re.findall(r'(?:_Reject|Mismatch)\(\s*"(\w+)"', src))
        codes |= set(re.findall(r'rejected\(\s*\w+(?:\.\w+)?,\s*"(\w+)"', src))
        codes |= set(re.findall(r'return \("(\w+)",\s*f?"', src))
    return codes


def _documented() -> set:
    doc = (ROOT / "docs" / "gdpa.md").read_text()
    section = doc.split("## Why a site is rejected", 1)[1].split("\n## ", 1)[0]
    codes = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            codes |= set(re.findall(r"`(\w+)`", first))
    codes |= set(re.findall(r"`(\w+)`", section.split("decompose_attention", 1)[1].split("\n\n", 1)[0]))
    return codes


def test_emitted_codes_are_declared_and_documented():
    emitted = _emitted(fusion_mod, attention_mod, masks_mod, decompose_mod, sdpa_mod, pffn_mod)
    declared = set(fusion_mod.REASONS) | set(decompose_mod.REASONS)
    assert emitted <= declared, f"emitted but not in REASONS: {sorted(emitted - declared)}"
    documented = _documented()
    assert declared == documented, (f"in REASONS, not in docs/gdpa.md: {sorted(declared - documented)}; "
                                    f"documented, not declared: {sorted(documented - declared)}")


def test_site_statuses_are_an_enum_that_reads_as_text():
    import json

    from recopt.report import REJECTED, REWRITTEN, RunStatus, Site, SiteStatus

    s = Site(pass_name="p", node="n", status=REWRITTEN)
    assert s.status is SiteStatus.REWRITTEN and s.status == "rewritten" and f"{s.status}" == "rewritten"
    assert json.loads(json.dumps(s.to_dict()))["status"] == "rewritten"
    assert {x.value for x in SiteStatus} == {"rewritten", "rejected"} and REJECTED == "rejected"
    assert {x.value for x in RunStatus} == {"applied", "no_change", "rolled_back", "failed"}
