"""Progress bars appear only on terminals; outputs are committed atomically or not at all."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import zlib

import pytest

from shardwise.atomic import atomic_output
from shardwise.errors import OutputExistsError
from shardwise.progress import NO_PROGRESS, terminal_progress

from conftest import listing


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal_and_with_quiet():
    assert terminal_progress(stream=io.StringIO()) is NO_PROGRESS
    assert terminal_progress(quiet=True, stream=_FakeTTY()) is NO_PROGRESS


def test_progress_on_a_terminal_shows_bytes_speed_and_time_left():
    stream = _FakeTTY()
    bar = terminal_progress(stream=stream)
    bar.start(3 * 2**20, "convert to torch")
    bar.advance(2**20)
    bar.advance(2 * 2**20)
    bar.finish()
    shown = stream.getvalue()
    assert "convert to torch" in shown and "3.0/3.0 MiB" in shown and "/s" in shown


def test_cli_draws_a_bar_in_a_real_pseudo_terminal_and_not_in_a_pipe(st_file, tmp_path):
    def run(args, use_pty):
        if not use_pty:
            return subprocess.run(args, capture_output=True, text=True).stderr
        leader, follower = pty.openpty()
        proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        proc.wait()
        os.close(leader)
        return b"".join(chunks).decode(errors="replace")

    base = [sys.executable, "-m", "shardwise", "convert", str(st_file)]
    on_tty = run(base + [str(tmp_path / "a.pt")], use_pty=True)
    piped = run(base + [str(tmp_path / "b.pt")], use_pty=False)
    quiet = run(base + [str(tmp_path / "c.pt"), "--quiet"], use_pty=True)
    assert "convert to torch" in on_tty
    assert "convert to torch" not in piped and "convert to torch" not in quiet


def test_atomic_file_appears_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target, is_dir=False) as stage:
            stage.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert listing(tmp_path) == []
    with atomic_output(target, is_dir=False) as stage:
        stage.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and listing(tmp_path) == ["out.bin"]


def test_atomic_folder_replaces_old_one_only_when_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target, is_dir=True, overwrite=True) as stage:
            (stage / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["model", "model/old.txt"]
    with atomic_output(target, is_dir=True, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert listing(tmp_path) == ["model", "model/new.txt"]


def test_existing_output_is_refused_before_anything_is_staged(tmp_path):
    target = tmp_path / "x"
    target.write_text("keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_output(target, is_dir=False):
            pytest.fail("must not get here")
    assert listing(tmp_path) == ["x"]


def test_output_appearing_during_the_write_is_not_clobbered(tmp_path):
    target = tmp_path / "race"
    with pytest.raises(OutputExistsError):
        with atomic_output(target, is_dir=False) as stage:
            stage.write_text("mine")
            target.write_text("someone else's")
    assert target.read_text() == "someone else's" and listing(tmp_path) == ["race"]


def test_overwrite_never_replaces_a_folder_with_a_file_or_the_reverse(tmp_path):
    folder = tmp_path / "precious.safetensors"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="is a folder"):
        with atomic_output(folder, is_dir=False, overwrite=True) as stage:
            stage.write_text("weights")
    assert (folder / "thesis.tex").read_text() == "years of work"
    afile = tmp_path / "out"
    afile.write_text("a file")
    with pytest.raises(OutputExistsError, match="is a file"):
        with atomic_output(afile, is_dir=True, overwrite=True):
            pass
    assert afile.read_text() == "a file" and listing(tmp_path) == ["out", "precious.safetensors", "precious.safetensors/thesis.tex"]


def test_write_all_finishes_short_writes():
    from shardwise.atomic import write_all

    class Stingy(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            chunk = bytes(b[:3])  # like a capped write(2): fewer bytes than asked
            self.data += chunk
            return len(chunk)

    sink = Stingy()
    write_all(sink, b"0123456789" * 10)
    assert bytes(sink.data) == b"0123456789" * 10


def test_background_writer_keeps_order_and_content_with_alternating_buffers(tmp_path):
    from shardwise.background import BackgroundWriter

    path = tmp_path / "out.bin"
    expected = bytearray()
    buffers = [bytearray(3 << 20), bytearray(3 << 20)]
    with open(path, "wb", buffering=0) as f:
        writer = BackgroundWriter(f)
        for i in range(12):
            buf = buffers[i % 2]
            buf[:] = bytes([i]) * len(buf)  # refilled only after the other buffer's write was handed off
            writer.write(buf)
            expected += buf
            writer.write(b"small")  # queued, still in order
            expected += b"small"
        assert writer.tell() == len(expected)
        writer.close()
    assert path.read_bytes() == bytes(expected)


def test_a_small_chunk_from_the_other_buffer_still_releases_the_write_in_flight(tmp_path):
    """Two alternating buffers, the second holding a chunk under the threshold: refilling the first
    must wait for its background write, or the file gets the refilled bytes."""
    import threading

    from shardwise.background import BackgroundWriter

    release = threading.Event()
    written = bytearray()

    class Slow(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            release.wait(0.2)  # the background write is still copying when the caller moves on
            written.extend(b)
            return len(b)

    buffers = [bytearray(2 << 20), bytearray(2 << 20)]
    writer = BackgroundWriter(Slow())
    expected = bytearray()
    for i in range(4):
        buffers[0][:] = bytes([i]) * len(buffers[0])
        writer.write(buffers[0])  # large: in the background
        expected += buffers[0]
        buffers[1][:16] = bytes([100 + i]) * 16
        writer.write(memoryview(buffers[1])[:16])  # small: queued, after waiting for buffers[0]
        expected += buffers[1][:16]
    writer.close()
    assert bytes(written) == bytes(expected)


def test_headers_between_tensors_do_not_wait_for_the_write_in_flight():
    """write_copy (a zip or tar header) returns while a large write is still running; tell() counts it."""
    import threading

    from shardwise.archive.tar_writer import MemberSink
    from shardwise.background import BackgroundWriter

    release = threading.Event()
    written = bytearray()

    class Blocked(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            release.wait(10)
            written.extend(b)
            return len(b)

    writer = BackgroundWriter(Blocked())
    sink = MemberSink(writer, 0)
    first = bytes(range(256)) * (8 << 10)  # 2 MiB
    sink.write(first)
    sink.write_copy(b"HEADER")
    assert not release.is_set() and not written  # returned with the first write still blocked
    assert writer.tell() == sink.tell() == len(first) + 6
    release.set()
    sink.write(b"tail")
    writer.close()
    assert bytes(written) == first + b"HEADER" + b"tail"
    assert sink.crc == zlib.crc32(bytes(written))


def test_background_write_errors_surface_at_the_next_call(tmp_path):
    from shardwise.background import BackgroundWriter

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(28, "No space left on device")

    writer = BackgroundWriter(Full())
    writer.write(bytearray(2 << 20))  # starts in the background
    with pytest.raises(OSError, match="No space left"):
        writer.flush()


def test_abort_waits_for_the_write_in_flight_even_when_interrupted(monkeypatch):
    import threading

    from shardwise.background import BackgroundWriter

    release = threading.Event()

    class Slow(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            release.wait(5)
            return len(b)

    writer = BackgroundWriter(Slow())
    writer.write(bytearray(2 << 20))
    interrupts = iter([KeyboardInterrupt(), KeyboardInterrupt()])
    real_join = threading.Thread.join

    def join_interrupted_twice(self, timeout=None):
        for interrupt in interrupts:
            release.set()
            raise interrupt
        return real_join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", join_interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        writer.abort()
    assert writer._thread is None and writer.closed  # nothing left writing behind the caller's back


def test_durable_close_closes_even_when_fsync_fails(tmp_path, monkeypatch):
    from shardwise.atomic import durable_close

    f = open(tmp_path / "x", "wb")

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        durable_close(f)
    assert f.closed


def _slow_stream(payload: bytes, pieces: int, delay: float, log: list | None = None):
    import time

    def produce(sink):
        for _ in range(pieces):
            time.sleep(delay)
            sink.write(payload)
            if log is not None:
                log.append(payload[:1])

    return produce


def test_files_written_at_once_come_back_in_the_order_given(tmp_path):
    """Two lanes, the first file the slowest: members (and the manifest built from them) keep the given order."""
    from shardwise.archive.folder_writer import FolderWriter

    writer = FolderWriter(tmp_path)
    streams = [(f"model/f{i}.bin", _slow_stream(bytes([i]) * 1000, 5, 0.02 if i == 0 else 0.001)) for i in range(5)]
    written = writer.add_streams(streams, lanes=2)
    writer.close()
    assert [m.name for m in written] == [m.name for m in writer.members] == [f"model/f{i}.bin" for i in range(5)]
    for i, member in enumerate(written):
        data = (tmp_path / member.name).read_bytes()
        assert data == bytes([i]) * 5000 and (member.size, member.crc32) == (5000, zlib.crc32(data))


def test_a_failing_file_stops_the_one_beside_it_and_starts_no_other(tmp_path):
    from shardwise.archive.folder_writer import FolderWriter
    from shardwise.errors import FormatError

    def broken(sink):
        import time

        sink.write(b"x" * 10)
        time.sleep(0.1)  # the file beside it is well under way
        raise FormatError("source.safetensors: file is truncated")

    beside: list = []
    started: list = []

    def never(sink):
        started.append(True)

    writer = FolderWriter(tmp_path)
    streams = [("a.bin", _slow_stream(b"a" * 100, 200, 0.01, beside)), ("b.bin", broken), ("c.bin", never), ("d.bin", never)]
    with pytest.raises(FormatError, match="truncated"):
        writer.add_streams(streams, lanes=2)
    assert 0 < len(beside) < 200  # stopped at a write, long before its 200 pieces (2 s)
    assert not started


def test_conversion_output_is_the_same_with_one_lane_or_two(tmp_path, monkeypatch):
    """nxdt and nemo-dir outputs written file by file and two files at once are byte-identical, manifests included."""
    import hashlib

    import shardwise.reshard.write as write_module
    from conftest import tiny_llama
    from shardwise.background import BackgroundWriter
    from shardwise.layout import stream
    from shardwise.reshard.convert import convert_layout

    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)  # many chunks per file, all through the background writers
    monkeypatch.setitem(BackgroundWriter.__init__.__kwdefaults__, "threshold", 512)
    src = tiny_llama(tmp_path / "hf", hidden=64, intermediate=128, layers=3)
    digests = []
    for lanes in (1, 2):
        monkeypatch.setattr(write_module, "FILE_LANES", lanes)
        out = tmp_path / f"lanes{lanes}"
        convert_layout(src, out / "nx", to="nxdt", tp=2, pp=2)
        convert_layout(src, out / "nd", to="nemo-dir", tp=2, pp=2)
        digests.append({str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()})
    assert digests[0] == digests[1] and len(digests[0]) > 8


def test_an_interrupt_while_files_are_handed_out_stops_those_already_started(tmp_path, monkeypatch):
    """A Ctrl-C between two submissions must not leave the queued files to be written in full."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from shardwise.archive.folder_writer import FolderWriter

    real_submit = ThreadPoolExecutor.submit
    calls = []

    def interrupted_at_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_submit(self, *args, **kwargs)

    monkeypatch.setattr(ThreadPoolExecutor, "submit", interrupted_at_the_third)
    pieces: list = []
    writer = FolderWriter(tmp_path)
    streams = [(f"f{i}.bin", _slow_stream(b"x" * 10, 100, 0.01, pieces)) for i in range(4)]
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        writer.add_streams(streams, lanes=2)
    assert time.monotonic() - started < 0.8 and len(pieces) < 100  # 2 files x 100 writes of 10 ms if not stopped


