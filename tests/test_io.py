"""lethe.io: writes are atomic and their results get ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from lethe.io import atomic_path, write_json


def test_written_file_and_folder_have_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        f = write_json(tmp_path / "r.json", {"a": 1})
        with atomic_path(tmp_path / "d", is_dir=True) as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert dest.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_every_writer_gives_umask_permissions(tmp_path):
    """Record files, world exports and a result file written by a run: 0644 under umask 022, 0640 under 027."""
    from lethe.records import TextRecord, write_records

    for mask, want in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(mask)
        try:
            rec = write_records([TextRecord("a b c")], tmp_path / f"docs{mask}.jsonl", "text")
            res = write_json(tmp_path / f"result{mask}.json", {"efficacy": 1.0})
        finally:
            os.umask(old)
        for f in (rec, res):
            assert stat.S_IMODE(f.stat().st_mode) == want, (f.name, oct(f.stat().st_mode))
