"""Stream training for ExFM: one (stale) teacher, several students, four training variants.

The stream is a time-ordered source (anything with ``make_batch(indices) ->
Batch`` and ``len()``, e.g. :class:`recopt.data.MovieLensCTR`, whose example
indices are in time order) cut into contiguous chunks. Protocol
(:func:`run_stream`):

1. **Warm-up on chunk 0.** The teacher trains on chunk 0 (``teacher_epochs``
   passes, :func:`recopt.train.train`); every student trains one pass on
   chunk 0 with plain BCE. All variants of a student start from that same
   warmed-up model, so they differ only in how they use the teacher later.
2. **For each later chunk c**, in order:

   a. if ``(c - 1) % refresh_every == 0`` and c > 1, the teacher trains on the
      chunks it has not seen yet (up to c − 1) and is swapped into the DAS as
      a new version; between refreshes it is *stale* (its data lags by up to
      ``refresh_every`` chunks);
   b. the DAS scores chunk c once per unique example for all students
      (:class:`~recopt.distill.das.DataAugmentationSystem`);
   c. every model is **evaluated on chunk c before training on it**
      (progressive validation: AUC, LogLoss, NE with the chunk's own positive
      rate, via :func:`recopt.train.compute_metrics`);
   d. every student variant trains one pass over its rows of chunk c.

Variants (:data:`VARIANTS`): ``alone`` (BCE on labels), ``kd`` (plain KD on the
one head), ``aux_head`` (the ``aux_head`` pass, Eq. 5), ``aux_head_adapter``
(two distillation heads + student adapter, Algorithm 1). Serving metrics of
the aux-head variants come from the serving head only.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..passes.exfm import AuxHeadConfig, apply_aux_head, strip_distill_heads
from ..train import TrainConfig, compute_metrics, seed_everything, train
from .adapter import StudentAdapter, algorithm1_step
from .das import DataAugmentationSystem, StreamChunk, StudentRows
from .losses import ExFMLossConfig, aux_head_loss, bce, kd_loss

VARIANTS = ("alone", "kd", "aux_head", "aux_head_adapter")


@dataclass
class StudentSpec:
    """A named student: ``build()`` returns a fresh model with the common forward signature."""

    name: str
    build: Callable[[], nn.Module]


@dataclass
class StreamConfig:
    n_chunks: int = 10
    refresh_every: int = 3            # teacher retrained every this many chunks (stale in between)
    teacher_epochs: int = 2           # passes over each newly available block when refreshing
    teacher_lr: float = 1e-3
    batch_size: int = 256
    lr: float = 2e-3                  # students
    adapter_lr: float = 1e-2
    adapter_hidden: int = 8
    grad_clip: Optional[float] = 1.0
    beta: float = 1.0                 # GS_beta
    head_layers: int = 1
    loss: ExFMLossConfig = field(default_factory=ExFMLossConfig)
    variants: Sequence[str] = VARIANTS
    eval_batch_size: int = 4096
    das_batch_size: int = 2048
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.n_chunks < 2:
            raise ValueError(f"n_chunks must be >= 2 (one warm-up chunk and one streamed), got {self.n_chunks}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")


def split_stream(n_examples: int, n_chunks: int) -> List[np.ndarray]:
    """Contiguous, time-ordered chunks of example indices ``0..n_examples-1`` (sizes differ by <= 1)."""
    if n_examples < n_chunks:
        raise ValueError(f"cannot cut {n_examples} examples into {n_chunks} chunks")
    return [c.astype(np.int64) for c in np.array_split(np.arange(n_examples), n_chunks)]


class ServingView(nn.Module):
    """The serving output of a model that may return ``(serving, distill, ...)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        out = self.net(*inputs)
        return out[0] if isinstance(out, (tuple, list)) else out