def test_a_writer_stays_usable_after_a_failed_batch(tmp_path):
    from shardwise.archive.folder_writer import FolderWriter

    def broken(sink):
        raise OSError(28, "No space left on device")

    writer = FolderWriter(tmp_path)
    with pytest.raises(OSError, match="No space"):
        writer.add_streams([("a.bin", broken), ("b.bin", _slow_stream(b"b", 3, 0.01))], lanes=2)
    writer.add_bytes("manifest.json", b"{}")
    writer.add_streams([("c.bin", _slow_stream(b"c", 3, 0)), ("d.bin", _slow_stream(b"d", 3, 0))], lanes=2)
    assert (tmp_path / "manifest.json").read_bytes() == b"{}" and (tmp_path / "d.bin").read_bytes() == b"ddd"


def test_progress_is_advanced_one_call_at_a_time_when_files_are_written_at_once(tmp_path, monkeypatch):
    """A user's progress object need not be thread-safe: the two writing threads' advance() calls are serialised."""
    import threading
    import time

    from conftest import tiny_llama
    from shardwise.layout import stream
    from shardwise.reshard.convert import convert_layout

    class Careless:
        def __init__(self):
            self.done, self.inside, self.overlaps, self.threads = 0, False, 0, set()

        def start(self, total, description):
            self.total = total

        def advance(self, n):
            self.overlaps += self.inside
            self.inside = True
            self.threads.add(threading.current_thread().name)
            time.sleep(0.0005)
            self.done += n
            self.inside = False

        def finish(self):
            pass

    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)
    src = tiny_llama(tmp_path / "hf", hidden=64, intermediate=128, layers=3)
    progress = Careless()
    convert_layout(src, tmp_path / "nx", to="nxdt", tp=2, pp=2, progress=progress)
    assert progress.overlaps == 0 and progress.done == progress.total
    assert len(progress.threads) == 2  # really written two files at a time


def test_a_stage_of_another_users_live_process_is_left_alone(tmp_path, monkeypatch):
    """os.kill(pid, 0) raises PermissionError for another user's live process: that process exists,
    so its staging folder stays, and the sweep does not fail."""
    from shardwise import atomic

    stage = tmp_path / ".out.shardwise-tmp-4242-0123abcd"
    stage.mkdir()

    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "kill", kill)
    assert atomic.process_exists(4242)
    atomic.remove_stale_stages(tmp_path)
    assert stage.is_dir()
