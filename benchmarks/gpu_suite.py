"""The whole GPU check in one command (about 6 minutes on one H100/H200/B200).

Usage, on the GPU image (torch, triton; torchrec not needed)::

    PYTHONPATH=. python benchmarks/gpu_suite.py --out gpu_suite.json --md gpu_suite.md
    PYTHONPATH=. python benchmarks/gpu_suite.py --dry-run        # plan + report on any machine
    PYTHONPATH=. python benchmarks/gpu_suite.py --sections correctness,gdpa

Sections, in this order (each isolated: an exception is recorded in the
report and the next section runs; a section past the time budget is skipped
and says so):

1. ``correctness``: every Triton kernel against its PyTorch reference on the
   GPU — GDPA forward and backward for every activation, dense / lengths /
   jagged / window / causal / bias / GQA, bf16 and fp32; the fused FP8
   quantize kernel. Run first: a fast wrong kernel is worth nothing.
2. ``gdpa``: ``benchmarks/gdpa_bench.py`` shapes — the PFFN shape (B 1152,
   H 4, Tq 1000, Tk 256, d 128, bf16) and 1k self-attention d 64 gelu:
   recopt vs eager, torch.compile and SDPA (softmax flash), forward and
   forward+backward, and jagged at lengths U[T/2, T] vs padded.
3. ``fp8``: the FP8 GEMM tables (``benchmarks/fp8_bench.py``, or the FP8
   package's own benchmark functions when it provides ``recopt.fp8.bench``).
4. ``softmax``: softmax GDPA on its fused path (the online-softmax Triton
   kernels, :mod:`recopt.ops.gdpa_softmax`): correctness against the reference
   first (lengths, causal, window, GQA, -1e9 / -inf padding masks with their
   fully-masked rows, boolean masks; values and gradients), then time on padded
   input with lengths U[T/2, T] against SDPA flash (no mask, over the padding),
   SDPA with a boolean mask and the model's own math with a float mask. With
   ``--dry-run`` under ``TRITON_INTERPRET=1`` the correctness cases run on the
   CPU at small shapes (the kernels' code path, no timing).
5. ``train``: the bundled Kunlun and InterFormer train steps (forward,
   backward, SGD step) — eager, torch.compile and recopt.optimize —
   side by side, interleaved, medians.
6. ``inference``: the bundled Kunlun's eval forward at a small batch
   (run-time overhead dominates there) — eager, recopt with Inductor, and
   recopt with Inductor + CUDA graphs (``optimize(cuda_graphs=True)``),
   outputs checked against eager first (:func:`inference_section`).

The report (JSON and a markdown table) records the card, torch/triton/CUDA
versions and the date. Imports nothing that needs torchrec.
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
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SECTIONS = ("correctness", "gdpa", "softmax", "fp8", "train", "inference")
# Seconds per section; a section stops starting new work past its budget. The sum stays
# at 5.5 min so the whole suite (a compile can overrun its section) fits the 6-minute
# slot a lent GPU gives one command.
BUDGET_S = {"correctness": 45.0, "gdpa": 100.0, "softmax": 35.0, "fp8": 50.0, "train": 60.0,
            "inference": 40.0}
TOTAL_BUDGET_S = 330.0
GDPA_SHAPES = ("pffn_kunlun", "self_attn_1k")  # names in benchmarks/gdpa_bench.py GPU_SHAPES


# ----------------------------------------------------------------------------- environment


def environment() -> dict:
    """Card, versions, date: what every number in the report was measured on."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
        if torch.cuda.is_available():
            env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
    except Exception as e:  # recorded, not fatal: the report still says what is known
        env["torch_error"] = repr(e)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable ({type(e).__name__})"
    return env


