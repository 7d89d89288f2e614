"""recopt.kernels.sass: finding the main loop in disassembled SASS (no compile needed)."""
from recopt.kernels.sass import Instr, loops


def _prog(lines):
    """Instructions at addresses 0x10, 0x20, ...; a line 'L:' labels the next instruction."""
    instrs, labels, pending = [], {}, []
    for line in lines:
        if line.endswith(":"):
            pending.append(line[:-1])
            continue
        addr = 0x10 * (len(instrs) + 1)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append(Instr(addr, line))
    return instrs, labels


def test_out_of_line_blocks_after_exit_are_not_loops():
    """sm_100 cubins put slow paths after EXIT that branch back into the body; only the real
    back edge (inside the code before the last EXIT) is a loop."""
    instrs, labels = _prog([
        "MOV R1, R2",
        ".L_x_1:",
        "UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], tmem[UR10], idesc[UR12], UPT",
        ".L_x_2:",
        "MUFU.EX2 R3, R4",
        "@P0 BRA `(.L_x_9)",
        ".L_x_3:",
        "FFMA R5, R6, R7, R8",
        "@P1 BRA `(.L_x_1)",
        "EXIT",
        ".L_x_9:",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R9",
        "BRA `(.L_x_3)",
    ])
    found = loops(instrs, labels)
    assert found == [(1, 5)], found          # UTCHMMA .. the @P1 BRA back to .L_x_1


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_sass.py"
    spec = importlib.util.spec_from_file_location("kernel_sass_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(kernel, part, instr, arch=90, shape="pffn", act="gelu"):
    return dict(name=f"gdpa_{part}/{act}", arch=arch, shape=shape, kernel=kernel, act=act, d=128, part=part,
                ok=True, spill=0, instr_per_elem=instr, mufu_per_elem=1.0, tc_ratio=1.0)


def test_backward_budget_counts_each_backward_over_its_launches():
    """The 60-instruction backward budget applies to dK/dV + dQ (two launches) and, separately,
    to the one-launch kernel summed over its launches (d = 256: dK + dQ, then dV)."""
    ks = _bench()
    rows = [_row("dkdv", "dkdv", 30.0), _row("dq", "dq", 25.0), _row("fused", "fused", 61.0)]
    assert ks.backward_totals(rows, 90, "pffn", "gelu") == {"two-launch": 55.0, "one-launch": 61.0}
    bad = ks.budgets(rows)
    assert len(bad) == 1 and "one-launch 61.0" in bad[0]
    split = [_row("fused", "fused[dkdq]", 40.0), _row("fused", "fused[dv]", 15.0)]
    assert ks.backward_totals(split, 90, "pffn", "gelu")["one-launch"] == 55.0
    assert ks.backward_totals(split, 90, "pffn", "gelu")["two-launch"] is None


def test_min_macs_of_the_one_launch_backward():
    from recopt.kernels.sass import min_macs

    # S, dP, dK, dQ over d and dV over dv: 3 d + 2 dv per score element; the d = 256 split
    assert min_macs("fused", 16, 128, 64, 32) == 16 * 128 * (3 * 64 + 2 * 32)
    assert min_macs("fused[dkdq]", 16, 128, 64, 64) + min_macs("fused[dv]", 16, 128, 64, 64) == \
        16 * 128 * 64 * 6
