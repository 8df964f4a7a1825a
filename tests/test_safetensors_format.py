"""The safetensors reader validates headers precisely; the writer is byte-identical to the library."""

from __future__ import annotations

import io
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from shardwise.errors import FormatError
from shardwise.formats.safetensors import SafetensorsFile, write_safetensors
from shardwise.tensors import TensorInfo, tensor_bytes

from conftest import assert_same_tensors, sample_state_dict

# Pinned bytes for a small input: a regression in ordering, JSON or padding changes them.
GOLDEN_TENSORS = {
    "b": torch.tensor([1.0, -2.0], dtype=torch.float32),
    "a": torch.tensor([[1, 2]], dtype=torch.int8),
    "c": torch.tensor(3, dtype=torch.int64),
}
GOLDEN_BYTES = (
    b"\xc8\x00\x00\x00\x00\x00\x00\x00"
    b'{"__metadata__":{"format":"pt"},"c":{"dtype":"I64","shape":[],"data_offsets":[0,8]},'
    b'"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},'
    b'"a":{"dtype":"I8","shape":[1,2],"data_offsets":[16,18]}}'
    b"      "
    b"\x03\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x80?\x00\x00\x00\xc0"
    b"\x01\x02"
)


def write_with_shardwise(tensors: dict, metadata=None) -> bytes:
    infos = [TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]
    buf = io.BytesIO()
    write_safetensors(buf, infos, lambda info, f: f.write(tensor_bytes(tensors[info.name].contiguous())), metadata=metadata)
    return buf.getvalue()


def test_writer_output_matches_pinned_golden_bytes():
    assert write_with_shardwise(GOLDEN_TENSORS, {"format": "pt"}) == GOLDEN_BYTES


def test_golden_bytes_are_what_the_safetensors_library_writes():
    assert st_save(GOLDEN_TENSORS, metadata={"format": "pt"}) == GOLDEN_BYTES


def test_writer_matches_library_for_mixed_dtypes_unicode_names_and_empty_tensors():
    tensors = dict(sample_state_dict())
    tensors["ünïcode.名前"] = torch.arange(5, dtype=torch.int16)
    tensors["empty"] = torch.zeros(0, 3)
    assert write_with_shardwise(tensors, {"format": "pt"}) == st_save(tensors, metadata={"format": "pt"})


def test_metadata_keeps_insertion_order_so_output_is_deterministic(tmp_path):
    # the library's own metadata order varies from run to run (a hash map); ours is stable
    metadata = {"format": "pt", "z": "last", "a": "first"}
    data = write_with_shardwise(GOLDEN_TENSORS, metadata)
    assert data == write_with_shardwise(GOLDEN_TENSORS, dict(metadata))
    assert b'{"__metadata__":{"format":"pt","z":"last","a":"first"}' in data
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert SafetensorsFile(path).metadata == metadata


def test_reader_returns_library_written_tensors_exactly(st_file):
    with SafetensorsFile(st_file) as src:
        read = {name: src.read(name) for name in src.keys()}
        assert src.metadata == {"format": "pt"}
    assert_same_tensors(dict(sample_state_dict()), read)


def test_reader_lists_tensors_in_on_disk_order(st_file):
    with SafetensorsFile(st_file) as src:
        offsets = [src.stored(n).offset for n in src.keys()]
    assert offsets == sorted(offsets)


def test_read_rows_reads_a_dim0_slice(st_file):
    with SafetensorsFile(st_file) as src:
        rows = src.read_rows("embed.weight", 3, 7)
    assert torch.equal(rows, sample_state_dict()["embed.weight"][3:7])


def _file_with_header(tmp_path, header: bytes, data: bytes = b"", declared: int | None = None):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)
    return path


@pytest.mark.parametrize(
    "header, data, message",
    [
        (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}', b"", "not valid JSON"),
        (b'{"x": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, "dtype 'Q99'"),
        (b'{"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', b"\0" * 8, "non-negative"),
        (b'{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"\0" * 8, "span 8 bytes"),
        (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', b"\0" * 8, "begin <= end"),
        (b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8, "truncated"),
        (
            b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
            b' "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
            b"\0" * 12,
            "overlap",
        ),
        (b"[1, 2, 3]", b"", "not a JSON object"),
        (b'{"__metadata__": {"a": 1}}', b"", "__metadata__"),
    ],
)
def test_corrupted_headers_are_rejected_with_a_precise_message(tmp_path, header, data, message):
    path = _file_with_header(tmp_path, header, data)
    with pytest.raises(FormatError) as err:
        SafetensorsFile(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_header_length_beyond_the_file_is_reported_as_truncation(tmp_path):
    path = _file_with_header(tmp_path, b'{"x": {}}', declared=10_000)
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(path)


def test_truncated_data_section_is_detected_at_open(st_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st_file.read_bytes()[:-10])
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(cut)


def test_header_is_parsed_without_importing_torch(st_file):
    import subprocess
    import sys

    code = (
        "import sys; from shardwise.formats.safetensors import SafetensorsFile;"
        f"s = SafetensorsFile({str(st_file)!r}); print(len(s.keys()), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(sample_state_dict())), "False"]


def test_writing_a_dtype_safetensors_cannot_store_is_refused():
    with pytest.raises(FormatError, match="complex128"):
        write_with_shardwise({"z": torch.zeros(2, dtype=torch.complex128)})


def test_json_header_round_trips_through_the_reader(tmp_path):
    data = write_with_shardwise(GOLDEN_TENSORS)
    path = tmp_path / "g.safetensors"
    path.write_bytes(data)
    with SafetensorsFile(path) as src:
        assert {n: src.info(n).shape for n in src.keys()} == {"c": (), "b": (2,), "a": (1, 2)}
        assert src.metadata == {}


def test_a_tensor_named_like_the_metadata_key_is_refused():
    with pytest.raises(FormatError, match="__metadata__"):
        write_with_shardwise({"__metadata__": torch.ones(1)}, {"format": "pt"})


@pytest.mark.parametrize(
    "header, data, message",
    [
        (b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"\0\0", "appears twice"),
        (b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"\0\0", "unused bytes"),
        (b'{"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0\0\0", "after the last tensor"),
        (b'{"x": {"dtype": "U8", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]}}', b"", "non-negative"),
        (b"[" * 100_000 + b"]" * 100_000, b"", "nested too deeply"),
    ],
    ids=["duplicate key", "gap", "trailing bytes", "huge dimension", "deep nesting"],
)
def test_headers_the_reference_library_rejects_are_rejected(tmp_path, header, data, message):
    path = _file_with_header(tmp_path, header, data)
    with pytest.raises(FormatError, match=message):
        SafetensorsFile(path)


def test_empty_metadata_is_written_as_the_library_writes_it():
    assert write_with_shardwise(GOLDEN_TENSORS, {}) == st_save(GOLDEN_TENSORS, metadata={})
    assert write_with_shardwise(GOLDEN_TENSORS, None) == st_save(GOLDEN_TENSORS)
