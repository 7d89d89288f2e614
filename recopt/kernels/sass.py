"""Read a compiled cubin's SASS: the main loop's instruction mix per score element.

The speed proxy when no GPU is at hand. :func:`loop_stats` disassembles a
cubin with ``nvdisasm`` (shipped in the triton wheel), finds its loops
(backward branches), takes the innermost loop that issues tensor-core
instructions (the score-tile loop of an attention kernel) and counts, per
thread and iteration: all SASS instructions, MUFU (special-function unit)
ops and tensor-core instructions with the multiply-adds they issue.

Per score element = per iteration / (score elements per thread per
iteration) = count * num_warps * 32 / (BLOCK_M * BLOCK_N). The tensor-core
ratio is the multiply-adds the CTA issues per iteration over the minimum the
tile's GEMMs need (1.0: no score tile computed twice). wgmma (HGMMA, sm_90)
and mma.sync (HMMA) shapes are read from the mnemonic; sm_100's tcgen05
instructions (UTC*MMA) are counted but their shapes live in descriptors, so
no ratio is given for them.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Optional

from .compile_check import triton_bin

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRA_TARGET = re.compile(r"\b(?:BRA|JMP|BRX)\b[^`]*`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.(\d)(\d)(\d+)")
_TC = re.compile(r"\b(HGMMA|HMMA|UTC\w*MMA|IMMA|QGMMA|UTCQMMA|UTCHMMA)\b")


@dataclass
class Instr:
    addr: int
    text: str

    @property
    def opcode(self) -> str:
        t = self.text
        if t.startswith("@"):
            t = t.split(None, 1)[1] if " " in t else t
        return t.split()[0] if t.split() else ""


def disassemble(cubin_path: str) -> tuple:
    """(instructions, {label: address}) of a cubin's code."""
    out = subprocess.run([triton_bin("nvdisasm"), "-c", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    instrs, labels, pending = [], {}, []
    for line in out.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append(Instr(addr, m.group(2).strip()))
    return instrs, labels


def loops(instrs, labels) -> list:
    """(start index, end index inclusive) of every loop: a branch to an earlier address.

    Branches placed after the kernel's last ``EXIT`` are out-of-line blocks (ptxas puts
    the slow paths there, e.g. sm_100's mbarrier waits) that jump back into the body:
    not loops. Counting them made a span from the middle of the main loop to the end of
    the function look like the innermost tensor-core loop on sm_100.
    """
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    exits = [i for i, ins in enumerate(instrs) if ins.opcode == "EXIT"]
    last_exit = exits[-1] if exits else len(instrs)
    out = []
    for i, ins in enumerate(instrs):
        if i > last_exit:
            break
        m = _BRA_TARGET.search(ins.text)
        if m and m.group(1) in labels:
            tgt = labels[m.group(1)]
            if tgt <= ins.addr and tgt in index:
                out.append((index[tgt], i))
    return out


def _tc_macs(text: str) -> Optional[int]:
    """Multiply-adds of one tensor-core instruction per issuing unit (warpgroup for HGMMA, warp
    for HMMA); None when the shape is not in the mnemonic."""
    m = _HGMMA.search(text)
    if m:
        a, b, c = (int(x) for x in m.groups())
        return a * b * c
    m = _HMMA.search(text)
    if m:
        a, b, c = (int(x) for x in m.groups())
        return a * b * c
    return None


@dataclass
class LoopStats:
    instructions: int
    mufu: int
    tensor_core: int
    tc_macs_per_cta: Optional[int]  # per iteration, whole CTA
    tc_kind: str
    elems_per_thread: float

    @property
    def instr_per_elem(self) -> float:
        return self.instructions / self.elems_per_thread

    @property
    def mufu_per_elem(self) -> float:
        return self.mufu / self.elems_per_thread


def loop_stats(cubin_path: str, block_m: int, block_n: int, num_warps: int) -> Optional[LoopStats]:
    """Stats of the innermost tensor-core loop (None if the kernel has none)."""
    instrs, labels = disassemble(cubin_path)
    cands = []
    for s, e in loops(instrs, labels):
        body = instrs[s:e + 1]
        tc = [x for x in body if _TC.search(x.text)]
        if tc:
            cands.append((s, e, body, tc))
    # innermost: contains no other candidate loop
    inner = [c for c in cands if not any(o is not c and c[0] <= o[0] and o[1] <= c[1] and
                                         (o[0], o[1]) != (c[0], c[1]) for o in cands)]
    if not inner:
        return None
    s, e, body, tc = max(inner, key=lambda c: (len(c[3]), -len(c[2])))
    kinds = sorted({_TC.search(x.text).group(1) for x in tc})
    macs = [_tc_macs(x.text) for x in tc]
    per_cta = None
    if all(m is not None for m in macs):
        if kinds == ["HGMMA"]:
            per_cta = sum(macs) * max(num_warps // 4, 1)
        elif kinds == ["HMMA"]:
            per_cta = sum(macs) * num_warps
    return LoopStats(
        instructions=len(body),
        mufu=sum(1 for x in body if x.opcode.startswith("MUFU")),
        tensor_core=len(tc),
        tc_macs_per_cta=per_cta,
        tc_kind="+".join(kinds),
        elems_per_thread=block_m * block_n / (num_warps * 32),
    )


def min_macs(kernel: str, block_m: int, block_n: int, block_d: int, block_dv: int) -> int:
    """Multiply-adds one iteration of a GDPA kernel needs: forward S=QK^T, O+=PV; dK/dV:
    S^T, dV+=P^T dO, dP^T=V dO^T, dK+=dS^T Q (``dkdv[dk]``: all but dV, ``dkdv[dv]``: S^T
    and dV); dQ: S, dP=dO V^T, dQ+=dS K; the one-launch backward (``fused``): the dK/dV
    GEMMs and dQ^T = K^T dS (``fused[dkdq]``: all but dV, ``fused[dv]``: S^T and dV)."""
    mn = block_m * block_n
    return {"fwd": mn * (block_d + block_dv),
            "dkdv": mn * (2 * block_d + 2 * block_dv),
            "dkdv[dk]": mn * (2 * block_d + block_dv),
            "dkdv[dv]": mn * (block_d + block_dv),
            "dq": mn * (2 * block_d + block_dv),
            "fused": mn * (3 * block_d + 2 * block_dv),
            "fused[dkdq]": mn * (3 * block_d + block_dv),
            "fused[dv]": mn * (block_d + block_dv)}[kernel]
