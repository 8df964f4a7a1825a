"""The stored-zip writer behind torch files: valid for zipfile and torch, aligned, zip64 when needed."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import pytest
import torch

from shardwise.errors import FormatError
from shardwise.formats.torch_pickle import write_torch
from shardwise.formats import zipwriter
from shardwise.formats.zipwriter import StoredZipWriter
from shardwise.tensors import TensorInfo, tensor_bytes

from conftest import assert_same_tensors, sample_state_dict


def _write(path, sd, **kwargs):
    infos = [TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
    with open(path, "wb") as f:
        write_torch(f, path.stem, infos, lambda info, sink: sink.write(tensor_bytes(sd[info.name].contiguous())), **kwargs)


def _data_offsets(path):
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            raw.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
            yield info, info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("force_zip64", [False, True], ids=["zip", "zip64"])
def test_archives_are_valid_zips_and_load_in_torch(tmp_path, force_zip64):
    sd = dict(sample_state_dict())
    path = tmp_path / "model.pt"
    _write(path, sd, force_zip64=force_zip64)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    for info, start in _data_offsets(path):
        if "/data/" in info.filename:
            assert start % 64 == 0, info.filename
    for mmap in (False, True):
        assert_same_tensors(sd, torch.load(path, weights_only=True, mmap=mmap))


def test_utf8_member_names_are_flagged_and_read_back(tmp_path):
    buf = io.BytesIO()
    writer = StoredZipWriter(buf)
    writer.write_bytes("modèle/data.pkl", b"x")
    writer.close()
    with zipfile.ZipFile(buf) as archive:
        assert archive.namelist() == ["modèle/data.pkl"] and archive.read("modèle/data.pkl") == b"x"


def test_a_producer_that_writes_the_wrong_size_is_an_error():
    writer = StoredZipWriter(io.BytesIO())
    with pytest.raises(FormatError, match="received 3 bytes, 4 were declared"):
        writer.write_member("a", 4, lambda sink: sink.write(b"abc"))


def test_the_same_member_twice_is_an_error():
    writer = StoredZipWriter(io.BytesIO())
    writer.write_bytes("a", b"")
    with pytest.raises(FormatError, match="written twice"):
        writer.write_bytes("a", b"")


def test_output_does_not_depend_on_which_crc32_implementation_runs():
    def archive(checksum):
        buf = io.BytesIO()
        writer = StoredZipWriter(buf, checksum=checksum)
        writer.write_bytes("a/data/0", bytes(range(256)) * 1000)
        writer.close()
        return buf.getvalue()

    assert archive(zlib.crc32) == archive(zipwriter.crc32)


def test_central_directory_says_unix_host_to_match_unix_attributes():
    buf = io.BytesIO()
    writer = StoredZipWriter(buf)
    writer.write_bytes("a", b"x")
    writer.close()
    with zipfile.ZipFile(buf) as archive:
        info = archive.getinfo("a")
        assert info.create_system == 3 and info.external_attr >> 16 == 0o600


def test_members_are_written_front_to_back_and_crcs_patched_only_at_close(tmp_path):
    """No seek between members (each would stall a background writer at every tensor); the CRCs
    patched by close() are the ones zipfile checks."""
    seeks = []

    class Counting(io.FileIO):
        def seek(self, *args):
            seeks.append(args)
            return super().seek(*args)

    path = tmp_path / "x.zip"
    with Counting(path, "w+") as f:
        z = StoredZipWriter(f)
        for i in range(5):
            z.write_member(f"a/data/{i}", 1000 + i, lambda sink, i=i: sink.write(bytes([i]) * (1000 + i)))
        assert seeks == []
        z.close()
    assert len(seeks) == 6  # five CRC fields, then back to the end
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert [archive.read(f"a/data/{i}") for i in range(5)] == [bytes([i]) * (1000 + i) for i in range(5)]
