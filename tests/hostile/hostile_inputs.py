"""Hostile variants of valid checkpoints, and a boxed run of the CLI, for the fuzz suite.

- :func:`mutations` is a hypothesis strategy of byte damage (truncate, flip bits, overwrite a
  range); :func:`damage` applies it. :func:`structured_edit` changes one value a parser reads (a
  pickle's int, memo index or string; a JSON or YAML value, nesting or alias bomb; a safetensors
  header value). :func:`rewrite_member` rewrites a tar archive (plain or gzip) with one member
  renamed (to a hostile name from :data:`HOSTILE_NAMES`) or its content edited.
- :func:`run_boxed` runs ``shardwise ARGS...`` in the test process (fast: everything is imported
  once), time-boxed by an alarm and memory-boxed by a lowered address-space limit, so that a hang
  or a memory bomb fails the example instead of stalling or exhausting the machine.
- :func:`snapshot` records every file under a folder with its size and digest, to prove that the
  input was left as it was and that nothing appeared outside the output folder.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickletools
import re
import struct
import resource
import signal
import tarfile
import traceback
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

__all__ = [
    "HOSTILE_NAMES", "LINK_TARGETS", "Outcome", "damage", "mutations", "rewrite_member", "run_boxed", "snapshot", "structured_edit", "tar_members",
]

# Names a tar member may claim. ``{root}`` becomes the sandbox root (absolute names that would land
# in the sandbox, where the test sees them), ``{name}`` a harmless file name.
HOSTILE_NAMES = (
    "../{name}",
    "../../victim/{name}",
    "./../{name}",
    "a/../../{name}",
    "{root}/victim/{name}",
    ".//{root}/victim/{name}",
    "a//b",
    ".//{name}",
    "./",
    ".",
    "..",
    "",
    "mp_rank_00/../../{name}",
    "line\nbreak",
    "x" * 300,
    "\\..\\{name}",
)

HEADER_BYTES = 1024  # how far from either end most edits land: where the formats keep their headers and indexes
LINK_TARGETS = ("../victim/keep.txt", "{root}/victim/keep.txt", "../../victim", "{root}/victim", "model_config.yaml", "./")
UNCAUGHT = 70  # the exit code recorded when shardwise let an exception escape (a traceback on stderr)
TIMEOUT_SECONDS = 20.0  # a tiny checkpoint converts in well under a second; 20 s is a hang even on a busy 2-core machine
MEMORY_HEADROOM = 1 << 30  # address space a run may add to the test process's: tiny inputs need a few MB, a bomb needs more


@dataclass(frozen=True)
class Outcome:
    """What one boxed CLI run did: exit code (None when killed), stdout, stderr, and why it was killed."""

    code: int | None
    out: str
    err: str
    killed: str | None = None

    def __str__(self) -> str:
        return f"exit {self.code}{f' ({self.killed})' if self.killed else ''}; stderr ends: {self.err[-700:]!r}"


def mutations(max_offset: int) -> st.SearchStrategy:
    """One to three byte edits, each ``(kind, offset, value)`` with ``offset < max_offset``:
    ``truncate`` (keep ``offset`` bytes), ``flip`` (xor the byte with ``1 << value``) or
    ``overwrite`` (``value`` bytes at ``offset``)."""
    last = max(max_offset - 1, 0)
    # headers sit at the start (safetensors, pickle, tar) or the end (zip's central directory)
    offset = st.one_of(st.integers(0, min(last, HEADER_BYTES)), st.integers(max(0, last - HEADER_BYTES), last), st.integers(0, last))
    edit = st.one_of(
        st.tuples(st.just("truncate"), offset, st.just(0)),
        st.tuples(st.just("flip"), offset, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), offset, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("overwrite"), offset, st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff\xff\xff\xff\xff"])),
    )
    return st.lists(edit, min_size=1, max_size=3)


def damage(data: bytes, edits: list[tuple]) -> bytes:
    """``data`` with ``edits`` (from :func:`mutations`) applied in order; offsets past the end wrap."""
    buf = bytearray(data)
    for kind, offset, value in edits:
        at = offset % max(len(buf), 1)
        if kind == "truncate":
            del buf[at:]
        elif kind == "flip" and buf:
            buf[at] ^= 1 << value
        elif kind == "overwrite":
            buf[at:at + len(value)] = value
    return bytes(buf)


# -- structure-aware edits: values a parser reads, not random bytes -----------------------------
HOSTILE_INTS = (0, 1, -1, 7, 255, 65535, 2**31 - 1, -(2**31), 2**24, 2**40, 2**63 - 1)
HOSTILE_TEXT_NUMBERS = ("-1", "0", "1e308", "18446744073709551616", "99999999999", "-9223372036854775809", "NaN", "1.5")
HOSTILE_STRINGS = ("../../victim/pwned", "/abs/pwned", "a//b", "", ".", "..", "x" * 5000, "line\nbreak", "\u0000")
DEEP = 100_000  # JSON nesting far past Python's recursion limit (1000)
DEEP_YAML = 3_000  # YAML nesting past the limit too; PyYAML's pure-Python parser needs seconds per thousand levels
YAML_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
) + "model: *i\n"  # 9**9 leaves from 10 lines (~400 bytes), if anything expands the aliases


def _dag_bomb(depth: int = 40) -> bytes:
    """A pickle of ``depth`` nested pairs whose halves are one shared object: tiny, but 2**depth leaves to a naive walk."""
    body = b"]q\x00" + b"".join(b"h%ch%c\x86q%c" % (i - 1, i - 1, i) for i in range(1, depth + 1))
    return b"\x80\x02" + body + b"."


PICKLE_BOMBS = {
    "dag": _dag_bomb(),
    "memo": b"\x80\x02]r\xff\xff\xff\xff.",  # LONG_BINPUT 2**32-1: the C unpickler grows its memo array to that index
    "cycle": b"\x80\x02}q\x00X\x01\x00\x00\x00sh\x00s.",  # a dict holding itself
    "deep": b"",  # lists nested as deep as the replaced pickle's length allows (see _deep_pickle)
}


def _deep_pickle(depth: int) -> bytes:
    """Lists nested ``depth`` deep in ``2 * depth + 4`` bytes: past the recursion limit from a ~2 KB pickle on."""
    depth = max(depth, 1)
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


_INT_OPS = {"BININT1": ("<B", 0, 255), "BININT2": ("<H", 0, 65535), "BININT": ("<i", -(2**31), 2**31 - 1),
            "BINGET": ("<B", 0, 255), "LONG_BINGET": ("<I", 0, 2**32 - 1), "BINPUT": ("<B", 0, 255), "LONG_BINPUT": ("<I", 0, 2**32 - 1)}


def _pickle_edit(data: bytes, draw) -> tuple[bytes, str]:
    """One pickle argument of the first pickle in ``data`` replaced in place (same width): an int
    (shape, offset, size), a memo index (shared or cyclic references) or a short string's bytes."""
    ops = []
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in _INT_OPS or op.name in ("SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINSTRING"):
                ops.append((op.name, arg, pos))
    except Exception:  # already damaged, or several pickles: the ones read so far are enough
        pass
    bomb = draw(st.sampled_from([None, None, None, *PICKLE_BOMBS]))
    if bomb is not None or not ops:  # the bomb replaces the pickle; its length stays (zero padding after STOP)
        bomb = bomb or "dag"
        raw = _deep_pickle((len(data) - 4) // 2) if bomb == "deep" else PICKLE_BOMBS[bomb]
        replaced = raw + b"\0" * max(0, len(data) - len(raw))
        return replaced, f"pickle replaced by PICKLE_BOMBS[{bomb!r}]"
    name, arg, pos = draw(st.sampled_from(ops))
    buf = bytearray(data)
    if name in _INT_OPS:
        fmt, lo, hi = _INT_OPS[name]
        value = draw(st.sampled_from([v for v in (*HOSTILE_INTS, arg + 1, arg - 1) if lo <= v <= hi] or [lo]))
        buf[pos + 1:pos + 1 + struct.calcsize(fmt)] = struct.pack(fmt, value)
        return bytes(buf), f"pickle {name} at {pos}: {arg!r} -> {value!r}"
    width = len(arg.encode("utf-8", "surrogatepass")) if isinstance(arg, str) else len(arg)
    start = pos + 1 + (1 if name.startswith("SHORT") else 4)
    text = draw(st.sampled_from(["../../victim/pwned", "/abs", "a//b", "torch.FloatStorage", "os.system", "\x00"]))
    new = (text.encode() * (width // max(len(text), 1) + 1))[:width]
    buf[start:start + width] = new
    return bytes(buf), f"pickle {name} at {pos}: {arg!r} -> {new!r}"


def _zip_member_edit(data: bytes, draw) -> tuple[bytes, str]:
    """A pickle member (``*.pkl``) of a stored zip (torch's format) edited in place, its CRC-32 fixed
    in both headers so that only the pickle's content is hostile."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [i for i in z.infolist() if i.filename.endswith(".pkl") and i.compress_type == zipfile.ZIP_STORED]
    if not members:
        return data, "no stored pickle member"
    info = draw(st.sampled_from(members))
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    body, what = _pickle_edit(data[start:start + info.compress_size], draw)
    body = body[:info.compress_size]  # the member keeps its size (a bomb longer than the pickle is cut)
    buf = bytearray(data)
    buf[start:start + len(body)] = body
    crc = struct.pack("<I", zlib.crc32(body))
    buf[info.header_offset + 14:info.header_offset + 18] = crc
    for at in [m.start() for m in re.finditer(re.escape(b"PK\x01\x02"), data)]:
        if data[at + 46:at + 46 + len(info.filename.encode())] == info.filename.encode():
            buf[at + 16:at + 20] = crc
    return bytes(buf), f"zip member {info.filename}: {what}"


def _text_edit(text: str, draw, yaml: bool) -> tuple[str, str]:
    """A JSON or YAML text with one number or string replaced by a hostile one, or nested past the recursion limit."""
    kind = draw(st.sampled_from(["number", "string", "deep", "bomb"] if yaml else ["number", "string", "deep"]))
    if kind == "deep":
        depth = DEEP_YAML if yaml else DEEP
        return "[" * depth + "]" * depth, f"{depth} nested lists"
    if kind == "bomb":
        return YAML_BOMB, "YAML alias bomb"
    pattern = r"(?<![\w.\"])-?\d+(\.\d+)?(e-?\d+)?" if kind == "number" else r'"([^"\\]|\\.)*"' if not yaml else r"(?<=: )[A-Za-z_./][^\n#]*"
    spots = list(re.finditer(pattern, text))
    if not spots:
        return text, f"no {kind} to replace"
    spot = draw(st.sampled_from(spots))
    new = draw(st.sampled_from(HOSTILE_TEXT_NUMBERS if kind == "number" else HOSTILE_STRINGS))
    if kind == "string" and not yaml:
        new = json.dumps(new)
    return text[:spot.start()] + new + text[spot.end():], f"{spot.group()[:40]!r} -> {new[:40]!r}"


def structured_edit(name: str, data: bytes, draw) -> tuple[bytes, str]:
    """``data`` (the file ``name``) with one value its parser reads made hostile, chosen by ``draw``
    (a hypothesis ``data.draw``): a pickle argument (plain pickles, torch zips, legacy torch files),
    a JSON or YAML value or nesting, or a safetensors header value; returns the bytes and what changed."""
    if data[:4] == b"PK\x03\x04":
        return _zip_member_edit(data, draw)
    if name.endswith((".json", ".yaml", ".yml")):
        text, what = _text_edit(data.decode("utf-8", "replace"), draw, yaml=not name.endswith(".json"))
        return text.encode(), what
    if len(data) > 9 and data[8:9] == b"{":
        n = struct.unpack_from("<Q", data)[0]
        header, what = _text_edit(data[8:8 + n].decode("utf-8", "replace"), draw, yaml=False)
        raw = header.encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:], f"safetensors header: {what}"
    if data[:1] == b"\x80" or name == ".metadata":
        return _pickle_edit(data, draw)
    return data, "no structure known"


def tar_members(data: bytes) -> list[tuple[str, bool]]:
    """The members of a tar (plain or gzip) held in memory: (name, is a regular file)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return [(m.name, m.isfile()) for m in tar.getmembers()]


def rewrite_member(data: bytes, index: int, *, name: str | None = None, edit=None, link: tuple[bytes, str] | None = None) -> bytes:
    """The tar ``data`` (plain or gzip, kept as it was) with member ``index`` renamed to ``name``,
    its content replaced by ``edit(content)``, or turned into a link: ``link`` is (type, target),
    type ``tarfile.SYMTYPE`` or ``tarfile.LNKTYPE``.

    Written in the GNU format so that any name, however long or odd, is stored as given.
    """
    compressed = data[:2] == b"\x1f\x8b"
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as src, tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for i, member in enumerate(src.getmembers()):
            body = src.extractfile(member).read() if member.isfile() else None
            if i == index:
                member.name = name if name is not None else member.name
                body = edit(body) if edit is not None and body is not None else body
                if link is not None:
                    member.type, member.linkname, body = link[0], link[1], None
                    member.size = 0
            if body is not None:
                member.size = len(body)
            dst.addfile(member, io.BytesIO(body) if body is not None else None)
    raw = out.getvalue()
    return gzip.compress(raw, mtime=0) if compressed else raw


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``folder`` (hidden ones included): relative path -> (size, sha256), folders as (-1, "")."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or not path.is_file():
            found[rel] = (-1, "link" if path.is_symlink() else "")
        else:
            found[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def _address_space() -> int:
    """This process's virtual memory size in bytes (VmSize), the base of the run's cap."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class Hang(BaseException):
    """Raised by the alarm into a run that overstayed its time box (a BaseException, so that no
    ``except Exception`` in shardwise can swallow it)."""


@contextlib.contextmanager
def _boxed(cwd: Path, timeout: float):
    """Inside: working folder ``cwd``, at most ``timeout`` seconds (then :class:`Hang` is raised at
    the next Python instruction) and :data:`MEMORY_HEADROOM` more address space (then allocations
    fail with MemoryError); all three restored on the way out."""

    def alarm(signum, frame):
        raise Hang()

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    previous_handler = signal.signal(signal.SIGALRM, alarm)
    previous_cwd = os.getcwd()
    os.chdir(cwd)
    resource.setrlimit(resource.RLIMIT_AS, (min(_address_space() + MEMORY_HEADROOM, hard if hard > 0 else 2**62), hard))
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous_handler)
        os.chdir(previous_cwd)


def run_boxed(argv: list[str | os.PathLike], cwd: Path, timeout: float = TIMEOUT_SECONDS) -> Outcome:
    """Run ``shardwise ARGV...`` in this process (``shardwise.cli.run``, as the ``cli`` fixture does),
    with ``cwd`` as the working folder, at most ``timeout`` seconds and :data:`MEMORY_HEADROOM` more
    address space. An exception shardwise lets escape (MemoryError included) gives exit code
    :data:`UNCAUGHT` with its traceback as stderr; a run that overstays is stopped (``killed="timeout"``).

    A hang inside C code is not interrupted until it returns to Python: the formats' parsers are
    Python, so the alarm reaches them.
    """
    from shardwise.cli import run

    out, err = io.StringIO(), io.StringIO()
    code, killed = UNCAUGHT, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with _boxed(cwd, timeout):
                code = run([os.fspath(a) for a in argv])
        except Hang:
            killed = f"timeout after {timeout:g} s"
        except BaseException:  # what shardwise let escape: a user would see this traceback
            traceback.print_exc(file=err)
    return Outcome(None if killed else code, out.getvalue(), err.getvalue(), killed)