# ----------------------------------------------------------------------------- correctness


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not bool(a.isfinite().all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def correctness(device: str, small: bool = False) -> dict:
    """Every kernel vs its reference; returns {case: {"rel": ..., "tol": ..., "ok": bool}}."""
    import torch

    from recopt.ops import _gdpa_triton as T
    from recopt.ops import gdpa_ref as R

    out = {}
    g = torch.Generator().manual_seed(0)

    def rnd(*s, dtype):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    B, H, Hkv, Tq, Tk, d = (2, 2, 1, 37, 29, 16) if small else (3, 4, 2, 300, 257, 128)
    variants = {
        "dense": {}, "lengths": dict(q_len=True, k_len=True), "window": dict(window=17),
        "causal": dict(causal=True, k_len=True), "bias": dict(bias=True), "gqa": dict(gqa=True),
    }
    acts = sorted(R.ACTIVATIONS)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for act in acts:
            for vname, var in variants.items():
                if act not in ("gelu", "gelu_tanh", "silu") and vname not in ("dense", "lengths"):
                    continue
                case = f"gdpa/{vname}/{act}/{str(dtype).replace('torch.', '')}"
                try:
                    hkv = Hkv if var.get("gqa") else H
                    q, k, v = rnd(B, H, Tq, d, dtype=dtype), rnd(B, hkv, Tk, d, dtype=dtype), \
                        rnd(B, hkv, Tk, d, dtype=dtype)
                    ql = torch.randint(0, Tq + 1, (B,), generator=g).to(device) if var.get("q_len") else None
                    kl = torch.randint(0, Tk + 1, (B,), generator=g).to(device) if var.get("k_len") else None
                    bias = rnd(1, H, Tq, Tk, dtype=dtype) if var.get("bias") else None
                    kw = dict(activation=act, qk_scale=0.8, pre_scale=1.0 / math.sqrt(d),
                              window=var.get("window", -1))
                    extra = dict(causal=var.get("causal", False), bias=bias)
                    o = T.gdpa_fwd(q, k, v, q_lengths=ql, kv_lengths=kl, **kw, **extra)
                    go = rnd(*o.shape, dtype=dtype)
                    # both backwards (one launch with atomic dQ, two launches), whichever the call picks
                    grads_by = [T.gdpa_bwd(go, q, k, v, q_lengths=ql, kv_lengths=kl, bias_grad=bias is not None,
                                           kernel=kern, **kw, **extra) for kern in T.BWD_KERNELS]
                    qq, kk, vv = (t.float().requires_grad_() for t in (q, k, v))
                    bb = bias.float().requires_grad_() if bias is not None else None
                    ref = _reference(R, qq, kk, vv, ql, kl, bb, var.get("causal", False), **kw)
                    ref.backward(go.float())
                    want = (qq.grad, kk.grad, vv.grad) + ((bb.grad,) if bb is not None else ())
                    errs = [_rel(o, ref)] + [_rel(a, b) for grads in grads_by for a, b in zip(grads, want)]
                    out[case] = {"rel": max(errs), "tol": tol, "ok": max(errs) <= tol}
                except Exception as e:
                    out[case] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}
    try:
        from recopt.fp8.fused_quant import blocknorm_quant, blocknorm_quant_reference

        x = rnd(64 if small else 4096, 1024, dtype=torch.bfloat16)
        q8, s8, y8 = blocknorm_quant(x, 256, use_triton=(device == "cuda") or None)
        qr, sr, yr = blocknorm_quant_reference(x, 256)
        err = _rel(q8.float() * s8, qr.float() * sr)
        out["fp8/blocknorm_quant/bf16"] = {"rel": err, "tol": 1e-2, "ok": err <= 1e-2}
    except Exception as e:
        out["fp8/blocknorm_quant/bf16"] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}
    return out


