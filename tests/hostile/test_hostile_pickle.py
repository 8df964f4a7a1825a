"""Hostile pickles: hashing bombs, memo and zip bombs, and views that expand a tiny file into terabytes.

Every payload is a few hundred bytes written opcode by opcode here. Entry points run in a child
process with a timeout (and, for memory, an address-space limit), so a regression fails fast
instead of hanging or swapping the suite.
"""

from __future__ import annotations

import os
import pickle
import resource
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

CHILD_TIMEOUT = 20  # seconds; the fixed code answers each of these in well under a second
LEVELS = 80  # t = (t, t) eighty times: hashing it walks 2**80 nodes


def dag(levels: int, share: str) -> bytes:
    """Opcodes pushing ``t = (t, t)`` nested ``levels`` times, sharing by DUP or by memo PUT/GET."""
    step = {"dup": pickle.DUP, "memo": pickle.BINPUT + b"\x00" + pickle.BINGET + b"\x00"}[share]
    return pickle.NONE + (step + pickle.TUPLE2) * levels


def hashing_bomb(container: str, share: str, levels: int = LEVELS) -> bytes:
    """A pickle whose dict key, set item or frozenset item is the self-sharing tuple DAG (167 bytes
    for a dict key shared by DUP, as in the report)."""
    body = {
        "dict key": pickle.EMPTY_DICT + dag(levels, share) + pickle.NONE + pickle.SETITEM,
        "set item": pickle.EMPTY_SET + pickle.MARK + dag(levels, share) + pickle.ADDITEMS,
        "frozenset item": pickle.MARK + dag(levels, share) + pickle.FROZENSET,
    }[container]
    return pickle.PROTO + b"\x04" + body + pickle.STOP


def torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch zip checkpoint: ``archive/data.pkl`` plus ``archive/data/<key>`` storage records."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr(zipfile.ZipInfo("archive/byteorder"), b"little")
        for key, data in (records or {}).items():
            z.writestr(zipfile.ZipInfo(f"archive/data/{key}"), data)
    return path


class Child:
    """What a child process did: exit code, stdout, stderr."""

    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.code, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def __repr__(self) -> str:
        return f"Child(code={self.code}, out={self.out[:300]!r}, err={self.err[-600:]!r})"


def run_child(argv: list, memory: int | None = None) -> Child:
    """Run ``python ARGV`` (this worktree's shardwise), time-boxed and, with ``memory``, address-space limited."""

    def limit() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    proc = subprocess.run(
        [sys.executable, *map(os.fspath, argv)], capture_output=True, text=True, timeout=CHILD_TIMEOUT, preexec_fn=limit,
    )
    return Child(proc)


def shardwise(*args) -> Child:
    """The command line, as a user runs it, in a child process."""
    return run_child(["-m", "shardwise", *args])


def assert_refused(result: Child, *words: str) -> None:
    """Exit code 2 and one line on stderr, no traceback, containing each of ``words``."""
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result
    for word in words:
        assert word in lines[0], result


# -- hashing bombs -------------------------------------------------------------------------------
READ_EACH = """
import sys
from shardwise.errors import FormatError
from shardwise.formats.torch_pickle import read_torch_pickle
for path in sys.argv[1:]:
    try:
        print("loaded", read_torch_pickle(path).root)
    except FormatError as e:
        print("refused", str(e).replace(chr(10), " "))
"""


def read_in_child(*paths: Path, memory: int | None = None) -> list[str]:
    """``read_torch_pickle`` of each path in one time-boxed child: "loaded ROOT" or "refused MESSAGE" lines."""
    result = run_child(["-c", READ_EACH, *paths], memory)
    assert result.code == 0, result
    return result.out.splitlines()


def legacy_torch_file(path: Path, root_pickle: bytes) -> Path:
    """Torch's pre-1.6 format: magic number, protocol version and sys_info pickles, then the root pickle."""
    header = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})]
    path.write_bytes(b"".join(header) + root_pickle)
    return path


def test_every_shape_of_hashing_bomb_is_refused_before_it_is_hashed(tmp_path):
    variants = [(c, s) for c in ("dict key", "set item", "frozenset item") for s in ("dup", "memo")]
    paths = [torch_zip(tmp_path / f"{c.replace(' ', '_')}-{s}.pt", hashing_bomb(c, s)) for c, s in variants]
    paths.append(legacy_torch_file(tmp_path / "legacy.pt", hashing_bomb("frozenset item", "memo")))
    lines = read_in_child(*paths)
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        assert line.startswith(f"refused {path}: ") and "hashing bomb" in line, line


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_hashing_bomb_in_a_torch_file_ends_in_one_line_not_a_hang(tmp_path, command):
    bomb = torch_zip(tmp_path / "bomb.ckpt", hashing_bomb("dict key", "memo"))
    args = {"inspect": [bomb], "convert": [bomb, tmp_path / "out.safetensors"]}[command]
    assert_refused(shardwise(command, *args), str(bomb), "hashing bomb")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_hashing_bomb_in_dcp_metadata_ends_in_one_line_not_a_hang(tmp_path):
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(hashing_bomb("set item", "dup"))
    assert_refused(shardwise("inspect", folder), ".metadata", "hashing bomb")


