"""Model-size sweep: parameters and FLOPs per sample of recopt's reference models.

    PYTHONPATH=. python benchmarks/model_sizes.py            # markdown table on stdout
    PYTHONPATH=. python benchmarks/model_sizes.py --json out.json

FLOPs come from ``torch.utils.flop_counter``'s per-op formulas (summed by a
small dispatch mode, see :class:`FlopCount`): they count the matrix products (mm/addmm/bmm/baddbmm, einsum via bmm, linear, SDPA), i.e.
2·M·N·K per GEMM, and nothing else (no elementwise ops, norms, softmax or
embedding lookups). Sequences are measured at full length (every user has
``T`` events), so the numbers are the padded-compute upper bound a
non-jagged implementation pays. "fwd+bwd" runs one backward pass too.

Rows: each model at its tiny test config and its default config on the
MovieLens spec (T = 50 per event type), a medium config, and its paper-sized
config on a synthetic production-like spec (256 dense features, six
power-law sparse features up to 100k ids, two event types, T = 1000).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from recopt.data.batch import FeatureSpec, example_batch
from recopt.models import (DLRMConfig, EventTowerConfig, InterFormerConfig, KunlunConfig, build_model,
                           paper_config)

MOVIELENS_SPEC = FeatureSpec(n_dense=33, sparse_cardinalities=(610, 9742, 20, 14), seq_feature_tables=(1, 2),
                             max_seq_len=50, event_names=("liked", "not_liked"),
                             sparse_names=("user_id", "movie_id", "genre", "release_decade"))
PRODUCTION_SPEC = FeatureSpec(n_dense=256, sparse_cardinalities=(100_000, 50_000, 20_000, 5_000, 1_000, 100),
                              seq_feature_tables=(1, 2), max_seq_len=1000, event_names=("click", "impression"))

CONFIGS = {
    "interformer": {
        "tiny": InterFormerConfig(d_model=8, n_layers=1, n_heads=1, dcn_rank=4, masknet_hidden=16, head_hidden=(16,)),
        "default": InterFormerConfig(),
        "medium": InterFormerConfig(d_model=64, n_layers=3, n_heads=4, dcn_rank=32, masknet_hidden=128,
                                    head_hidden=(256, 128)),
        "paper": paper_config("interformer"),
    },
    "kunlun": {
        "tiny": KunlunConfig(d_model=8, n_summary=2, head_hidden=(16,), weightgen_hidden=16,
                             towers=(EventTowerConfig(d_model=8, n_heads=1, n_summary=1, n_layers=1,
                                                      pffn_rows_per_token=2),) * 2),
        "default": KunlunConfig(),
        "medium": KunlunConfig(d_model=64, n_summary=4, n_experts=2, head_hidden=(256, 128),
                               towers=(EventTowerConfig(d_model=64, n_heads=4, n_summary=8, n_layers=3, window=16,
                                                        pffn_rows_per_token=16),
                                       EventTowerConfig(d_model=32, n_heads=2, n_summary=4, n_layers=2, window=8,
                                                        pffn_rows_per_token=16))),
        "paper": paper_config("kunlun"),
    },
    "dlrm": {
        "tiny": DLRMConfig(embedding_dim=8, bottom_hidden=(16,), top_hidden=(16,)),
        "default": DLRMConfig(),
        "medium": DLRMConfig(embedding_dim=32, bottom_hidden=(256, 64), top_hidden=(256, 128), cross_layers=3),
        "paper": paper_config("dlrm"),
    },
}


class FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s per-op formulas over every dispatched op.

    ``FlopCounterMode`` itself is not used because its module tracker raises
    "Expected gradient function to be set" on expanded parameters (the PMA/HSP
    seed queries) in torch 2.13; the formulas, and so the counts, are the same.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def measure(name: str, size: str, spec: FeatureSpec, batch: int = 2) -> dict:
    torch.manual_seed(0)
    model = build_model(name, spec, CONFIGS[name][size])
    b = example_batch(spec, batch_size=batch, seed=0)
    b = b._replace(seq_lengths=torch.full_like(b.seq_lengths, spec.max_seq_len))  # full length: upper bound
    emb = sum(p.numel() for n, p in model.named_parameters() if "embedding" in n or "tables" in n)
    total = sum(p.numel() for p in model.parameters())
    with FlopCount() as fwd:
        loss = model(*b.inputs()).sum()
    with FlopCount() as bwd:
        loss.backward()
    f, g = fwd.total, bwd.total
    return {"model": name, "config": size, "T": spec.max_seq_len, "params": total, "dense_params": total - emb,
            "fwd_flops_per_sample": f / batch, "train_flops_per_sample": (f + g) / batch}


def _fmt(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-paper", action="store_true", help="skip the T=1000 paper-sized rows")
    args = ap.parse_args(argv)
    rows = []
    for name in CONFIGS:
        for size in CONFIGS[name]:
            if size == "paper" and args.skip_paper:
                continue
            spec = PRODUCTION_SPEC if size == "paper" else MOVIELENS_SPEC
            rows.append(measure(name, size, spec))
    print("| model | config | T | params | dense params | fwd FLOPs/sample | fwd+bwd FLOPs/sample |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['T']} | {_fmt(r['params'])} | {_fmt(r['dense_params'])} | "
              f"{_fmt(r['fwd_flops_per_sample'])} | {_fmt(r['train_flops_per_sample'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