def _reference(R, q, k, v, q_len, k_len, bias, causal, activation, qk_scale, pre_scale, window):
    """fp32 reference incl. causal (j <= i) and an additive bias (gdpa_ref has neither)."""
    import torch

    if bias is None and not causal:
        return R.gdpa_ref(q, k, v, q_len, k_len, activation, qk_scale, pre_scale, window)
    Bn, H, Tq, _ = q.shape
    Tk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * pre_scale
    if bias is not None:
        s = s + bias.float()
    i = torch.arange(Tq, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if window >= 0:
        keep &= (i - j).abs() <= window
    if causal:
        keep &= j <= i
    keep = keep[None, None]
    if k_len is not None:
        keep = keep & (j[None, None] < k_len.view(-1, 1, 1, 1))
    o = (R.act_fwd(torch.where(keep, s, 0.0), activation) * qk_scale) @ v
    if q_len is not None:
        o = torch.where(i[None, None] < q_len.view(-1, 1, 1, 1), o, 0.0)
    return o


# ----------------------------------------------------------------------------- softmax GDPA


class _backend:
    """Force RECOPT_GDPA_BACKEND for a block (the op reads it per call)."""

    def __init__(self, value):
        self.value, self.old = value, None

    def __enter__(self):
        self.old = os.environ.get("RECOPT_GDPA_BACKEND")
        os.environ["RECOPT_GDPA_BACKEND"] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("RECOPT_GDPA_BACKEND", None)
        else:
            os.environ["RECOPT_GDPA_BACKEND"] = self.old


def _softmax_cases(small: bool):
    """name -> (B, H, Hkv, Tq, Tk, d, gdpa kwargs builder(device, gen))."""
    import torch

    B, H, T, d = (3, 2, 19, 12) if small else (4, 4, 300, 128)

    def lengths(device, gen, lo=0):
        t = torch.randint(lo, T + 1, (B,), generator=gen)
        t[0], t[-1] = 0, 1           # an empty and a length-1 sequence
        return t.to(device)

    def pad_mask(fill):
        def build(device, gen):
            lens = lengths(device, gen)
            pad = torch.arange(T, device=device)[None, :] >= lens[:, None]
            mask = torch.zeros(B, 1, 1, T, device=device).masked_fill(pad[:, None, None, :], fill)
            return dict(attn_mask=mask, masked_rows="uniform" if fill == -1e9 else "nan")
        return build

    cases = {
        "lengths": (B, H, H, T, T, d, lambda dev, g: dict(q_lengths=lengths(dev, g), kv_lengths=lengths(dev, g))),
        "causal_gqa": (B, H, 1, T, T, d, lambda dev, g: dict(causal=True, kv_lengths=lengths(dev, g, 1))),
        "window": (B, H, H, T, T, d, lambda dev, g: dict(window=7, kv_lengths=lengths(dev, g))),
        "pad_-1e9_uniform": (B, H, H, T, T, d, pad_mask(-1e9)),
        "pad_-inf_nan": (B, H, H, T, T, d, pad_mask(float("-inf"))),
    }
    if small:
        return {k: cases[k] for k in ("lengths", "causal_gqa", "pad_-1e9_uniform")}
    cases["bool_mask"] = (B, H, H, T, T, d, lambda dev, g: dict(
        attn_mask=torch.rand(B, 1, T, T, generator=g).to(dev) > 0.3))
    return cases


def softmax_correctness(device: str, small: bool = False) -> dict:
    """Softmax GDPA through the kernels (forced) vs the reference: {case: {"rel", "tol", "ok"}}."""
    import torch

    from recopt.ops import gdpa

    out = {}
    g = torch.Generator().manual_seed(1)
    dtypes = ((torch.float32, 2e-5),) if small else ((torch.float32, 1e-4), (torch.bfloat16, 2e-2))
    for dtype, tol in dtypes:
        for name, (B, H, Hkv, Tq, Tk, d, build) in _softmax_cases(small).items():
            case = f"gdpa_softmax/{name}/{str(dtype).replace('torch.', '')}"
            try:
                q = torch.randn(B, H, Tq, d, generator=g).to(device, dtype)
                k = torch.randn(B, Hkv, Tk, d, generator=g).to(device, dtype)
                v = torch.randn(B, Hkv, Tk, d, generator=g).to(device, dtype)
                go = torch.randn(B, H, Tq, d, generator=g).to(device, dtype)
                kw = dict(build(device, g), pre_scale=1.0 / math.sqrt(d), qk_scale=0.9)
                nan_rows = kw.get("masked_rows") == "nan"
                res = []
                for backend, cast in (("triton", lambda t: t), ("reference", lambda t: t.float())):
                    leaves = [cast(t).clone().requires_grad_() for t in (q, k, v)]
                    with _backend(backend):
                        o = gdpa(*leaves, activation="softmax", **kw)
                        if not nan_rows:
                            o.backward(cast(go))
                    res.append([o.detach()] + ([t.grad for t in leaves] if not nan_rows else []))
                if not all(bool(torch.equal(a.isnan(), b.isnan())) for a, b in zip(*res)):
                    out[case] = {"error": "NaN positions differ from the reference", "ok": False}
                    continue
                errs = [_rel(a.nan_to_num(0.0), b.nan_to_num(0.0)) for a, b in zip(*res)]
                out[case] = {"rel": max(errs), "tol": tol, "ok": max(errs) <= tol}
            except Exception as e:
                out[case] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}
    return out


SOFTMAX_SHAPES = (   # name, B, H, T, d, causal
    ("kunlun_seq_256", 512, 4, 256, 64, False),
    ("self_attn_1k_causal", 64, 8, 1024, 64, True),
)


