"""Data augmentation system: one teacher call per unique example, crash safety, idempotence."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from recopt.distill.das import DataAugmentationSystem, StreamChunk  # noqa: E402
from recopt.errors import InputError  # noqa: E402

N_EXAMPLES = 500
FEATURES = torch.randn(N_EXAMPLES, 3, generator=torch.Generator().manual_seed(1))
WEIGHTS = torch.tensor([0.7, -1.3, 0.4])


def featurize(ids):
    return (FEATURES[torch.as_tensor(ids)],)


class CountingTeacher:
    """A linear teacher that records every example id it is asked to score."""

    def __init__(self, fail_after_calls=None, scale=1.0):
        self.seen = []
        self.calls = 0
        self.fail_after_calls = fail_after_calls
        self.scale = scale

    def __call__(self, x):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("injected crash")
        self.calls += 1
        rows = (FEATURES[:, None, :] == x[None]).all(-1).nonzero()[:, 0]
        self.seen.extend(rows.tolist())
        return self.scale * (x @ WEIGHTS)


def streams_for(chunk_ids):
    """Three students with overlapping, differently ordered streams over the chunk's ids."""
    rng = np.random.default_rng(int(chunk_ids[0]))
    a = rng.permutation(chunk_ids)
    b = rng.permutation(chunk_ids)[: len(chunk_ids) * 2 // 3]
    c = rng.permutation(chunk_ids)[len(chunk_ids) // 3:]
    lab = lambda ids: (ids % 3 == 0).astype(np.float32)  # noqa: E731
    return [StreamChunk("a", a, lab(a)), StreamChunk("b", b, lab(b)), StreamChunk("c", c, lab(c))]


def expected_logits(ids, scale=1.0):
    return (scale * (FEATURES[torch.as_tensor(ids)] @ WEIGHTS)).numpy()


def test_one_teacher_call_per_unique_example_across_students(tmp_path):
    das = DataAugmentationSystem(tmp_path, featurize, batch_size=32, part_rows=64)
    teacher = CountingTeacher()
    das.set_teacher(teacher, "v0")
    chunks = [np.arange(0, 200), np.arange(200, 350)]
    for c, ids in enumerate(chunks):
        streams = streams_for(ids)
        summary = das.process_chunk(c, streams)
        assert summary.unique_examples == len(ids)
        assert summary.requested == sum(len(s) for s in streams) > len(ids)
        assert summary.teacher_calls == len(ids)
        for s in streams:
            rows = das.read(c, s.student)
            np.testing.assert_array_equal(rows.example_ids, s.example_ids)
            np.testing.assert_array_equal(rows.labels, s.labels)
            np.testing.assert_allclose(rows.teacher_logits, expected_logits(s.example_ids), rtol=1e-6, atol=1e-6)
            assert set(rows.teacher_versions) == {"v0"}
    assert sorted(teacher.seen) == list(range(350))  # every example exactly once
    assert das.stats.teacher_calls == 350
    assert das.stats.requested > 2 * das.stats.teacher_calls


def test_rerunning_a_chunk_is_a_no_op_and_teacher_swaps_between_chunks(tmp_path):
    das = DataAugmentationSystem(tmp_path, featurize, batch_size=50)
    t0 = CountingTeacher()
    das.set_teacher(t0, "v0")
    das.process_chunk(0, streams_for(np.arange(100)))
    again = das.process_chunk(0, streams_for(np.arange(100)))
    assert again.already_complete and again.teacher_calls == 0 and len(t0.seen) == 100
    assert len(das.read(0, "a")) == 100
    t1 = CountingTeacher(scale=2.0)
    das.set_teacher(t1, "v1")
    das.process_chunk(1, streams_for(np.arange(100, 180)))
    rows = das.read(1, "b")
    assert set(rows.teacher_versions) == {"v1"}
    np.testing.assert_allclose(rows.teacher_logits, expected_logits(rows.example_ids, 2.0), rtol=1e-6, atol=1e-6)
    # A new process on the same root resumes the committed state.
    das2 = DataAugmentationSystem(tmp_path, featurize)
    assert das2.committed_chunks() == [0, 1]
    assert set(das2.read(0, "a").teacher_versions) == {"v0"}


def _student_rows_all(das, chunk):
    return {s: das.read(chunk, s) for s in ("a", "b", "c")}


def test_crash_mid_chunk_loses_nothing_and_duplicates_nothing(tmp_path):
    ids = np.arange(300)
    das = DataAugmentationSystem(tmp_path, featurize, batch_size=25, part_rows=50)
    crashing = CountingTeacher(fail_after_calls=5)  # 5 batches of 25 = 2 full parts + half a part
    das.set_teacher(crashing, "v0")
    with pytest.raises(RuntimeError, match="injected crash"):
        das.process_chunk(0, streams_for(ids))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    committed = manifest["chunks"]["0"]["parts"]
    assert len(committed) == 2 and not manifest["chunks"]["0"]["complete"]
    before = das.predictions(0)
    assert len(before["example_id"]) == 100

    # Restart: a fresh process on the same root, teacher of the same version.
    das2 = DataAugmentationSystem(tmp_path, featurize, batch_size=25, part_rows=50)
    teacher = CountingTeacher()
    das2.set_teacher(teacher, "v0")
    summary = das2.process_chunk(0, streams_for(ids))
    assert summary.teacher_calls == 200 and summary.reused == 100
    assert not set(teacher.seen) & set(before["example_id"].tolist())  # committed rows not re-scored
    after = das2.predictions(0)
    np.testing.assert_array_equal(after["example_id"], ids)  # all ids, each exactly once
    kept = np.isin(after["example_id"], before["example_id"])
    np.testing.assert_array_equal(after["teacher_logit"][kept], before["teacher_logit"])
    for name, rows in _student_rows_all(das2, 0).items():
        assert len(np.unique(rows.example_ids)) == len(rows.example_ids)
        np.testing.assert_allclose(rows.teacher_logits, expected_logits(rows.example_ids), rtol=1e-6, atol=1e-6)


def test_crash_between_file_rename_and_manifest_update(tmp_path, monkeypatch):
    das = DataAugmentationSystem(tmp_path, featurize, batch_size=40, part_rows=40)
    das.set_teacher(CountingTeacher(), "v0")
    real = DataAugmentationSystem._write_manifest
    count = {"n": 0}

    def flaky(self):
        count["n"] += 1
        if count["n"] == 2:  # the second part's file is renamed into place, its manifest update crashes
            raise OSError("injected crash before manifest commit")
        real(self)

    monkeypatch.setattr(DataAugmentationSystem, "_write_manifest", flaky)
    with pytest.raises(OSError):
        das.process_chunk(0, streams_for(np.arange(120)))
    monkeypatch.setattr(DataAugmentationSystem, "_write_manifest", real)
    files = sorted(p.name for p in (tmp_path / "chunk-000000").iterdir())
    assert files == ["pred-00000.parquet", "pred-00001.parquet"]  # one committed, one orphan
    das2 = DataAugmentationSystem(tmp_path, featurize, batch_size=40, part_rows=40)
    assert sorted(p.name for p in (tmp_path / "chunk-000000").iterdir()) == ["pred-00000.parquet"]
    teacher = CountingTeacher()
    das2.set_teacher(teacher, "v0")
    das2.process_chunk(0, streams_for(np.arange(120)))
    assert len(teacher.seen) == 80
    np.testing.assert_array_equal(das2.predictions(0)["example_id"], np.arange(120))


def test_process_killed_mid_chunk_resumes(tmp_path):
    """A real crash: the scoring process dies (os._exit) after its second teacher batch."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(f"""
        import os, sys, numpy as np, torch
        sys.path.insert(0, {repo!r}); sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_distill_das import featurize, streams_for, CountingTeacher
        from recopt.distill.das import DataAugmentationSystem
        das = DataAugmentationSystem({str(tmp_path)!r}, featurize, batch_size=30, part_rows=30)
        t = CountingTeacher()
        def dying(x):
            if t.calls == 2:
                os._exit(17)
            return t(x)
        das.set_teacher(dying, "v0")
        das.process_chunk(0, streams_for(np.arange(150)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    das = DataAugmentationSystem(tmp_path, featurize, batch_size=30, part_rows=30)
    assert len(das.predictions(0)["example_id"]) == 60
    teacher = CountingTeacher()
    das.set_teacher(teacher, "v0")
    das.process_chunk(0, streams_for(np.arange(150)))
    assert len(teacher.seen) == 90
    np.testing.assert_array_equal(das.predictions(0)["example_id"], np.arange(150))


def test_bad_inputs_have_clear_errors(tmp_path):
    das = DataAugmentationSystem(tmp_path, featurize, batch_size=4, part_rows=4)
    with pytest.raises(InputError, match="set_teacher"):
        das.process_chunk(0, streams_for(np.arange(10)))
    with pytest.raises(InputError, match="repeat"):
        StreamChunk("a", np.array([1, 1]), np.array([0, 1]))
    with pytest.raises(InputError, match="one label per example"):
        StreamChunk("a", np.array([1, 2]), np.array([0]))
    das.set_teacher(CountingTeacher(fail_after_calls=1), "v0")
    with pytest.raises(RuntimeError):
        das.process_chunk(0, streams_for(np.arange(10)))
    das.set_teacher(CountingTeacher(), "v1")
    with pytest.raises(InputError, match="half processed"):
        das.process_chunk(0, streams_for(np.arange(10)))
    with pytest.raises(InputError, match="not committed"):
        das.read(0, "a")


@pytest.mark.parametrize("edit", [
    lambda e: e["parts"].append("../../victim.txt"),
    lambda e: e["parts"].append("/etc/hostname"),
    lambda e: e["students"].update(a="chunk-000009/student-a.parquet"),   # another chunk's file
    lambda e: e["students"].update(b="chunk-000000/student-a.parquet"),   # name and file disagree
    lambda e: e.update(parts="chunk-000000/pred-00000.parquet"),
])
def test_a_crafted_manifest_cannot_reach_files_outside_the_store(tmp_path, edit):
    # Before: discard_chunk and read opened/deleted whatever paths manifest.json listed, so an edited
    # manifest could delete or read files outside the store's root.
    root = tmp_path / "das"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    das = DataAugmentationSystem(root, featurize, batch_size=32, part_rows=64)
    das.set_teacher(CountingTeacher(), "v1")
    ids = np.arange(20)
    das.process_chunk(0, [StreamChunk("a", ids, np.zeros(20))])
    doc = json.loads((root / "manifest.json").read_text())
    edit(doc["chunks"]["0"])
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="manifest.json"):
        DataAugmentationSystem(root, featurize)
    assert victim.read_text() == "keep me"