class StudentTrainer:
    """One student model trained with one variant; keeps its optimizer (and adapter) across chunks."""

    def __init__(self, spec: StudentSpec, variant: str, warm_model: nn.Module, example_inputs: tuple,
                 cfg: StreamConfig):
        self.name, self.variant, self.cfg = spec.name, variant, cfg
        model = copy.deepcopy(warm_model)
        if variant.startswith("aux_head"):
            head_cfg = AuxHeadConfig(beta=cfg.beta, head_layers=cfg.head_layers,
                                     n_distill_heads=2 if variant == "aux_head_adapter" else 1)
            self.net, self.site = apply_aux_head(model, example_inputs, head_cfg)
        else:
            self.net, self.site = model, None
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.adapter = self.adapter_opt = None
        if variant == "aux_head_adapter":
            self.adapter = StudentAdapter(cfg.adapter_hidden)
            self.adapter_opt = torch.optim.Adam(self.adapter.parameters(), lr=cfg.adapter_lr)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.variant}"

    def serving(self) -> nn.Module:
        return ServingView(self.net)

    def serving_graph(self) -> nn.Module:
        """What would be exported: the aux-head graph with its distillation heads stripped."""
        return strip_distill_heads(self.net) if self.variant.startswith("aux_head") else self.net

    def step(self, inputs: tuple, labels: torch.Tensor, teacher_logits: torch.Tensor) -> float:
        self.net.train()
        cfg = self.cfg
        if self.variant == "aux_head_adapter":
            return algorithm1_step(self.net, self.params, self.opt, self.adapter, self.adapter_opt, inputs,
                                   labels, teacher_logits, cfg.loss, cfg.grad_clip)["student"]
        out = self.net(*inputs)
        if self.variant == "alone":
            loss = bce(out, labels)
        elif self.variant == "kd":
            loss = kd_loss(out, labels, teacher_logits, cfg.loss)
        else:
            loss = aux_head_loss(out[0], out[1], labels, teacher_logits, cfg.loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        return float(loss.detach())


@dataclass
class StreamResult:
    config: dict
    chunks: List[dict]                 # one record per evaluated chunk
    das: dict                          # teacher-call accounting
    seconds: float
    teacher_params: int
    student_params: Dict[str, int]

    def mean_metrics(self) -> Dict[str, dict]:
        """Mean NE/AUC over evaluated chunks per model key (``student/variant`` and ``teacher``)."""
        keys = self.chunks[0]["metrics"].keys()
        return {k: {m: float(np.mean([c["metrics"][k][m] for c in self.chunks])) for m in ("ne", "auc", "logloss")}
                for k in keys}


def _predict(model: nn.Module, source, ids: np.ndarray, batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            out.append(model(*source.make_batch(ids[s:s + batch_size]).inputs()).float())
    return torch.cat(out)


class _IndexSplit:
    """A split over explicit indices of a source, for :func:`recopt.train.train`."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([self.source.make_batch(self.indices[s:s + 8192]).labels
                          for s in range(0, len(self.indices), 8192)])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for s in range(0, stop, batch_size):
            yield self.source.make_batch(self.indices[order[s:s + batch_size]])


def _train_plain(model: nn.Module, source, ids: np.ndarray, cfg: StreamConfig, epochs: int, lr: float,
                 seed: int) -> None:
    train(model, _IndexSplit(source, ids), None,
          TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=lr, seed=seed, device="cpu", amp="off",
                      grad_clip=cfg.grad_clip, progress=False))


def run_stream(source, teacher: nn.Module, students: Sequence[StudentSpec], das_root: str,
               cfg: StreamConfig = StreamConfig(), chunks: Optional[List[np.ndarray]] = None,
               log: Callable[[str], None] = print) -> StreamResult:
    """Run the protocol of the module docstring; return per-chunk metrics and DAS accounting."""
    t_start = time.perf_counter()
    if len(students) < 1 or len({s.name for s in students}) != len(students):
        raise ValueError("give at least one student, with distinct names")
    seed_everything(cfg.seed)
    chunks = chunks if chunks is not None else split_stream(len(source), cfg.n_chunks)
    das = DataAugmentationSystem(das_root, lambda ids: source.make_batch(ids).inputs(),
                                 batch_size=cfg.das_batch_size)
    example_inputs = source.make_batch(chunks[0][:64]).inputs()

    # 1. warm-up on chunk 0
    _train_plain(teacher, source, chunks[0], cfg, cfg.teacher_epochs, cfg.teacher_lr, cfg.seed)
    trained_through = 0
    das.set_teacher(teacher, "through-chunk-0")
    trainers: List[StudentTrainer] = []
    student_params = {}
    for spec in students:
        seed_everything(cfg.seed)
        warm = spec.build()
        student_params[spec.name] = sum(p.numel() for p in warm.parameters())
        _train_plain(warm, source, chunks[0], cfg, 1, cfg.lr, cfg.seed)
        trainers += [StudentTrainer(spec, v, warm, example_inputs, cfg) for v in cfg.variants]
    log(f"warm-up on chunk 0 ({len(chunks[0])} examples) done in {time.perf_counter() - t_start:.0f}s")

    records = []
    for c in range(1, len(chunks)):
        t_chunk = time.perf_counter()
        ids = chunks[c]
        if c > 1 and (c - 1) % cfg.refresh_every == 0:
            fresh = np.concatenate(chunks[trained_through + 1:c])
            _train_plain(teacher, source, fresh, cfg, cfg.teacher_epochs, cfg.teacher_lr, cfg.seed + c)
            trained_through = c - 1
            das.set_teacher(teacher, f"through-chunk-{trained_through}")
        labels = _IndexSplit(source, ids).labels
        # every student logs the whole chunk here; DAS also handles partial, overlapping streams
        streams = [StreamChunk(spec.name, ids, labels.numpy()) for spec in students]
        summary = das.process_chunk(c, streams)

        metrics = {}
        rows0 = das.read(c, students[0].name)
        metrics["teacher"] = compute_metrics(labels, torch.from_numpy(rows0.teacher_logits)).as_dict()
        for tr in trainers:
            metrics[tr.key] = compute_metrics(labels, _predict(tr.serving(), source, ids,
                                                               cfg.eval_batch_size)).as_dict()
        # train one pass over the chunk, each student on its own DAS rows
        for spec in students:
            rows: StudentRows = das.read(c, spec.name)
            order = np.random.default_rng(cfg.seed + 1000 * c).permutation(len(rows))
            group = [tr for tr in trainers if tr.name == spec.name]
            for s in range(0, len(order), cfg.batch_size):
                pos = order[s:s + cfg.batch_size]
                batch = source.make_batch(rows.example_ids[pos])
                y = torch.from_numpy(rows.labels[pos])
                t_logits = torch.from_numpy(rows.teacher_logits[pos])
                for tr in group:
                    tr.step(batch.inputs(), y, t_logits)
        record = {"chunk": c, "n": int(len(ids)), "base_rate": float(labels.mean()),
                  "teacher_version": summary.teacher_version, "teacher_lag_chunks": c - 1 - trained_through,
                  "teacher_calls": summary.teacher_calls, "requested": summary.requested,
                  "unique_examples": summary.unique_examples, "metrics": metrics}
        records.append(record)
        best = {k: v["ne"] for k, v in metrics.items()}
        log(f"chunk {c}/{len(chunks) - 1}: teacher {summary.teacher_version} (lag {record['teacher_lag_chunks']}) "
            f"NE teacher {best['teacher']:.4f}, " + ", ".join(
                f"{tr.key} {best[tr.key]:.4f}" for tr in trainers) + f"  [{time.perf_counter() - t_chunk:.0f}s]")

    # the exported graph of each aux-head student serves exactly its serving head
    probe = source.make_batch(chunks[-1][:128]).inputs()
    for tr in trainers:
        if tr.variant.startswith("aux_head"):
            served = tr.serving_graph()
            served.eval()
            with torch.no_grad():
                if not torch.equal(served(*probe), tr.serving()(*probe)):
                    raise AssertionError(f"{tr.key}: the stripped serving graph disagrees with the serving head")
    st = das.stats
    das_info = {
        "students": len(students),
        "teacher_calls": st.teacher_calls,
        "unique_examples": st.unique_examples,
        "requested_rows": st.requested,
        "calls_per_example_shared": st.teacher_calls / max(1, st.unique_examples),
        "calls_per_example_without_das": st.requested / max(1, st.unique_examples),
    }
    cfg_dict = asdict(cfg)
    cfg_dict["variants"] = list(cfg.variants)
    return StreamResult(cfg_dict, records, das_info, time.perf_counter() - t_start,
                        sum(p.numel() for p in teacher.parameters()), student_params)