def test_a_self_sharing_list_as_a_tensor_shape_is_described_not_printed(tmp_path):
    # l = [l, l] eighty times over: the error message once printed its repr, 2**80 lists long
    level = pickle.EMPTY_LIST + (pickle.BINGET + b"\x00" + pickle.APPEND) * 2 + pickle.BINPUT + b"\x00" + pickle.POP
    shared = pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.POP + level * LEVELS + (pickle.BINGET + b"\x00") * 2
    storage = pickle.MARK + pickle.SHORT_BINUNICODE + b"\x07storage" + pickle.GLOBAL + b"torch\nFloatStorage\n"
    storage += pickle.SHORT_BINUNICODE + b"\x010" + pickle.SHORT_BINUNICODE + b"\x03cpu" + pickle.BININT1 + b"\x01" + pickle.TUPLE + pickle.BINPERSID
    data = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.MARK + storage
    data += pickle.BININT1 + b"\x00" + shared + pickle.TUPLE + pickle.REDUCE + pickle.STOP
    (line,) = read_in_child(torch_zip(tmp_path / "shape.pt", data, {"0": bytes(4)}))
    assert line.startswith("refused") and "invalid tensor view" in line and len(line) < 400, line


def test_int_keys_chosen_to_collide_are_refused_before_the_dict_floods(tmp_path):
    # ints 1 + k * modulus all hash to 1: 100,000 of them make a dict take 5e9 steps (minutes)
    modulus = sys.hash_info.modulus
    items = b"".join(pickle.LONG1 + b"\x0a" + (1 + k * modulus).to_bytes(10, "little") + pickle.NONE + pickle.SETITEM for k in range(100_000))
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + items + pickle.STOP
    (line,) = read_in_child(torch_zip(tmp_path / "flood.pt", data))
    assert line.startswith("refused") and "hash-flooding" in line, line


def test_keys_and_tuples_of_real_checkpoints_still_load(tmp_path):
    state = {("layer", 0): 1, frozenset({"a", "b"}): (1, 2.5), "betas": (0.9, 0.999), "shared": [(1, 2)] * 1000, 2**60: -1, -1: -2}
    path = torch_zip(tmp_path / "ok.pt", pickle.dumps(state, protocol=2))
    from shardwise.formats.torch_pickle import read_torch_pickle

    assert read_torch_pickle(path).root == state


# -- memory bombs --------------------------------------------------------------------------------
MEMORY_LIMIT = 1 << 30  # the fixed reader needs tens of MB; the bombs below need several GB


def test_a_huge_memo_index_costs_one_entry_not_gigabytes(tmp_path):
    # {"w": 1} with the dict memoized at index 2**28: a memo sized by its largest index needs 4 GB
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.LONG_BINPUT + (1 << 28).to_bytes(4, "little")
    data += pickle.SHORT_BINUNICODE + b"\x01w" + pickle.BININT1 + b"\x01" + pickle.SETITEM + pickle.STOP
    assert read_in_child(torch_zip(tmp_path / "memo.pt", data), memory=MEMORY_LIMIT) == ["loaded {'w': 1}"]


def test_a_large_list_copied_again_and_again_through_the_memo_is_refused(tmp_path):
    # list(big) 20,000 times over, 7 bytes a copy: 16 GB of copies from a 240 KB pickle
    big = pickle.EMPTY_LIST + pickle.BINPUT + b"\x01" + pickle.MARK + pickle.NONE * 100_000 + pickle.APPENDS + pickle.POP
    copy = pickle.BINGET + b"\x00" + pickle.BINGET + b"\x01" + pickle.TUPLE1 + pickle.REDUCE + pickle.APPEND
    data = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"builtins\nlist\n" + pickle.BINPUT + b"\x00" + pickle.POP
    data += big + pickle.EMPTY_LIST + copy * 20_000 + pickle.STOP
    (line,) = read_in_child(torch_zip(tmp_path / "copies.pt", data), memory=MEMORY_LIMIT)
    assert line.startswith("refused") and "copying bomb" in line, line


