"""Archives built to exhaust disk or time: too many members, gzip data that inflates without
bound, and a command terminated while it decompresses. Limits are lowered in each test so the
bombs stay a few kilobytes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import shardwise
from shardwise.archive import tar_index

from conftest import listing, sample_state_dict


def _tar(path: Path, members: dict[str, bytes], *, gz: bool) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w:", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def temp_dir(tmp_path, monkeypatch) -> Path:
    """A private temporary folder for gzip copies, so the test sees exactly what is left in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def _one_error_line(result) -> bool:
    return result.code == 2 and result.err.startswith("shardwise: error: ") and result.err.count("\n") == 1 and "Traceback" not in result.err


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_an_archive_with_more_members_than_the_limit_is_refused(cli, tmp_path, temp_dir, monkeypatch, gz):
    monkeypatch.setenv("SHARDWISE_MAX_ARCHIVE_MEMBERS", "10")
    archive = _tar(tmp_path / "many.nemo", {"./model_config.yaml": b"a: 1\n", **{f"./f{i}": b"" for i in range(30)}}, gz=gz)
    result = cli("unpack", archive, tmp_path / "out")
    assert _one_error_line(result), result
    assert str(archive) in result.err and "more than 10 members" in result.err and "SHARDWISE_MAX_ARCHIVE_MEMBERS" in result.err
    assert listing(temp_dir) == [] and not (tmp_path / "out").exists()
    monkeypatch.setenv("SHARDWISE_MAX_ARCHIVE_MEMBERS", "100")
    assert cli("unpack", archive, tmp_path / "out").code == 0


def test_a_gzip_archive_that_inflates_past_the_ratio_is_refused_and_leaves_no_copy(cli, tmp_path, temp_dir, monkeypatch):
    monkeypatch.setattr(tar_index, "GZIP_ANY_RATIO_BYTES", 0)  # the bomb stays tiny: any ratio counts
    archive = _tar(tmp_path / "bomb.nemo", {"./model_config.yaml": b"a: 1\n", "./zeros": bytes(1 << 20)}, gz=True)
    assert os.path.getsize(archive) * 100 < 1 << 20
    result = cli("unpack", archive, tmp_path / "out")
    assert _one_error_line(result), result
    assert str(archive) in result.err and "decompression bomb" in result.err and "SHARDWISE_MAX_GZIP_RATIO" in result.err
    assert listing(temp_dir) == [] and not (tmp_path / "out").exists()
    monkeypatch.setenv("SHARDWISE_MAX_GZIP_RATIO", "nonsense")
    result = cli("unpack", archive, tmp_path / "out")
    assert _one_error_line(result) and "SHARDWISE_MAX_GZIP_RATIO='nonsense'" in result.err, result
    monkeypatch.setenv("SHARDWISE_MAX_GZIP_RATIO", "100000")  # a user who trusts the archive raises the limit
    assert cli("unpack", archive, tmp_path / "out").code == 0
    assert (tmp_path / "out" / "zeros").stat().st_size == 1 << 20 and listing(temp_dir) == []


def test_copies_left_by_killed_processes_are_swept_by_the_next_decompression(cli, tmp_path, temp_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temp_dir / f"shardwise-gunzip-{dead.pid}-abcd_123.tar"
    alive = temp_dir / f"shardwise-gunzip-{os.getpid()}-abcd_123.tar"  # a copy in use by a live process
    other = temp_dir / f"someone-else-{dead.pid}.tar"
    for path in (stale, alive, other):
        path.write_bytes(b"x")
    archive = _tar(tmp_path / "small.nemo", {"./model_config.yaml": b"a: 1\n"}, gz=True)
    assert cli("unpack", archive, tmp_path / "out").code == 0
    assert listing(temp_dir) == sorted([alive.name, other.name])


_STALLED_CHILD = textwrap.dedent("""
    import gzip, sys, time
    from pathlib import Path

    read = gzip.GzipFile.read

    def stalled(self, size=-1):  # hand out one piece, then stall mid-decompression until terminated
        if getattr(self, "_stalled", False):
            Path(sys.argv[1]).touch()
            time.sleep(60)
        self._stalled = True
        return read(self, min(size, 4096) if size and size > 0 else 4096)

    gzip.GzipFile.read = stalled
    from shardwise.cli import run
    sys.exit(run(["unpack", sys.argv[2], sys.argv[3]]))
""")


def test_sigterm_during_decompression_removes_the_temporary_copy(tmp_path, temp_dir):
    archive = _tar(tmp_path / "big.nemo", {"./model_config.yaml": b"a: 1\n", "./data": os.urandom(64 << 10)}, gz=True)
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_CHILD, str(ready), str(archive), str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(temp_dir)},
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), "the child never started decompressing"
        assert [p.name.startswith("shardwise-gunzip-") for p in temp_dir.iterdir()] == [True]
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=20)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 143, err
    assert err.startswith("shardwise: terminated") and "Traceback" not in err, err
    assert listing(temp_dir) == [] and listing(tmp_path) == sorted(["big.nemo", "ready", "tmp"])


def test_restore_from_names_its_artifact_folder_for_its_process_and_sweeps_those_of_killed_ones(tmp_path, temp_dir):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    archive = shardwise.save_to(dict(sample_state_dict()), tmp_path / "m.nemo", config={}, artifacts={"tokenizer.vocab_file": tmp_path / "vocab.txt"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temp_dir / f"shardwise-artifacts-{dead.pid}-abcd_123"
    (stale / "inner").mkdir(parents=True)
    with shardwise.restore_from(archive) as restored:
        assert restored.artifacts_dir.parent == temp_dir and restored.artifacts_dir.name.startswith(f"shardwise-artifacts-{os.getpid()}-")
        assert not stale.exists()
    assert listing(temp_dir) == []


def test_a_gnu_sparse_member_is_refused_before_anything_is_written(cli, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, kind in (("a.bin", b"x" * 1024, tarfile.GNUTYPE_SPARSE), ("model_config.yaml", b"a: 1\n", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "sparse.nemo"
    archive.write_bytes(buffer.getvalue())
    result = cli("unpack", archive, tmp_path / "out")
    assert _one_error_line(result) and "sparse" in result.err and "a.bin" in result.err
    assert not (tmp_path / "out").exists()


def test_temporary_folders_of_killed_processes_are_swept_by_the_next_one(temp_dir):
    from shardwise.atomic import temporary_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temp_dir / f"shardwise-companions-{dead.pid}-abcd_123"
    alive = temp_dir / f"shardwise-companions-{os.getpid()}-abcd_456"
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "tokenizer.json").write_bytes(b"{}")
    with temporary_folder("shardwise-companions-") as mine:
        assert mine.is_dir() and mine.name.startswith(f"shardwise-companions-{os.getpid()}-")
        assert not stale.exists() and alive.exists()
    assert listing(temp_dir) == sorted([alive.name, f"{alive.name}/tokenizer.json"])
