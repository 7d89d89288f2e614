"""ExFM on a MovieLens stream: one stale Kunlun teacher, three DLRM students, four variants.

    PYTHONPATH=. python examples/exfm_stream.py                 # the docs/quality.md table (minutes)
    PYTHONPATH=. python examples/exfm_stream.py --smoke         # < 60 s, for CI

ml-latest-small (CTR: rating >= 4) is read in time order and cut into
``--n-chunks`` contiguous chunks. The teacher (Kunlun) is retrained only every
``--refresh-every`` chunks; the data augmentation system logs its predictions
once per example for all students. Each student is evaluated on a chunk before
it trains on it, as student alone, + plain KD, + auxiliary head, + auxiliary
head + student adapter. Prints a markdown table, writes JSON (``--json``) and
a plot of NE over the stream (``--plot``, needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from recopt.data import load_movielens
from recopt.distill.loop import VARIANTS, StreamConfig, StudentSpec, run_stream, split_stream
from recopt.distill.losses import ExFMLossConfig
from recopt.models import build_model


class WithoutSequences(nn.Module):
    """A feature-subset student: the wrapped model sees empty behaviour sequences."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, dense, sparse_ids, seq_ids, seq_lengths, seq_times):
        return self.model(dense, sparse_ids, seq_ids, seq_lengths * 0, seq_times)


class _Subset:
    """The first ``n`` time-ordered examples of a source (smoke mode)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def make_batch(self, idx):
        return self.source.make_batch(idx)


def students_for(spec) -> list:
    small = dict(embedding_dim=8, bottom_hidden=(32,), top_hidden=(32, 16))
    return [
        StudentSpec("dlrm_dcn", lambda: build_model("dlrm", spec, interaction="dcn", cross_layers=1, **small)),
        StudentSpec("dlrm_dot", lambda: build_model("dlrm", spec, interaction="dot", **small)),
        StudentSpec("dlrm_noseq", lambda: WithoutSequences(
            build_model("dlrm", spec, interaction="dcn", cross_layers=1, **small))),
    ]


def markdown_table(result) -> str:
    means = result.mean_metrics()
    lines = ["| model | variant | mean NE | ΔNE vs alone | mean AUC | ΔAUC vs alone |",
             "|---|---|---|---|---|---|"]
    t = means["teacher"]
    lines.append(f"| teacher (Kunlun, stale) | — | {t['ne']:.4f} | | {t['auc']:.4f} | |")
    students = sorted({k.split("/")[0] for k in means if "/" in k})
    for s in students:
        base = means.get(f"{s}/alone")
        for v in result.config["variants"]:
            m = means[f"{s}/{v}"]
            dne = f"{100 * (m['ne'] / base['ne'] - 1):+.2f}%" if base and v != "alone" else ""
            dauc = f"{m['auc'] - base['auc']:+.4f}" if base and v != "alone" else ""
            lines.append(f"| {s} | {v} | {m['ne']:.4f} | {dne} | {m['auc']:.4f} | {dauc} |")
    return "\n".join(lines)


def per_chunk_table(result, student: str) -> str:
    variants = result.config["variants"]
    head = "| chunk | teacher lag | teacher NE | " + " | ".join(f"{v} NE" for v in variants) + " |"
    lines = [head, "|" + "---|" * (3 + len(variants))]
    for c in result.chunks:
        m = c["metrics"]
        lines.append(f"| {c['chunk']} | {c['teacher_lag_chunks']} | {m['teacher']['ne']:.4f} | " +
                     " | ".join(f"{m[f'{student}/{v}']['ne']:.4f}" for v in variants) + " |")
    return "\n".join(lines)


def plot(result, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'recopt[report]'); skipping the plot", file=sys.stderr)
        return
    students = sorted({k.split("/")[0] for k in result.chunks[0]["metrics"] if "/" in k})
    fig, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 4), sharey=True, squeeze=False)
    xs = [c["chunk"] for c in result.chunks]
    for ax, s in zip(axes[0], students):
        ax.plot(xs, [c["metrics"]["teacher"]["ne"] for c in result.chunks], "k--", label="teacher (stale)")
        for v in result.config["variants"]:
            ax.plot(xs, [c["metrics"][f"{s}/{v}"]["ne"] for c in result.chunks], marker="o", ms=3, label=v)
        for c in result.chunks:
            if c["teacher_lag_chunks"] == 0 and c["chunk"] > 1:
                ax.axvline(c["chunk"], color="grey", lw=0.5)
        ax.set_title(s)
        ax.set_xlabel("chunk (time order); grey: teacher refreshed")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("NE (lower is better)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("ExFM on ml-latest-small: NE per chunk, evaluated before training on it")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny run (< 60 s) for CI")
    ap.add_argument("--n-chunks", type=int, default=10)
    ap.add_argument("--refresh-every", type=int, default=3)
    ap.add_argument("--teacher", default="kunlun", choices=["kunlun", "interformer"])
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--w", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--max-seq-len", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--das-root", default=None, help="DAS directory (default: a temporary one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG path for NE over the stream")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_movielens(args.data_dir, max_seq_len=args.max_seq_len)
    source = data
    cfg = StreamConfig(n_chunks=args.n_chunks, refresh_every=args.refresh_every, teacher_epochs=args.teacher_epochs,
                       beta=args.beta, loss=ExFMLossConfig(alpha=args.alpha, w=args.w), seed=args.seed,
                       progress=False)
    teacher_overrides = {}
    if args.smoke:
        source = _Subset(data, 6000)
        cfg = StreamConfig(n_chunks=3, refresh_every=1, teacher_epochs=1, beta=args.beta,
                           loss=ExFMLossConfig(alpha=args.alpha, w=args.w), seed=args.seed, progress=False)
        teacher_overrides = dict(head_hidden=(32,))
    torch.manual_seed(args.seed)
    teacher = build_model(args.teacher, data.spec, **teacher_overrides)
    students = students_for(data.spec)
    if args.smoke:
        students = students[:2]
    chunks = split_stream(len(source), cfg.n_chunks)
    print(f"stream: {len(source)} examples in {cfg.n_chunks} chunks of ~{len(chunks[0])}; teacher {args.teacher} "
          f"refreshed every {cfg.refresh_every} chunk(s); {len(students)} students x {len(VARIANTS)} variants")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_stream(source, teacher, students, args.das_root or tmp, cfg, chunks)
    d = result.das
    print(f"\nteacher {result.teacher_params:,} params; students {result.student_params}")
    print(f"teacher calls per example: {d['calls_per_example_shared']:.2f} with the shared DAS vs "
          f"{d['calls_per_example_without_das']:.2f} without ({d['teacher_calls']:,} vs {d['requested_rows']:,} "
          f"calls for {d['unique_examples']:,} examples, {d['students']} students)")
    print("\n" + markdown_table(result))
    first = students[0].name
    print(f"\nper-chunk NE of {first}:\n" + per_chunk_table(result, first))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.plot:
        plot(result, args.plot)
    if args.json:
        out = {"config": result.config, "chunks": result.chunks, "das": result.das, "seconds": result.seconds,
               "teacher": args.teacher, "teacher_params": result.teacher_params,
               "student_params": result.student_params, "mean": result.mean_metrics(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "command": " ".join(["python", "examples/exfm_stream.py"] + (argv if argv is not None else sys.argv[1:]))}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