def softmax_timing(device: str, deadline: float, small: bool = False) -> dict:
    """Forward and forward+backward ms on padded input with lengths U[T/2, T], bf16."""
    import torch
    import torch.nn.functional as F

    import gdpa_bench as GB
    from recopt.ops import gdpa

    res = {}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = (("cpu_smoke", 2, 2, 24, 16, True),) if small else SOFTMAX_SHAPES
    for name, B, H, T, d, causal in shapes:
        if time.time() > deadline:
            res[name] = {"skipped": "time budget"}
            continue
        gen = torch.Generator().manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
        q, k, v = mk(B, H, T, d), mk(B, H, T, d), mk(B, H, T, d)
        go = torch.randn(B, H, T, d, generator=gen).to(device=device, dtype=dtype)
        lens = torch.randint(T // 2, T + 1, (B,), generator=gen).to(device)
        pad = torch.arange(T, device=device)[None, :] >= lens[:, None]
        fmask = torch.zeros(B, 1, 1, T, device=device, dtype=dtype).masked_fill(pad[:, None, None, :], -1e9)
        keep = ~pad[:, None, None, :]
        if causal:
            keep = keep & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        scale = 1.0 / math.sqrt(d)

        def model_math(q, k, v):
            s = (q @ k.transpose(-1, -2)) * scale + fmask
            if causal:
                s = s.masked_fill(~keep, -1e9)
            return torch.softmax(s.float(), -1).to(q.dtype) @ v

        variants = {
            "recopt_kernel_lengths": lambda q, k, v: gdpa(q, k, v, activation="softmax", pre_scale=scale,
                                                          kv_lengths=lens, causal=causal),
            "recopt_kernel_float_mask": lambda q, k, v: gdpa(q, k, v, activation="softmax", pre_scale=scale,
                                                             attn_mask=fmask, causal=causal,
                                                             masked_rows="uniform"),
            "sdpa_flash_padded_no_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                                         is_causal=causal),
            "sdpa_bool_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale),
            "model_math_float_mask": model_math,
        }
        rows = {}
        with _backend("triton" if device != "cuda" else "auto"):
            for label, f in variants.items():
                if time.time() > deadline:
                    rows[label] = {"skipped": "time budget"}
                    continue
                try:
                    with torch.no_grad():
                        fwd = GB._bench(lambda: f(q, k, v), cuda=device == "cuda")
                    fb = GB._bench(lambda: f(q, k, v).backward(go), (q, k, v), cuda=device == "cuda")
                    rows[label] = {"fwd_ms": fwd, "fwd_bwd_ms": fb}
                except Exception as e:  # one broken variant must not hide the rest
                    rows[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        res[name] = {"shape": dict(B=B, H=H, T=T, d=d, causal=causal, dtype=str(dtype)), "rows": rows}
    return res


def softmax_section(device: str, deadline: float, small: bool = False) -> dict:
    """Correctness first (a wrong kernel is not timed), then timing."""
    corr = softmax_correctness(device, small)
    out = {"correctness": corr}
    bad = [k for k, v in corr.items() if not v.get("ok")]
    if bad:
        out["timing"] = {"skipped": f"correctness failed for {bad[:5]}"}
    else:
        out["timing"] = softmax_timing(device, deadline, small)
    return out


# ----------------------------------------------------------------------------- timing sections


def gdpa_section(device: str, deadline: float, quick: bool) -> dict:
    import torch

    import gdpa_bench as GB

    specs = {s[0]: s for s in getattr(GB, "GPU_SHAPES", [])}
    res = {}
    for name in GDPA_SHAPES:
        spec = specs.get(name)
        if spec is None:
            res[name] = {"error": f"gdpa_bench has no shape {name!r} (has {sorted(specs)})"}
            continue
        if time.time() > deadline:
            res[name] = {"skipped": "time budget"}
            continue
        try:
            res[name] = GB.run_shape(spec, device, torch.bfloat16, quick, deadline)
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return res


def fp8_section(device: str, deadline: float) -> dict:
    try:
        import recopt.fp8.bench as FB  # the FP8 package's own tables, when it has them

        return {"source": "recopt.fp8.bench", "result": FB.run(device=device, deadline=deadline)}
    except ImportError:
        pass
    import fp8_bench as F8

    shapes = getattr(F8, "SHAPES", None) or getattr(F8, "GEMM_SHAPES", None)
    if shapes is None:
        return {"error": "benchmarks/fp8_bench.py has no SHAPES/GEMM_SHAPES table"}
    rows = F8.gemm_table(device, shapes, deadline)
    return {"source": "benchmarks/fp8_bench.py", "rows": rows}


def train_section(device: str, deadline: float, batch: int, steps: int) -> dict:
    """Train steps of the bundled Kunlun and InterFormer: eager, torch.compile, recopt."""
    import torch

    from recopt.bench import Variant, compare
    from recopt.data import example_batch
    from recopt.examples_factory import movielens_like_spec
    from recopt.models import build_model

    out = {}
    for name in ("kunlun", "interformer"):
        if time.time() > deadline:
            out[name] = {"skipped": "time budget"}
            continue
        try:
            spec = movielens_like_spec()
            inputs = tuple(t.to(device) for t in example_batch(spec, batch_size=batch).inputs())
            variants = []
            for label in ("eager", "torch.compile", "recopt"):
                torch.manual_seed(0)
                model = build_model(name, spec).to(device).train()
                if label == "torch.compile":
                    fn = torch.compile(model)
                elif label == "recopt":
                    import recopt

                    fn = recopt.optimize(model, inputs, target="auto")
                else:
                    fn = model
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                variants.append(Variant(label, _train_step(fn, opt, inputs)))
            out[name] = _result_dict(compare(variants, repeats=steps, progress=False))
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                         "trace": traceback.format_exc(limit=3)[-800:]}
    return out


def _result_dict(res) -> dict:
    if hasattr(res, "to_dict"):
        return res.to_dict()
    import dataclasses

    return dataclasses.asdict(res) if dataclasses.is_dataclass(res) else {"repr": repr(res)}


def _train_step(fn, opt, inputs):
    def step():
        opt.zero_grad(set_to_none=True)
        out = fn(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().square().mean().backward()
        opt.step()

    return step


def inference_section(device: str, deadline: float, batch: int = 8, repeats: int = 50) -> dict:
    """Bundled Kunlun eval forward at a small batch: eager vs recopt+Inductor vs recopt+Inductor+CUDA graphs.

    Each variant's output is compared with eager's before anything is timed
    (a fast wrong lowering is worth nothing); CUDA-graph outputs live in the
    graph's memory pool, so they are cloned before comparison. Timed under
    ``torch.no_grad()``, interleaved, medians (:func:`recopt.bench.compare`).
    A variant past ``deadline`` is skipped and says so.
    """
    import torch

    import recopt
    from recopt.bench import Variant, compare
    from recopt.data import example_batch
    from recopt.examples_factory import movielens_like_spec
    from recopt.models import build_model

    spec = movielens_like_spec()
    inputs = tuple(t.to(device) for t in example_batch(spec, batch_size=batch).inputs())
    torch.manual_seed(0)
    model = build_model("kunlun", spec).to(device).eval()
    out = {"batch": batch, "variants": {}}
    with torch.no_grad():
        want = model(*inputs)
        want = want[0] if isinstance(want, (tuple, list)) else want
        runners = [("eager", model)]
        for label, kw in (("recopt inductor", {}), ("recopt inductor + CUDA graphs", {"cuda_graphs": True})):
            if time.time() > deadline:
                out["variants"][label] = {"skipped": "time budget"}
                continue
            try:
                t0 = time.time()
                opt = recopt.optimize(model, inputs, target="auto", backend="inductor", **kw)
                for _ in range(3):                      # compile, record, replay
                    got = opt(*inputs)
                got = (got[0] if isinstance(got, (tuple, list)) else got).clone()
                out["variants"][label] = {"backend": opt.report.backend, "setup_s": round(time.time() - t0, 1),
                                          "rel_err_vs_eager": _rel(got, want)}
                runners.append((label, opt))
            except Exception as e:
                out["variants"][label] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                                          "trace": traceback.format_exc(limit=3)[-800:]}
        variants = [Variant(label, (lambda f=f: f(*inputs))) for label, f in runners]
        out["timing"] = _result_dict(compare(variants, repeats=repeats, warmup=5, progress=False))
    return out


# ----------------------------------------------------------------------------- report


def run_suite(sections, device: str, dry_run: bool, quick: bool, batch: int, steps: int) -> dict:
    report = {"environment": environment(), "dry_run": dry_run, "sections": {}}
    t0 = time.time()
    for sec in sections:
        start = time.time()
        deadline = start + BUDGET_S[sec]
        if dry_run:
            report["sections"][sec] = {"planned": True, "budget_s": BUDGET_S[sec]}
            if sec == "softmax" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
                # the new kernels' code path on the CPU, small shapes, no timing
                report["sections"][sec]["cpu_check"] = softmax_correctness("cpu", small=True)
            continue
        try:
            if sec == "correctness":
                res = correctness(device)
            elif sec == "gdpa":
                res = gdpa_section(device, deadline, quick)
            elif sec == "softmax":
                res = softmax_section(device, deadline)
            elif sec == "fp8":
                res = fp8_section(device, deadline)
            elif sec == "inference":
                res = inference_section(device, deadline)
            else:
                res = train_section(device, deadline, batch, steps)
            report["sections"][sec] = {"result": res}
        except Exception as e:  # isolated: record and go on to the next section
            report["sections"][sec] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                                       "trace": traceback.format_exc(limit=4)[-1500:]}
        report["sections"][sec]["seconds"] = round(time.time() - start, 1)
    report["total_s"] = round(time.time() - t0, 1)
    return report


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# recopt GPU suite — {env.get('card', '?')}", "",
             f"{env.get('date')} · torch {env.get('torch')} · triton {env.get('triton')} · "
             f"CUDA {env.get('cuda')}" + (" · DRY RUN (nothing measured)" if report.get("dry_run") else ""), ""]
    for sec, body in report["sections"].items():
        lines.append(f"## {sec}")
        if "error" in body:
            lines.append(f"FAILED: {body['error']}")
        elif body.get("planned"):
            lines.append(f"planned (budget {body['budget_s']:.0f} s)")
        elif sec == "correctness":
            res = body["result"]
            bad = [k for k, v in res.items() if not v.get("ok")]
            lines.append(f"{len(res) - len(bad)}/{len(res)} cases within tolerance")
            lines += ["", "| case | rel err | tol | ok |", "|---|---|---|---|"]
            for k, v in res.items():
                lines.append(f"| {k} | {v.get('rel', v.get('error', '-'))} | {v.get('tol', '-')} | "
                             f"{'yes' if v.get('ok') else '**NO**'} |")
        elif sec == "softmax":
            lines += _softmax_markdown(body["result"])
        elif sec == "gdpa":
            lines += ["| shape | variant | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
            for shape, r in body["result"].items():
                for var, row in (r.get("rows") or {"-": r}).items():
                    lines.append(f"| {shape} | {var} | {_fmt(row.get('fwd_ms'))} | {_fmt(row.get('fwd_bwd_ms'))} |"
                                 if isinstance(row, dict) and ("fwd_ms" in row) else
                                 f"| {shape} | {var} | {json.dumps(row)[:120]} | |")
        else:
            lines.append("```")
            lines.append(json.dumps(body.get("result"), indent=1, default=str)[:4000])
            lines.append("```")
        lines.append(f"\n({body.get('seconds', 0)} s)\n")
    return "\n".join(lines)


def _softmax_markdown(res: dict) -> list:
    corr = res.get("correctness", {})
    bad = [k for k, v in corr.items() if not v.get("ok")]
    lines = [f"{len(corr) - len(bad)}/{len(corr)} softmax cases within tolerance"
             + (f" (failing: {', '.join(bad)})" if bad else ""), ""]
    timing = res.get("timing", {})
    if "skipped" in timing:
        return lines + [f"timing skipped: {timing['skipped']}"]
    lines += ["| shape | variant | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
    for shape, r in timing.items():
        for var, row in (r.get("rows") or {"-": r}).items():
            lines.append(f"| {shape} | {var} | {_fmt(row.get('fwd_ms'))} | {_fmt(row.get('fwd_bwd_ms'))} |"
                         if "fwd_ms" in row else f"| {shape} | {var} | {json.dumps(row)[:120]} | |")
    return lines


def _fmt(x):
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--md", default="gpu_suite.md")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--dry-run", action="store_true", help="write the plan and environment; measure nothing")
    ap.add_argument("--quick", action="store_true", help="skip torch.compile rows of the GDPA section")
    ap.add_argument("--batch", type=int, default=512, help="train-step batch size")
    ap.add_argument("--steps", type=int, default=20, help="timed train steps per variant")
    a = ap.parse_args(argv)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    device = "cuda"
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on a GPU, or use --dry-run to check the plan")
    report = run_suite(sections, device, a.dry_run, a.quick, a.batch, a.steps)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = markdown(report)
    with open(a.md, "w") as f:
        f.write(md + "\n")
    print(md)
    failed = [s for s, b in report["sections"].items() if "error" in b]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
