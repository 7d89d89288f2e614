"""GDPA benchmark: every variant side by side, one process, one table.

Usage (GPU; fits one ~6 minute call on an H100)::

    PYTHONPATH=. python benchmarks/gdpa_bench.py --out gdpa_bench.json
    PYTHONPATH=. python benchmarks/gdpa_bench.py --quick          # no torch.compile rows

Without CUDA it runs a tiny CPU smoke test of the same code paths (the
reference op vs eager) so the script is checked in CI; those numbers say
nothing about GPU speed.

Per shape (B, H, Tq, Tk, d, activation) it times, forward and forward+backward,
median of ``triton.testing.do_bench`` (ms):

- ``eager``: ``act(q @ kᵀ * s) @ v`` in plain PyTorch;
- ``compile``: the same function under ``torch.compile``;
- ``sdpa_softmax``: ``F.scaled_dot_product_attention`` (flash) — the softmax
  reference point at the same shape;
- ``gdpa``: ``recopt.ops.gdpa`` (Triton kernels) on dense inputs;
- ``gdpa_padded_len`` / ``gdpa_jagged``: lengths uniform in [T/2, T]: the dense
  op on padded inputs with lengths, and the jagged op on the same data; the
  jagged speed-up is measured against ``gdpa`` on the full padded input.

Also peak memory of forward+backward (GDPA vs SDPA) and a correctness check
of GDPA against eager in fp32 on a slice of the batch. Targets (issue #4) are
printed next to the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from recopt.ops import gdpa, gdpa_jagged  # noqa: E402
from recopt.ops import gdpa_ref as R  # noqa: E402

GPU_SHAPES = [
    # name, B, H, Tq, Tk, d, activation, targets (ms) {fwd, fwd_bwd}
    ("pffn_kunlun", 1152, 4, 1000, 256, 128, "gelu_tanh", {"fwd": 1.6, "fwd_bwd": 8.5}),
    ("self_attn_1k", 512, 4, 1024, 1024, 64, "gelu", {"fwd": 1.5}),
    ("small_256", 2048, 2, 256, 256, 64, "gelu_tanh", {}),
]
CPU_SHAPES = [("cpu_smoke", 2, 2, 48, 32, 16, "gelu_tanh", {})]


def eager_attn(q, k, v, act, scale):
    return R.act_fwd(torch.matmul(q, k.transpose(-2, -1)) * scale, act) @ v


def _bench(fn, grad_tensors=(), cuda=True):
    if cuda:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_tensors)))
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t) / 3 * 1e3


def _fwd_bwd(f, q, k, v, g):
    def run():
        f(q, k, v).backward(g)
    return run


def _peak_mem(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _lengths(B, T, gen, device):
    return torch.randint(T // 2, T + 1, (B,), generator=gen).to(device)


def run_shape(spec, device, dtype, quick, deadline):
    name, B, H, Tq, Tk, d, act, targets = spec
    cuda = device == "cuda"
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, H, Tq, d), mk(B, H, Tk, d), mk(B, H, Tk, d)
    g = mk(B, H, Tq, d)
    scale = 1.0 / math.sqrt(d)
    for t in (q, k, v):
        t.requires_grad_(True)
    rows = {}

    def timed(label, f, with_bwd=True):
        if time.time() > deadline:
            rows[label] = {"skipped": "time budget"}
            return
        try:
            with torch.no_grad():
                fwd = _bench(lambda: f(q, k, v), cuda=cuda)
            fb = _bench(_fwd_bwd(f, q, k, v, g), (q, k, v), cuda=cuda) if with_bwd else None
            rows[label] = {"fwd_ms": fwd, "fwd_bwd_ms": fb}
        except Exception as e:  # report and keep going: one broken variant must not hide the rest
            rows[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    eager = lambda q, k, v: eager_attn(q, k, v, act, scale)  # noqa: E731
    ours = lambda q, k, v: gdpa(q, k, v, activation=act, pre_scale=scale)  # noqa: E731
    # GDPA rows first: the time budget must never skip the numbers this script exists for.
    timed("gdpa", ours)
    timed("sdpa_softmax", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale))
    timed("eager", eager)

    # jagged vs padded with lengths uniform in [T/2, T]
    ql, kl = _lengths(B, Tq, gen, device), _lengths(B, Tk, gen, device)
    timed("gdpa_padded_len", lambda q, k, v: gdpa(q, k, v, activation=act, pre_scale=scale,
                                                  q_lengths=ql, kv_lengths=kl))
    qo = torch.cat([ql.new_zeros(1), ql.cumsum(0)])
    ko = torch.cat([kl.new_zeros(1), kl.cumsum(0)])
    qmask = torch.arange(Tq, device=device)[None, :] < ql[:, None]
    kmask = torch.arange(Tk, device=device)[None, :] < kl[:, None]
    with torch.no_grad():
        qj = q.detach().transpose(1, 2)[qmask].contiguous().requires_grad_(True)
        kj = k.detach().transpose(1, 2)[kmask].contiguous().requires_grad_(True)
        vj = v.detach().transpose(1, 2)[kmask].contiguous().requires_grad_(True)
        gj = g.transpose(1, 2)[qmask].contiguous()
    mq, mk_ = int(ql.max()), int(kl.max())
    fj = lambda: gdpa_jagged(qj, kj, vj, qo, ko, mq, mk_, activation=act, pre_scale=scale)  # noqa: E731
    if time.time() <= deadline:
        try:
            with torch.no_grad():
                fwd = _bench(fj, cuda=cuda)
            fb = _bench(lambda: fj().backward(gj), (qj, kj, vj), cuda=cuda)
            rows["gdpa_jagged"] = {"fwd_ms": fwd, "fwd_bwd_ms": fb}
        except Exception as e:
            rows["gdpa_jagged"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    if not quick and cuda:
        timed("compile", torch.compile(eager))

    extra = {}
    if cuda:
        try:
            extra["peak_mem_mib"] = {
                "gdpa": _peak_mem(_fwd_bwd(ours, q, k, v, g)),
                "sdpa_softmax": _peak_mem(_fwd_bwd(
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale), q, k, v, g)),
            }
        except Exception as e:
            extra["peak_mem_mib"] = {"error": str(e)[:200]}
    # correctness on a slice, fp32
    nb = min(B, 4)
    qs, ks, vs = (t.detach()[:nb].float() for t in (q, k, v))
    want = eager_attn(qs, ks, vs, act, scale)
    got = gdpa(qs, ks, vs, activation=act, pre_scale=scale)
    extra["rel_err_fp32_vs_eager"] = float((got - want).norm() / want.norm())
    got_lp = gdpa(q.detach()[:nb], k.detach()[:nb], v.detach()[:nb], activation=act, pre_scale=scale)
    extra[f"rel_err_{str(dtype).replace('torch.', '')}_vs_fp32_eager"] = float(
        (got_lp.float() - want).norm() / want.norm())
    flops = 4 * B * H * Tq * Tk * d
    return {"shape": dict(name=name, B=B, H=H, Tq=Tq, Tk=Tk, d=d, activation=act),
            "flops_fwd": flops, "targets_ms": targets, "rows": rows, **extra}


def print_table(results):
    hdr = f"{'shape':<14}{'variant':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd TF/s':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        fl = r["flops_fwd"]
        for label, row in r["rows"].items():
            if "fwd_ms" not in row:
                print(f"{r['shape']['name']:<14}{label:<18}{str(row)[:60]}")
                continue
            fb = row["fwd_bwd_ms"]
            print(f"{r['shape']['name']:<14}{label:<18}{row['fwd_ms']:>10.3f}"
                  f"{(f'{fb:.3f}' if fb is not None else '-'):>12}{fl / row['fwd_ms'] / 1e9:>10.1f}")
        rows = r["rows"]
        notes = []
        if "fwd_ms" in rows.get("gdpa", {}) and "fwd_ms" in rows.get("gdpa_jagged", {}):
            notes.append(f"jagged speed-up vs padded: {rows['gdpa']['fwd_ms'] / rows['gdpa_jagged']['fwd_ms']:.2f}x fwd, "
                         f"{rows['gdpa']['fwd_bwd_ms'] / rows['gdpa_jagged']['fwd_bwd_ms']:.2f}x fwd+bwd (target >= 1.6x)")
        mem = r.get("peak_mem_mib", {})
        if "gdpa" in mem and "sdpa_softmax" in mem and mem["sdpa_softmax"]:
            notes.append(f"peak mem fwd+bwd gdpa/sdpa: {mem['gdpa'] / mem['sdpa_softmax']:.2f} (target <= 1.2)")
        if r["targets_ms"]:
            notes.append(f"targets: {r['targets_ms']}")
        notes.append(f"rel err fp32 vs eager: {r['rel_err_fp32_vs_eager']:.2e}")
        for n in notes:
            print(f"{'':<14}{n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gdpa_bench.json")
    ap.add_argument("--quick", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new variants after this")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    deadline = time.time() + args.budget_s
    results = [run_shape(s, device, dtype, args.quick, deadline) for s in shapes]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": str(dtype),
        "backend": os.environ.get("RECOPT_GDPA_BACKEND", "auto"),
    }
    print(json.dumps(meta))
    print_table(results)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
