"""GDPA kernels' compiled SASS, per kernel and config: the speed proxy without a GPU.

Usage (CPU only; needs triton with its bundled ptxas/nvdisasm)::

    PYTHONPATH=. python benchmarks/kernel_sass.py                  # table, sm_90 and sm_100
    PYTHONPATH=. python benchmarks/kernel_sass.py --check          # exit 1 if a budget fails
    PYTHONPATH=. python benchmarks/kernel_sass.py --json sass.json --md sass.md
    PYTHONPATH=. python benchmarks/kernel_sass.py --kernels dkdv,dq,fused --acts gelu,gelu_tanh \
        --shapes pffn,self_attn_1k_d64                              # the two backwards side by side

For each kernel (forward, backward dK/dV, backward dQ, the one-launch backward), activation and head
size, with the config the launcher picks for the PFFN shape (Tq 1000, Tk 256)
and for 1k self-attention, it compiles from a fresh Triton cache
(:mod:`recopt.kernels.compile_check`) and reads the main loop's SASS
(:mod:`recopt.kernels.sass`): registers, spills, shared memory, SASS
instructions and MUFU ops per score element, tensor-core instructions and
the ratio of issued multiply-adds to the minimum the tile needs (1.0 = no
duplicated score tile).

Budgets (issue #15; docs/benchmarks.md): forward <= 13 instructions per
score element for gelu_tanh and silu, <= 14 for gelu; backward <= 60: dQ +
dK/dV together (two launches), and the one-launch kernel (atomic dQ) alone;
tensor-core ratio 1.0 on sm_90.

The H100 times printed are PREDICTIONS from a simple model, not
measurements: tensor-core time at 70 % of the dense bf16 peak, issue time at
one warp instruction per scheduler per clock (4 per SM), MUFU time at 16 per
SM per clock; predicted range = [max of the three, TC + issue].
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUDGET_FWD = {"gelu_tanh": 13.0, "silu": 13.0, "gelu": 14.0}
BUDGET_BWD = 60.0
ACTS = ("gelu", "gelu_tanh", "silu", "relu", "raw")
# H100 SXM: 132 SMs, ~1.755 GHz sustained boost, 989 TFLOP/s dense bf16 (ANCHORS/targets)
H100 = dict(sms=132, ghz=1.755, tc_tflops=989.0, tc_eff=0.7)
SHAPES = {  # name: (B, H, Tq, Tk, d)
    "pffn": (1152, 4, 1000, 256, 128),
    "self_attn_1k_d64": (512, 4, 1024, 1024, 64),
}


def _specs(archs, kernels=None, acts=ACTS, shapes=None):
    """Dense-variant specs with the config the launcher picks on each arch; ``kernels``
    (fwd, dkdv, dq, fused), ``acts`` and ``shapes`` (pffn, self_attn_1k_d64, d256) narrow it."""
    import dataclasses

    import torch

    from recopt.ops import _gdpa_triton as T

    out = []
    seen = set()
    cases = [("pffn", 1000, 256, 128), ("self_attn_1k_d64", 1024, 1024, 64), ("d256", 1000, 256, 256)]
    cases = [c for c in cases if shapes is None or c[0] in shapes]
    for arch in archs:
        for shape, tq, tk, d in cases:
            bk, bq = T._bwd_config_gpu(tq, tk, d, d, torch.bfloat16, arch)
            for act in acts:
                fcfg = T._fwd_config_gpu(tq, tk, d, d, torch.bfloat16, arch, act=act)
                items = [("fwd", fcfg, (True, True))]
                items += [("dkdv", bk, o) for o in T.dkdv_passes(d, d)]
                items.append(("dq", bq, (True, True)))
                fcfg_b = T._fused_config_gpu(tq, tk, d, d, torch.bfloat16, arch)
                items += [("fused", fcfg_b, o) for o in T.fused_passes(d, d)]
                for kind, cfg, outs in items:
                    if kernels is not None and kind not in kernels:
                        continue
                    s = dataclasses.replace(T._spec(kind, act, "dense", d, torch.bfloat16, cfg, outs),
                                            archs=(arch,))
                    if (s.name, arch) in seen:
                        continue
                    seen.add((s.name, arch))
                    s.tags["shape"] = shape
                    out.append(s)
    return out


TWO_LAUNCH = ("dkdv", "dq")          # kernel kinds of each backward
ONE_LAUNCH = ("fused",)


def _predict_ms(shape: str, kind_stats: dict, act: str):
    """Predicted H100 forward and forward+backward ms for a shape (see module docstring):
    ``fwd_bwd`` with the two-launch backward (9 GEMM-units per score element in all),
    ``fwd_bwd1`` with the one-launch backward (7)."""
    B, H, tq, tk, d = SHAPES[shape]
    elems = B * H * tq * tk
    clk = H100["sms"] * H100["ghz"] * 1e9
    res = {}
    for label, kinds, gemm_units in (("fwd", ("fwd",), 2), ("fwd_bwd", ("fwd", "dkdv", "dq"), 9),
                                     ("fwd_bwd1", ("fwd", "fused"), 7)):
        if any(k not in kind_stats for k in kinds):
            return None
        instr = sum(kind_stats[k]["instr_per_elem"] for k in kinds)
        mufu = sum(kind_stats[k]["mufu_per_elem"] for k in kinds)
        tc = 2.0 * elems * d * gemm_units / (H100["tc_tflops"] * 1e12 * H100["tc_eff"])
        issue = instr * elems / (clk * 128)
        sfu = mufu * elems / (clk * 16)
        res[label] = (1e3 * max(tc, issue, sfu), 1e3 * (tc + issue))
    return res


def run(archs=(90, 100), workers=2, kernels=None, acts=ACTS, shapes=None):
    from recopt.kernels.compile_check import compile_specs

    specs = _specs(archs, kernels, acts, shapes)
    by_name = {(s.name, s.archs[0]): s for s in specs}
    keep = tempfile.mkdtemp(prefix="recopt_sass_")
    results = compile_specs(specs, archs=archs, workers=workers, keep_dir=keep)
    rows = []
    for r in results:
        s = by_name[(r.name, r.arch)]
        t = dict(s.tags)
        row = dict(name=r.name, arch=r.arch, shape=t["shape"], kernel=t["kernel"], act=t["act"], d=t["d"],
                   config=f"{t['BLOCK_M']}x{t['BLOCK_N']} w{t['num_warps']} s{t['num_stages']}",
                   part=r.name.split("/")[0].replace("gdpa_", ""),
                   ok=r.ok, error=r.error, registers=r.registers, spill=r.stack + r.local, shared=r.shared)
        _add_loop_stats(row, r, t)
        rows.append(row)
    return rows


def _add_loop_stats(row: dict, r, t: dict) -> None:
    """Main-loop figures of a compiled kernel's SASS added to its ``row`` (nothing when the
    kernel failed to compile or its loop was not found)."""
    from recopt.kernels.sass import loop_stats, min_macs

    if not r.ok:
        return
    st = loop_stats(r.cubin_path, t["BLOCK_M"], t["BLOCK_N"], t["num_warps"])
    if st is None:
        return
    bd = max(16, 1 << (t["d"] - 1).bit_length())
    need = min_macs(row["part"], t["BLOCK_M"], t["BLOCK_N"], bd, bd)
    row.update(instr_per_elem=round(st.instr_per_elem, 2), mufu_per_elem=round(st.mufu_per_elem, 2),
               tc_instr=st.tensor_core, tc_kind=st.tc_kind,
               tc_ratio=(round(st.tc_macs_per_cta / need, 3) if st.tc_macs_per_cta else None))


def budgets(rows):
    """List of budget violations (strings)."""
    bad = []
    for r in rows:
        if not r["ok"]:
            bad.append(f"{r['name']} sm_{r['arch']}: compile error {r['error']}")
            continue
        if r["spill"] > 0:
            bad.append(f"{r['name']} sm_{r['arch']}: spills {r['spill']} B")
        if r["kernel"] == "fwd" and r["act"] in BUDGET_FWD and r["d"] <= 128 and "instr_per_elem" in r:
            if r["instr_per_elem"] > BUDGET_FWD[r["act"]]:
                bad.append(f"{r['name']} sm_{r['arch']}: {r['instr_per_elem']} instr/elem > "
                           f"{BUDGET_FWD[r['act']]}")
        if r["arch"] == 90 and r.get("tc_ratio") not in (None, 1.0) and r["kernel"] in ("fwd", "dkdv", "dq", "fused"):
            bad.append(f"{r['name']} sm_90: tensor-core ratio {r['tc_ratio']} (duplicated score tiles)")
    for arch in {r["arch"] for r in rows}:
        for shape in {r["shape"] for r in rows}:
            for act in {r["act"] for r in rows}:
                if shape == "d256":
                    continue
                for label, total in backward_totals(rows, arch, shape, act).items():
                    if total is not None and total > BUDGET_BWD:
                        bad.append(f"backward {shape} {act} sm_{arch}: {label} {total:.1f} instr/elem > "
                                   f"{BUDGET_BWD}")
    return bad


def backward_totals(rows, arch, shape, act) -> dict:
    """Main-loop SASS instructions per score element of each backward, summed over its
    launches: ``{"two-launch": dK/dV + dQ, "one-launch": the fused kernel}`` (None when a
    kernel's loop was not found)."""
    out = {}
    for label, kinds in (("two-launch", TWO_LAUNCH), ("one-launch", ONE_LAUNCH)):
        bw = [r for r in rows if r["arch"] == arch and r["shape"] == shape and r["act"] == act
              and r["kernel"] in kinds]
        out[label] = (sum(r["instr_per_elem"] for r in bw)
                      if bw and all("instr_per_elem" in r for r in bw) else None)
    return out


def markdown(rows, versions):
    lines = [f"Predicted from compiled SASS (no GPU run), triton {versions['triton']}, "
             f"torch {versions['torch']}, {versions['date']}.", "",
             "| arch | shape | kernel | act | d | config | regs | spill B | smem KB | instr/elem | MUFU/elem "
             "| TC instr | TC ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["shape"], r["act"], r["part"])):
        lines.append(f"| sm_{r['arch']} | {r['shape']} | {r['part']} | {r['act']} | {r['d']} | {r['config']} | "
                     f"{r['registers']} | {r['spill']} | {r['shared'] / 1024:.0f} | {r.get('instr_per_elem', '-')} | "
                     f"{r.get('mufu_per_elem', '-')} | {r.get('tc_instr', '-')} {r.get('tc_kind', '')} | "
                     f"{r.get('tc_ratio', '-')} |")
    lines += ["", "Backward, main-loop SASS instructions per score element summed over the launches "
              f"(budget {BUDGET_BWD:.0f}; predicted from SASS, not measured):", "",
              "| arch | shape | act | two-launch (dK/dV + dQ) | one-launch (atomic dQ) |", "|---|---|---|---|---|"]
    for arch in sorted({r["arch"] for r in rows}):
        for shape in sorted({r["shape"] for r in rows}):
            for act in ACTS:
                t = backward_totals(rows, arch, shape, act)
                if any(v is not None for v in t.values()):
                    fmt = {k: ("-" if v is None else f"{v:.1f}") for k, v in t.items()}
                    lines.append(f"| sm_{arch} | {shape} | {act} | {fmt['two-launch']} | {fmt['one-launch']} |")
    lines += ["", "Predicted H100 times (model in benchmarks/kernel_sass.py; not measured):", "",
              "| shape | act | forward ms | fwd+bwd ms, two-launch bwd | fwd+bwd ms, one-launch bwd |",
              "|---|---|---|---|---|"]
    for shape in SHAPES:
        for act in ACTS:
            ks = {r["kernel"]: _merge([x for x in rows if x["arch"] == 90 and x["shape"] == shape
                                       and x["act"] == act and x["kernel"] == r["kernel"]])
                  for r in rows if r["arch"] == 90 and r["shape"] == shape and r["act"] == act}
            ks = {k: v for k, v in ks.items() if v is not None}
            p = _predict_ms(shape, ks, act)
            if p:
                lines.append(f"| {shape} {SHAPES[shape]} | {act} | {p['fwd'][0]:.2f}–{p['fwd'][1]:.2f} | "
                             f"{p['fwd_bwd'][0]:.2f}–{p['fwd_bwd'][1]:.2f} | "
                             f"{p['fwd_bwd1'][0]:.2f}–{p['fwd_bwd1'][1]:.2f} |")
    return "\n".join(lines)


def _merge(parts):
    """One kernel kind's launches (d = 256 splits dK/dV, and the one-launch kernel, in two)
    as one row of summed per-element figures; None if a launch lacks them."""
    if not parts or not all("instr_per_elem" in p for p in parts):
        return None
    return dict(instr_per_elem=sum(p["instr_per_elem"] for p in parts),
                mufu_per_elem=sum(p["mufu_per_elem"] for p in parts))


# ----------------------------------------------------------------------------- softmax GDPA
#
# The online-softmax kernels (recopt/kernels/gdpa_softmax.py), plain variant, with the
# configs the launcher picks: `python benchmarks/kernel_sass.py --softmax`. Budgets: no
# spills on sm_90, tensor-core ratio 1.0 on sm_90 (no duplicated score tile). Instructions
# and MUFU (exp2) per score element are reported, not budgeted.

SOFTMAX_SHAPES = {  # name: (B, H, Tq, Tk, d)
    "softmax_1k_d64": (512, 4, 1024, 1024, 64),
    "softmax_256_d128": (512, 4, 256, 256, 128),
}


def softmax_specs(archs):
    import dataclasses

    import torch

    from recopt.ops import _gdpa_softmax_triton as S

    out, seen = [], set()
    for arch in archs:
        for shape, (_, _, tq, tk, d) in SOFTMAX_SHAPES.items():
            items = [("fwd", S._fwd_config_gpu(tq, tk, d, d, torch.bfloat16, arch), (True, True))]
            bk, bq = S._bwd_config_gpu(tq, tk, d, d, torch.bfloat16, arch)
            items += [("dkdv", bk, o) for o in S.dkdv_passes(d, d)] + [("dq", bq, (True, True))]
            for kind, cfg, outs in items:
                s = dataclasses.replace(S._spec(kind, "dense", d, torch.bfloat16, cfg, outs), archs=(arch,))
                if (s.name, arch) not in seen:
                    seen.add((s.name, arch))
                    s.tags["shape"] = shape
                    out.append(s)
    return out


def run_softmax(archs=(90,), workers=2):
    """Rows like :func:`run` (act "softmax") for the softmax kernels."""
    from recopt.kernels.compile_check import compile_specs

    specs = softmax_specs(archs)
    by_name = {(s.name, s.archs[0]): s for s in specs}
    results = compile_specs(specs, archs=archs, workers=workers, keep_dir=tempfile.mkdtemp(prefix="recopt_sass_"))
    rows = []
    for r in results:
        t = dict(by_name[(r.name, r.arch)].tags)
        part = r.name.split("/")[0].replace("gdpa_softmax_", "")
        row = dict(name=r.name, arch=r.arch, shape=t["shape"], kernel=t["kernel"], act="softmax", d=t["d"],
                   config=f"{t['BLOCK_M']}x{t['BLOCK_N']} w{t['num_warps']} s{t['num_stages']}", part=part,
                   ok=r.ok, error=r.error, registers=r.registers, spill=r.stack + r.local, shared=r.shared)
        _add_loop_stats(row, r, t)
        rows.append(row)
    return rows


def softmax_budgets(rows):
    bad = []
    for r in rows:
        if not r["ok"]:
            bad.append(f"{r['name']} sm_{r['arch']}: compile error {r['error']}")
        elif r["spill"] > 0:    # sm_90 and sm_100: the softmax kernels have no known spills
            bad.append(f"{r['name']} sm_{r['arch']}: spills {r['spill']} B")
        elif r["arch"] == 90 and r.get("tc_ratio") not in (None, 1.0):
            bad.append(f"{r['name']} sm_90: tensor-core ratio {r['tc_ratio']} (duplicated score tiles)")
    return bad


def softmax_markdown(rows, versions):
    lines = [f"Softmax GDPA kernels, predicted from compiled SASS (no GPU run), triton {versions['triton']}, "
             f"torch {versions['torch']}, {versions['date']}.", "",
             "| arch | shape | kernel | d | config | regs | spill B | smem KB | instr/elem | MUFU/elem "
             "| TC instr | TC ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["shape"], r["part"])):
        lines.append(f"| sm_{r['arch']} | {r['shape']} | {r['part']} | {r['d']} | {r['config']} | "
                     f"{r['registers']} | {r['spill']} | {r['shared'] / 1024:.0f} | {r.get('instr_per_elem', '-')} | "
                     f"{r.get('mufu_per_elem', '-')} | {r.get('tc_instr', '-')} {r.get('tc_kind', '')} | "
                     f"{r.get('tc_ratio', '-')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--check", action="store_true", help="exit 1 when a budget is exceeded")
    ap.add_argument("--softmax", action="store_true", help="the softmax GDPA kernels instead")
    ap.add_argument("--kernels", help="comma list of fwd,dkdv,dq,fused (default all)")
    ap.add_argument("--acts", help=f"comma list of activations (default {','.join(ACTS)})")
    ap.add_argument("--shapes", help="comma list of pffn,self_attn_1k_d64,d256 (default all)")
    a = ap.parse_args(argv)
    import torch
    import triton

    versions = dict(triton=triton.__version__, torch=torch.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    if a.softmax:
        rows = run_softmax(tuple(a.arch or (90,)), a.workers)
        md, bad = softmax_markdown(rows, versions), softmax_budgets(rows)
        print(md)
        print("\nbudget violations:" if bad else "\nall budgets met", *bad, sep="\n")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(versions=versions, rows=rows, violations=bad), f, indent=1)
        if a.md:
            with open(a.md, "w") as f:
                f.write(md + "\n")
        return 1 if (a.check and bad) else 0
    split = lambda x: tuple(x.split(",")) if x else None  # noqa: E731
    rows = run(tuple(a.arch or (90, 100)), a.workers, split(a.kernels), split(a.acts) or ACTS, split(a.shapes))
    md = markdown(rows, versions)
    print(md)
    bad = budgets(rows)
    print("\nbudget violations:" if bad else "\nall budgets met", *bad, sep="\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(versions=versions, rows=rows, violations=bad), f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
