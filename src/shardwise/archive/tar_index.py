"""The members of a tar archive, found by walking its headers only: no data is read or extracted.

An uncompressed tar stores each member's bytes contiguously, so a member is fully described by
its data offset and size, and can be read in place (:class:`~shardwise.formats.region.Region`).
Gzip-compressed archives (``.nemo`` files written before NeMo 1.7) have no such offsets; they are
decompressed once into a temporary uncompressed tar (see :func:`open_tar`), which costs disk
space equal to the archive and is deleted on close. Inside :func:`shared_decompression` (one CLI
command) every open of the same archive reuses one copy, deleted when the block ends: a command
opens an archive more than once (to detect what it holds, then to read it). The copy is named for
the process that made it: the CLI removes it on SIGTERM as on Ctrl-C, and copies of a process
killed outright are swept by the next decompression. A copy may not inflate past
:data:`MAX_GZIP_RATIO` times the archive, nor an archive hold more than :data:`MAX_MEMBERS`
members (each limit can be raised through an environment variable).

Names are normalised the way NeMo writes them and tar reads them: ``./model_config.yaml`` and
``model_config.yaml`` are the same member, stored as ``model_config.yaml``
(:func:`normalize_name`); :func:`member_path` is the one way a name becomes a path to write.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import os
import tarfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..atomic import process_temporary_file, write_all
from ..checksum import crc32
from ..errors import FormatError, OptionError
from ..formats.region import Region
from ..units import format_bytes

__all__ = [
    "TarMember", "TarIndex", "open_tar", "shared_decompression", "looks_like_tar", "normalize_name", "unsafe_name", "unsafe_reason",
    "member_path", "archive_limit", "MAX_MEMBERS", "MAX_GZIP_RATIO",
]

_BLOCK = 512

# Limits on the work and disk a hostile archive can cause. No real checkpoint comes near them:
# they exist because 2 million members took 291 s to index, and a 2 MB gzip archive inflated to a
# 2 GiB temporary copy. Each can be raised through its environment variable.

# Members indexed before giving up: a header takes 75-200 us to parse, so this bounds the walk to
# seconds. A NeMo archive holds a few members per TP x PP rank
# (about a thousand at TP=8 x PP=64); a distributed checkpoint two files per writing rank, so
# about 10,000 for the largest jobs: this is five times that.
MAX_MEMBERS = 50_000
MAX_MEMBERS_ENV = "SHARDWISE_MAX_ARCHIVE_MEMBERS"

# How many times its compressed size a gzip archive may inflate to. Floating-point weights shrink
# by less than 2x under gzip; only data that is nearly all zeros, such as a bomb, shrinks by
# hundreds (gzip's ceiling is about 1032x).
MAX_GZIP_RATIO = 100
MAX_GZIP_RATIO_ENV = "SHARDWISE_MAX_GZIP_RATIO"
# Up to this inflated size any ratio is allowed: small archives (a config, a tokenizer, the tar's
# zero padding) compress far better than weights, and a temporary copy this size costs nothing.
GZIP_ANY_RATIO_BYTES = 64 << 20



def archive_limit(variable: str, default: int) -> int:
    """The limit set by environment ``variable`` (a positive whole number), else ``default``."""
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise OptionError(f"{variable}={value!r}: must be a positive whole number")
    return limit


@dataclass(frozen=True)
class TarMember:
    """One archive entry. ``kind`` is file, dir, symlink, hardlink or other (devices, fifos...)."""

    name: str  # normalised: no leading "./", no trailing "/"; "" for the archive root "."
    raw_name: str  # as stored in the archive
    kind: str
    size: int
    offset: int  # where the data starts in the (uncompressed) tar
    mode: int
    linkname: str = ""


def normalize_name(raw: str) -> str:
    """The one name of a member, as tar extracts it: ``./a//b/./c/`` -> ``a/b/c``; the root ``.`` or ``./`` -> ``""``.

    Leading ``./`` are dropped, then empty and ``.`` segments, so names that extract to the same
    path are the same member (and a second copy of one is a duplicate). A name that still starts
    with ``/`` once its ``./`` are gone (``.//etc/x``) keeps one leading ``/``, so that
    :func:`unsafe_name` refuses it as absolute; ``..`` is kept for the same reason. Does not judge
    safety itself.
    """
    name = raw
    while name.startswith("./"):
        name = name[2:]
    lead = "/" if name.startswith("/") else ""
    return lead + "/".join(part for part in name.split("/") if part not in ("", "."))


def unsafe_name(name: str) -> str | None:
    """Why the relative path ``name`` (a normalised member name) could lead outside the folder it
    is written under, else None."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if "\\" in name:
        return "has a backslash in its path"
    if any(part == ".." for part in name.split("/")):
        return "has '..' in its path"
    if "\0" in name:
        return "has a NUL byte in its name"
    return None


def unsafe_reason(member: TarMember) -> str | None:
    """Why extracting ``member`` could write outside the target folder or create a special file, else
    None. Judges the normalised name, the one extraction writes to (not the raw one)."""
    reason = unsafe_name(member.name)
    if reason:
        return reason
    if not member.name and member.kind != "dir":
        return "is the archive root ('.') stored as a file, not a folder"
    if member.kind in ("symlink", "hardlink"):
        return f"is a {member.kind} (to {member.linkname!r})"
    if member.kind == "sparse":
        return "is a GNU sparse file, whose stored bytes are not its contents"
    if member.kind == "other":
        return "is a device, fifo or other special file"
    return None


def member_path(root: Path, name: str, label: str, *, folder: bool = False) -> Path:
    """``root / name``, the one way a member (or a name derived from one) becomes a path to write.

    FormatError when ``name`` is empty (``root`` itself), could leave ``root`` (:func:`unsafe_name`),
    or passes through a symbolic link that exists under ``root`` (a link planted in a reused
    folder such as ``restore_from``'s ``artifacts_dir`` would carry the write elsewhere): every
    parent is checked, and the entry itself when ``folder`` (it will hold files). A link at a
    file's own name is allowed: writers replace it by rename, never write through it.
    """
    reason = unsafe_name(name) if name else "names the target folder itself"
    if reason:
        raise FormatError(f"{label}: refusing to write {name!r} under {root}: it {reason}")
    parts = name.split("/")
    path = root
    for depth, part in enumerate(parts, 1):
        path = path / part
        if (depth < len(parts) or folder) and path.is_symlink():
            raise FormatError(f"{label}: refusing to write {name!r}: {path} is a symbolic link, which would carry the write outside {root}")
    return path


def _kind(info: tarfile.TarInfo) -> str:
    if info.issparse():
        return "sparse"  # its header's offset and size do not describe the bytes stored
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    return "other"


def looks_like_tar(head: bytes) -> bool:
    """True for gzip data or a tar header (POSIX/GNU magic, or a valid old-style checksum)."""
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return True
    if len(head) < _BLOCK or not head[148:156].strip(b" \0"):
        return False
    try:
        stored = int(head[148:156].strip(b" \0"), 8)
    except ValueError:
        return False
    return stored == sum(head[:148]) + 8 * 32 + sum(head[156:_BLOCK])


class TarIndex:
    """The members of one uncompressed tar file, by normalised name, in archive order.

    ``path`` is the file the offsets refer to (for a gzip archive: its temporary decompressed
    copy); ``label`` is the name used in messages (the archive the user gave). Close it to delete
    a temporary copy. Duplicate names, truncated data and a missing end-of-archive marker are
    FormatErrors.
    """

    def __init__(self, path: str, label: str, compressed: bool = False, temporary: bool = False) -> None:
        self.path = path
        self.label = label
        self.compressed = compressed
        self._temporary = temporary
        self.members: dict[str, TarMember] = {}
        self._walk()

    def _walk(self) -> None:
        size = os.path.getsize(self.path)
        end = 0
        try:
            with tarfile.open(self.path, "r:") as tar:
                limit = archive_limit(MAX_MEMBERS_ENV, MAX_MEMBERS)
                for count, info in enumerate(tar, 1):
                    if count > limit:
                        raise FormatError(
                            f"{self.label}: holds more than {limit} members, far more than any checkpoint archive; "
                            f"refusing to index it (set {MAX_MEMBERS_ENV} to raise the limit)"
                        )
                    member = TarMember(
                        normalize_name(info.name), info.name, _kind(info), info.size if info.isreg() else 0,
                        info.offset_data, info.mode, info.linkname,
                    )
                    if member.name in self.members and member.kind != "dir":
                        raise FormatError(f"{self.label}: member {info.name!r} appears twice in the archive")
                    if member.offset + member.size > size:
                        raise FormatError(
                            f"{self.label}: archive is truncated: member {info.name!r} needs bytes up to offset "
                            f"{member.offset + member.size} but the file ends at {size}"
                        )
                    self.members.setdefault(member.name, member)
                    end = member.offset + -(-member.size // _BLOCK) * _BLOCK
        except tarfile.TarError as e:
            raise FormatError(f"{self.label}: not a readable tar archive, or truncated ({e})") from None
        if not self.members:
            raise FormatError(f"{self.label}: the archive is empty")
        with open(self.path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * _BLOCK)
        if len(marker) < 2 * _BLOCK or marker.count(0) != len(marker):
            raise FormatError(f"{self.label}: archive is truncated: the end-of-archive marker after the last member is missing")

    def files(self) -> list[TarMember]:
        return [m for m in self.members.values() if m.kind == "file"]

    def get(self, name: str) -> TarMember | None:
        return self.members.get(normalize_name(name))

    def region(self, name: str) -> Region:
        """The bytes of regular-file member ``name``, readable in place."""
        member = self.members[normalize_name(name)]
        return Region(self.path, member.offset, member.size, f"{self.label}:{member.raw_name}")

    def read(self, member: TarMember) -> bytes:
        """A (small) member's bytes."""
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), member.size, member.offset)

    def stream(self, member: TarMember, out=None, *, chunk: int = 8 << 20) -> int:
        """CRC-32 of a member's bytes, read in chunks; each chunk is also written to ``out`` if given."""
        crc, done = 0, 0
        buffer = memoryview(bytearray(min(chunk, max(member.size, 1))))
        with open(self.path, "rb", buffering=0) as src:
            while done < member.size:
                view = buffer[: min(len(buffer), member.size - done)]
                n = os.preadv(src.fileno(), [view], member.offset + done)
                if n == 0:
                    raise FormatError(f"{self.label}: member {member.raw_name} is truncated")
                crc = crc32(view[:n], crc)
                if out is not None:
                    write_all(out, view[:n])
                done += n
        return crc

    def under(self, folder: str) -> list[TarMember]:
        """Members inside ``folder`` (normalised name), excluding the folder entry itself."""
        prefix = normalize_name(folder) + "/"
        return [m for m in self.members.values() if m.name.startswith(prefix)]

    def close(self) -> None:
        if self._temporary and os.path.exists(self.path):
            os.unlink(self.path)
            self._temporary = False

    def __enter__(self) -> "TarIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# archive identity -> decompressed copy, for the context inside shared_decompression() (not other threads)
