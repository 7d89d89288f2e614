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
