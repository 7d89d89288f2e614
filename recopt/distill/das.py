"""Data augmentation system (DAS, from ExFM): log a teacher's predictions once, share them.

Several students (vertical models) each log a stream of ``(example id,
label)`` rows; the features of an example are looked up by id
(``featurize(ids) -> teacher inputs``), since an example is the same whichever
student logged it. For each chunk of the stream (in time order) the DAS
joins the students' rows by id, calls the teacher **once per unique example**
of the chunk, and writes the prediction next to each student's rows. Each
student then reads its rows back with :meth:`DataAugmentationSystem.read`.
Teacher checkpoints can be swapped between chunks
(:meth:`DataAugmentationSystem.set_teacher`); every row records the teacher
version that scored it.

Storage (needs ``pyarrow``: ``pip install 'recopt[distill]'``), under ``root``::

    manifest.json                       the committed state (the only source of truth)
    chunk-000003/pred-00000.parquet     teacher predictions, one part per ``part_rows`` unique ids
    chunk-000003/student-<name>.parquet one student's rows with the teacher prediction

Prediction parts: ``example_id`` int64, ``teacher_logit`` float32,
``teacher_version`` string, ``chunk`` int64. Student files: ``position``
int64 (row order in the student's stream), ``example_id``, ``label`` float32,
``teacher_logit``, ``teacher_version``.

Crash safety: every file is written to a temporary name, fsynced and renamed
into place, then the manifest (also written by temp file + rename) records
it. Readers see only files the manifest lists. On start-up, temporary files
and files the manifest does not list (a crash between rename and manifest
update) are deleted. So a crash mid-chunk loses no committed part, and
re-running a chunk scores only the ids no committed part covers and never
duplicates rows; re-running a completed chunk does nothing.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError, require

MANIFEST = "manifest.json"
FORMAT = "recopt-das/1"
_STUDENT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _pa():
    return require("pyarrow", "distill", "the ExFM data augmentation system (Parquet storage)")


def _pq():
    _pa()
    import pyarrow.parquet as pq

    return pq


# The only file names the store writes: chunk-NNNNNN/pred-NNNNN.parquet and chunk-NNNNNN/student-<name>.parquet.
_FILE_NAME = re.compile(r"chunk-(\d{6,})/(pred-\d{5,}|student-[A-Za-z0-9_.-]+)\.parquet")


def _check_manifest(path: Path, data: dict) -> None:
    """Refuse a manifest that names files the store never writes (``../`` paths, absolute paths, other
    chunks' directories) or has fields of the wrong shape: start-up, ``read`` and ``discard_chunk``
    open and delete the files it lists, so a crafted manifest could otherwise make them read or
    delete files outside the store's root."""
    def bad(why: str) -> InputError:
        return InputError(f"{path}: {why}; it is written atomically by recopt, so this store was edited by "
                          "hand or by another tool. Restore it or start a new root.")

    chunks = data.get("chunks")
    if not isinstance(chunks, dict):
        raise bad("'chunks' is not an object")
    for key, entry in chunks.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad(f"chunk key {key!r} is not a chunk number")
        if not (isinstance(entry, dict) and isinstance(entry.get("parts"), list)
                and isinstance(entry.get("students"), dict) and isinstance(entry.get("complete"), bool)
                and isinstance(entry.get("teacher_version"), str)):
            raise bad(f"chunk {key} is not {{complete, teacher_version, parts: [...], students: {{...}}}}")
        for rel in list(entry["parts"]) + list(entry["students"].values()):
            m = _FILE_NAME.fullmatch(rel) if isinstance(rel, str) else None
            if m is None or int(m.group(1)) != int(key):
                raise bad(f"chunk {key} lists the file {rel!r}, which is not a file of that chunk")
        for name, rel in entry["students"].items():
            if not (isinstance(name, str) and _STUDENT_NAME.match(name) and rel.endswith(f"/student-{name}.parquet")):
                raise bad(f"chunk {key}: student {name!r} does not match its file {rel!r}")


@dataclass
class StreamChunk:
    """One student's rows in one chunk: ``example_ids`` int64 [N] (unique), ``labels`` float [N]."""

    student: str
    example_ids: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if not isinstance(self.student, str) or not _STUDENT_NAME.match(self.student):
            raise InputError(f"student name {self.student!r} must be a non-empty string of letters, digits, "
                             "'_', '-' or '.' (it names a file)")
        self.example_ids = np.asarray(self.example_ids, dtype=np.int64).reshape(-1)
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(-1)
        if self.example_ids.shape != self.labels.shape:
            raise InputError(f"student {self.student!r}: {self.example_ids.size} example ids but "
                             f"{self.labels.size} labels; give one label per example")
        if len(np.unique(self.example_ids)) != self.example_ids.size:
            raise InputError(f"student {self.student!r}: example ids repeat within one chunk; "
                             "a stream logs each example once")

    def __len__(self) -> int:
        return int(self.example_ids.size)


@dataclass
class StudentRows:
    """What a student reads back: its rows, in its stream order, with the teacher's prediction."""

    example_ids: np.ndarray
    labels: np.ndarray
    teacher_logits: np.ndarray
    teacher_versions: np.ndarray

    def __len__(self) -> int:
        return int(self.example_ids.size)


@dataclass
class ChunkSummary:
    """Counts for one :meth:`DataAugmentationSystem.process_chunk` call.

    ``teacher_calls``: examples the teacher scored in this call;
    ``unique_examples``: distinct ids across students; ``requested``: the sum
    of the students' row counts (what scoring per student would cost).
    """

    chunk: int
    teacher_version: str
    unique_examples: int
    requested: int
    teacher_calls: int
    reused: int
    already_complete: bool = False


@dataclass
class DASStats:
    teacher_calls: int = 0          # examples scored by the teacher
    requested: int = 0              # rows logged by all students (what a per-student teacher would score)
    unique_examples: int = 0        # distinct examples over all processed chunks
    summaries: List[ChunkSummary] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write_table(path: Path, table) -> None:
    pq = _pq()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class DataAugmentationSystem:
    """Teacher predictions logged once per unique example and shared by students.

    - ``root``: directory of the store (created if missing; an existing store is resumed).
    - ``featurize(example_ids int64 [N]) -> tuple`` of teacher inputs for those ids, in order.
    - ``batch_size``: examples per teacher call; ``part_rows``: unique ids per committed
      prediction part (the unit a crash can lose; default ``4 * batch_size``).
    """

    def __init__(self, root: str | os.PathLike, featurize: Callable[[np.ndarray], tuple],
                 batch_size: int = 2048, part_rows: Optional[int] = None, progress: bool = False):
        _pa()
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.featurize = featurize
        self.batch_size = int(batch_size)
        self.part_rows = int(part_rows or 4 * batch_size)
        if self.part_rows < 1:
            raise InputError(f"part_rows must be >= 1, got {part_rows}")
        self.progress = progress
        self.teacher: Optional[Callable] = None
        self.teacher_version: Optional[str] = None
        self.stats = DASStats()
        self._manifest = self._load_manifest()
        self._remove_uncommitted()

    # -- manifest -------------------------------------------------------------------------
    def _load_manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.exists():
            return {"format": FORMAT, "chunks": {}}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e}); it is written atomically, so this store was "
                             "edited by hand or by another tool. Restore it or start a new root.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{path} has format {got!r}, expected {FORMAT!r}")
        _check_manifest(path, data)
        return data

    def _write_manifest(self) -> None:
        _atomic_write_bytes(self.root / MANIFEST, json.dumps(self._manifest, indent=1, sort_keys=True).encode())

    def _committed_files(self) -> set:
        files = set()
        for entry in self._manifest["chunks"].values():
            files.update(entry["parts"])
            files.update(entry["students"].values())
        return files

    def _remove_uncommitted(self) -> None:
        committed = self._committed_files()
        for d in self.root.glob("chunk-*"):
            if not d.is_dir():
                continue
            for f in d.iterdir():
                rel = f"{d.name}/{f.name}"
                if rel not in committed:
                    f.unlink()

    def _entry(self, chunk: int) -> Optional[dict]:
        return self._manifest["chunks"].get(str(chunk))

    def committed_chunks(self) -> List[int]:
        """Chunks whose predictions and student rows are all committed, in order."""
        return sorted(int(k) for k, v in self._manifest["chunks"].items() if v["complete"])

    # -- teacher --------------------------------------------------------------------------
    def set_teacher(self, teacher: Callable, version: str) -> None:
        """Use ``teacher`` (``teacher(*featurize(ids)) -> logits [N]``) from the next chunk on.

        Swapping while a chunk is half done is refused by :meth:`process_chunk`
        (its committed parts name the old version).
        """
        if not callable(teacher):
            raise InputError(f"teacher must be callable, got {type(teacher).__name__}")
        if not isinstance(version, str) or not version:
            raise InputError("teacher version must be a non-empty string (it is stored with every prediction)")
        self.teacher, self.teacher_version = teacher, version

    @torch.no_grad()
    def _score(self, ids: np.ndarray) -> np.ndarray:
        was_training = getattr(self.teacher, "training", False)
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher.eval()
        try:
            out = []
            for s in range(0, len(ids), self.batch_size):
                part = ids[s:s + self.batch_size]
                logits = self.teacher(*self.featurize(part))
                logits = torch.as_tensor(logits).detach().float().reshape(-1).cpu()
                if logits.numel() != len(part):
                    raise InputError(f"the teacher returned {logits.numel()} predictions for {len(part)} examples; "
                                     "it must return one logit per example")
                out.append(logits.numpy())
                self.stats.teacher_calls += len(part)
            return np.concatenate(out) if out else np.zeros(0, np.float32)
        finally:
            if isinstance(self.teacher, torch.nn.Module) and was_training:
                self.teacher.train()

    # -- chunks ---------------------------------------------------------------------------
    def process_chunk(self, chunk: int, streams: Sequence[StreamChunk]) -> ChunkSummary:
        """Score chunk ``chunk`` of every student's stream with the current teacher and commit it.

        Idempotent: a completed chunk is left as it is (no teacher call); a
        chunk interrupted by a crash resumes from its committed parts.
        """
        pa = _pa()
        chunk = int(chunk)
        if chunk < 0:
            raise InputError(f"chunk ids must be >= 0, got {chunk}")
        names = [s.student for s in streams]
        if not streams or len(set(names)) != len(names):
            raise InputError(f"give one StreamChunk per student, each student once; got {names}")
        requested = sum(len(s) for s in streams)
        union = np.unique(np.concatenate([s.example_ids for s in streams]))
        entry = self._entry(chunk)
        if entry is not None and entry["complete"]:
            missing = sorted(set(names) - set(entry["students"]))
            if missing:
                raise InputError(f"chunk {chunk} is already complete without student(s) {missing}; "
                                 "a chunk's students are fixed when it is committed")
            summary = ChunkSummary(chunk, entry["teacher_version"], len(union), requested, 0, len(union), True)
            self.stats.summaries.append(summary)
            return summary
        if self.teacher is None:
            raise InputError("no teacher: call set_teacher(teacher, version) before process_chunk")
        if entry is not None and not entry["parts"] and not entry["students"]:
            entry["teacher_version"] = self.teacher_version  # nothing committed yet: any teacher may start it
        if entry is None:
            entry = {"complete": False, "teacher_version": self.teacher_version, "parts": [], "students": {}}
            self._manifest["chunks"][str(chunk)] = entry
        elif entry["teacher_version"] != self.teacher_version:
            raise InputError(f"chunk {chunk} was half processed by teacher {entry['teacher_version']!r} and the "
                             f"current teacher is {self.teacher_version!r}; set the old teacher back to finish "
                             f"it, or call discard_chunk({chunk}) to score it again from scratch")
        cdir = self.root / f"chunk-{chunk:06d}"
        cdir.mkdir(exist_ok=True)

        ids_done, logits_done = self._read_parts(entry)
        todo = np.setdiff1d(union, ids_done, assume_unique=True)
        calls_before = self.stats.teacher_calls
        starts = range(0, len(todo), self.part_rows)
        if self.progress and len(todo) > self.part_rows:
            from .._progress import progress_bar

            starts = progress_bar(starts, desc=f"DAS chunk {chunk}")
        for start in starts:
            part_ids = todo[start:start + self.part_rows]
            logits = self._score(part_ids)
            rel = f"{cdir.name}/pred-{len(entry['parts']):05d}.parquet"
            table = pa.table({
                "example_id": pa.array(part_ids, pa.int64()),
                "teacher_logit": pa.array(logits.astype(np.float32), pa.float32()),
                "teacher_version": pa.array([self.teacher_version] * len(part_ids), pa.string()),
                "chunk": pa.array(np.full(len(part_ids), chunk, np.int64), pa.int64()),
            })
            _atomic_write_table(self.root / rel, table)
            entry["parts"].append(rel)
            self._write_manifest()
            ids_done = np.concatenate([ids_done, part_ids])
            logits_done = np.concatenate([logits_done, logits.astype(np.float32)])

        order = np.argsort(ids_done)
        ids_sorted, logits_sorted = ids_done[order], logits_done[order]
        for s in streams:
            if s.student in entry["students"]:
                continue
            pos = np.searchsorted(ids_sorted, s.example_ids)
            rel = f"{cdir.name}/student-{s.student}.parquet"
            table = pa.table({
                "position": pa.array(np.arange(len(s), dtype=np.int64), pa.int64()),
                "example_id": pa.array(s.example_ids, pa.int64()),
                "label": pa.array(s.labels, pa.float32()),
                "teacher_logit": pa.array(logits_sorted[pos], pa.float32()),
                "teacher_version": pa.array([entry["teacher_version"]] * len(s), pa.string()),
            })
            _atomic_write_table(self.root / rel, table)
            entry["students"][s.student] = rel
            self._write_manifest()
        entry["complete"] = True
        entry["n_unique"] = int(len(union))
        self._write_manifest()
        calls = self.stats.teacher_calls - calls_before
        self.stats.requested += requested
        self.stats.unique_examples += len(union)
        summary = ChunkSummary(chunk, entry["teacher_version"], len(union), requested, calls, len(union) - calls)
        self.stats.summaries.append(summary)
        return summary

    def _read_parts(self, entry: dict):
        pq = _pq()
        ids, logits = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        for rel in entry["parts"]:
            t = pq.read_table(str(self.root / rel), columns=["example_id", "teacher_logit"])
            ids.append(t.column("example_id").to_numpy())
            logits.append(t.column("teacher_logit").to_numpy().astype(np.float32))
        return np.concatenate(ids), np.concatenate(logits)

    def discard_chunk(self, chunk: int) -> None:
        """Forget chunk ``chunk`` (complete or not): its files go, the next process_chunk re-scores it."""
        entry = self._manifest["chunks"].pop(str(int(chunk)), None)
        self._write_manifest()
        if entry is not None:
            for rel in entry["parts"] + list(entry["students"].values()):
                p = self.root / rel
                if p.exists():
                    p.unlink()

    def read(self, chunk: int, student: str) -> StudentRows:
        """Student ``student``'s rows of a completed chunk, in its stream order, with teacher logits."""
        entry = self._entry(int(chunk))
        if entry is None or not entry["complete"]:
            raise InputError(f"chunk {chunk} is not committed yet; call process_chunk({chunk}, ...) first "
                             f"(committed chunks: {self.committed_chunks()})")
        if student not in entry["students"]:
            raise InputError(f"student {student!r} has no rows in chunk {chunk}; students there: "
                             f"{sorted(entry['students'])}")
        t = _pq().read_table(str(self.root / entry["students"][student]))
        order = np.argsort(t.column("position").to_numpy())
        return StudentRows(
            example_ids=t.column("example_id").to_numpy()[order],
            labels=t.column("label").to_numpy()[order],
            teacher_logits=t.column("teacher_logit").to_numpy()[order],
            teacher_versions=np.asarray(t.column("teacher_version").to_pylist(), dtype=object)[order],
        )

    def predictions(self, chunk: int) -> Dict[str, np.ndarray]:
        """All committed teacher predictions of ``chunk``: ``{"example_id", "teacher_logit"}`` sorted by id."""
        entry = self._entry(int(chunk))
        if entry is None:
            raise InputError(f"chunk {chunk} has no committed predictions")
        ids, logits = self._read_parts(entry)
        order = np.argsort(ids)
        return {"example_id": ids[order], "teacher_logit": logits[order]}