def deflated_zip(path: Path, name: str, head: bytes, mebibytes_of_zeros: int, declared: int | None = None) -> Path:
    """A zip whose one deflated member inflates to ``head`` and then zeros, built in milliseconds
    (one fully flushed block of zeros, repeated); its directory says it holds ``declared`` bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)  # a full flush: the next block refers to nothing before it
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH) + block * mebibytes_of_zeros + c.flush()
    crc, size = zlib.crc32(head), len(head) + (mebibytes_of_zeros << 20)
    if declared is None:
        for _ in range(mebibytes_of_zeros):
            crc = zlib.crc32(zeros, crc)
    else:  # a liar: the CRC-32 of the declared bytes cannot match either
        size = declared
    encoded = name.encode()
    fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0, crc, len(stream), size)
    local = b"PK\x03\x04" + fields + struct.pack("<HH", len(encoded), 0) + encoded
    central = b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0, 0) + encoded
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), len(local) + len(stream), 0)
    path.write_bytes(local + stream + central + end)
    return path


def test_a_deflated_pickle_that_inflates_past_the_cap_is_refused_before_inflating(tmp_path):
    from shardwise.formats.torch_pickle import MAX_PICKLE_BYTES

    bomb = deflated_zip(tmp_path / "zipbomb.pt", "archive/data.pkl", pickle.dumps({}, protocol=2), (MAX_PICKLE_BYTES >> 20) + 1)
    assert bomb.stat().st_size < MAX_PICKLE_BYTES // 500
    (line,) = read_in_child(bomb, memory=MEMORY_LIMIT)
    assert line.startswith("refused") and "zip bomb" in line and "data.pkl" in line, line


def test_a_deflated_pickle_lying_about_its_size_is_never_inflated_whole(tmp_path):
    # the directory says 12 bytes; the stream inflates to 1.5 GB: only the declared bytes are inflated
    liar = deflated_zip(tmp_path / "liar.pt", "archive/data.pkl", pickle.dumps({}, protocol=2), 1536, declared=12)
    (line,) = read_in_child(liar, memory=MEMORY_LIMIT)
    assert line.startswith("refused") and "corrupted archive member" in line, line


# -- views that expand their storage ---------------------------------------------------------------
def expanded_views(count: int, shape: tuple[int, ...]) -> bytes:
    """data.pkl of ``count`` float32 tensors of ``shape``, every stride 0: views of one 1-element storage "0"."""
    from shardwise.formats.torch_pickle import TensorStub, stub_pickle
    from shardwise.tensors import TensorInfo

    views = {}
    for i in range(count):
        stub = TensorStub("0", TensorInfo(f"v{i}", (1,), "float32"))
        rebuild, (storage, _, _, _, *rest) = stub.reduced
        stub.reduced = (rebuild, (storage, 0, shape, (0,) * len(shape), *rest))
        views[f"v{i}"] = stub
    return stub_pickle(views)


def test_a_small_file_of_stride_0_views_is_refused_as_a_conversion_target(tmp_path):
    path = torch_zip(tmp_path / "views.pt", expanded_views(1000, (1 << 15, 1 << 13)), {"0": b"\0\0\x80\x3f"})
    assert path.stat().st_size < 200_000  # 1000 views of 1 GiB each: a terabyte declared
    result = shardwise("convert", path, tmp_path / "out.safetensors")
    assert_refused(result, str(path), "expanded views")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_modest_expanded_view_still_loads(tmp_path):
    from shardwise.formats.torch_pickle import TorchFile

    path = torch_zip(tmp_path / "view.pt", expanded_views(2, (4, 8)), {"0": b"\0\0\x80\x3f"})
    source = TorchFile(path)
    assert [source.info(name).shape for name in source.keys()] == [(4, 8), (4, 8)]
    assert source.stored("v0").strides == (0, 0)


def test_a_file_naming_one_storage_hundreds_of_times_is_refused_while_tied_weights_load(tmp_path, monkeypatch):
    import torch

    from shardwise.errors import FormatError
    from shardwise.formats import torch_pickle

    monkeypatch.setattr(torch_pickle, "MAX_VIEW_EXPANSION", 1 << 20)  # keeps the bomb a few MiB
    base = torch.zeros(1 << 16)  # 256 KiB of storage
    tied = tmp_path / "tied.pt"
    torch.save({"embed.weight": base, "lm_head.weight": base}, tied)
    source = torch_pickle.TorchFile(tied)
    assert [source.stored(name).path for name in source.keys()] == [str(tied)] * 2

    bomb = tmp_path / "shared.pt"
    torch.save({f"t{i}": base for i in range(64)}, bomb)  # 16 MiB declared by a 260 KiB file
    with pytest.raises(FormatError, match="share storage too often"):
        source = torch_pickle.TorchFile(bomb)
        for name in source.keys():
            source.stored(name)


DESCRIBE_IN_DCP = """
from shardwise.formats import dcp
shared = []
for _ in range(80):
    shared = [shared, shared]
for check in (lambda: dcp._counts(shared, "chunk sizes"), lambda: dcp._counts([shared], "chunk sizes")):
    try:
        check()
    except Exception as e:
        print(len(str(e)))
"""


def test_dcp_metadata_values_in_error_messages_are_described_not_printed():
    # a self-sharing list in chunk sizes once went into the message through repr: 2**80 lists long
    lengths = run_child(["-c", DESCRIBE_IN_DCP])
    assert lengths.code == 0 and [int(n) < 400 for n in lengths.out.split()] == [True, True], lengths