_shared: contextvars.ContextVar[dict[tuple, str] | None] = contextvars.ContextVar("shardwise_shared_decompression", default=None)
_shared_lock = threading.Lock()


@contextlib.contextmanager
def shared_decompression():
    """Inside this block a gzip archive is decompressed once: later opens of the same file (same
    device, inode, size and modification time) index the same temporary copy, which is deleted
    when the outermost block ends (not when an index is closed). Nested blocks share the outer
    one. The sharing is per context: other threads (and code outside the block) keep one copy per
    open, deleted on close."""
    if _shared.get() is not None:
        yield
        return
    copies: dict[tuple, str] = {}
    token = _shared.set(copies)
    try:
        yield
    finally:
        _shared.reset(token)
        for temp in copies.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def open_tar(path: str | os.PathLike) -> TarIndex:
    """Index the tar at ``path``; a gzip-compressed tar is first decompressed to a temporary file
    (once per :func:`shared_decompression` block)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
        identity = _identity(os.fstat(f.fileno()))
    if head != b"\x1f\x8b":
        return TarIndex(path, path)
    shared = _shared.get()
    if shared is None:
        return _index_temporary(_gunzip(path), path, temporary=True)
    with _shared_lock:  # held while decompressing: threads given this context never decompress one archive twice
        if identity in shared:
            return TarIndex(shared[identity], path, compressed=True)
        temp = _gunzip(path)
        index = _index_temporary(temp, path, temporary=False)
        shared[identity] = temp
        return index


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _gunzip(path: str) -> str:
    """A decompressed copy of the gzip file ``path`` in a new temporary file (the caller removes it).

    The copy is named for this process, and copies left by processes that no longer exist are
    removed first (:func:`~shardwise.atomic.process_temporary_file`).
    FormatError when the data inflates past :data:`MAX_GZIP_RATIO` times the compressed size
    (beyond :data:`GZIP_ANY_RATIO_BYTES`): decompression stops there and the copy is removed.
    """
    ratio = archive_limit(MAX_GZIP_RATIO_ENV, MAX_GZIP_RATIO)
    compressed = os.path.getsize(path)
    fd, temp = process_temporary_file("shardwise-gunzip-", ".tar")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
            _inflate(src, out, max(GZIP_ANY_RATIO_BYTES, ratio * compressed), path, ratio)
    except (OSError, EOFError, zlib.error) as e:
        os.unlink(temp)
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno is not None:
            raise
        raise FormatError(f"{path}: corrupted or truncated gzip archive ({e})") from None
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def _inflate(src, out, limit: int, path: str, ratio: int) -> None:
    """Copy the decompressed stream ``src`` to ``out``; FormatError once more than ``limit`` bytes come."""
    done = 0
    while chunk := src.read(1 << 20):
        done += len(chunk)
        if done > limit:
            raise FormatError(
                f"{path}: inflates to more than {format_bytes(limit)}, over {ratio} times its compressed size; refusing it "
                f"as a decompression bomb (set {MAX_GZIP_RATIO_ENV} to allow a higher ratio)"
            )
        out.write(chunk)


def _index_temporary(temp: str, path: str, *, temporary: bool) -> TarIndex:
    """Index the decompressed copy ``temp`` of ``path``, removing it if that fails; ``temporary``:
    the index deletes it when closed (else its shared_decompression block does)."""
    try:
        return TarIndex(temp, path, compressed=True, temporary=temporary)
    except BaseException:
        os.unlink(temp)
        raise
