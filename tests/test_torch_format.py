"""Torch pickle files: read lazily and exactly (zip and legacy), written so torch loads them safely."""

from __future__ import annotations

import io
import struct
import zipfile
from collections import OrderedDict

import pytest
import torch

from shardwise.errors import FormatError
from shardwise.formats.torch_pickle import TorchFile, write_torch
from shardwise.tensors import TensorInfo, tensor_bytes

from conftest import assert_same_tensors, sample_state_dict


def every_dtype_state_dict() -> OrderedDict:
    g = torch.Generator().manual_seed(1)
    sd = OrderedDict()
    for dtype in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
        torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128, torch.uint16,
        torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
    ):
        sd[str(dtype)] = torch.randint(0, 100, (3, 5), generator=g).to(dtype)
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 7)
    return sd


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_reads_back_exactly(tmp_path, legacy):
    sd = every_dtype_state_dict()
    path = tmp_path / "all.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    with TorchFile(path) as src:
        assert src.keys() == list(sd)
        assert_same_tensors(sd, {n: src.read(n) for n in src.keys()})


def test_views_with_offsets_and_strides_read_as_the_view(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"row": base[2], "transposed": base.t(), "corner": base[1:, 2:5], "whole": base}
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    with TorchFile(path) as src:
        assert src.stored("row").contiguous and src.stored("row").offset == src.stored("whole").offset + 2 * 6 * 4
        assert not src.stored("transposed").contiguous
        for name, tensor in sd.items():
            assert torch.equal(src.read(name), tensor)


def test_tied_weights_of_a_real_module_read_as_two_names(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    path = tmp_path / "tied.pt"
    torch.save(model.state_dict(), path)
    with TorchFile(path) as src:
        assert src.keys() == ["0.weight", "1.weight"]
        assert torch.equal(src.read("0.weight"), src.read("1.weight"))


def test_parameters_and_nested_dicts_are_flattened_with_dots(tmp_path):
    sd = {"encoder": {"layer": [torch.nn.Parameter(torch.ones(2)), torch.zeros(3)]}, "head.weight": torch.eye(2)}
    path = tmp_path / "nested.pt"
    torch.save(sd, path)
    with TorchFile(path) as src:
        assert src.keys() == ["encoder.layer.0", "encoder.layer.1", "head.weight"]
        assert torch.equal(src.read("encoder.layer.0"), torch.ones(2))


def test_plain_training_checkpoint_takes_weights_from_model_key(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 7}, path)
    with TorchFile(path) as src:
        assert src.weights_key == "model"
        assert src.keys() == ["weight", "bias"]
        assert src.training_state["iter_num"] == 7
        assert src.training_state["optimizer"]["num_tensors"] == 6  # step, exp_avg, exp_avg_sq for each of 2 params
        assert src.training_state["optimizer"]["param_groups"][0]["lr"] == 0.001


def _write_with_shardwise(path, sd: dict) -> None:
    infos = [TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]
    with open(path, "wb") as f:
        write_torch(f, path.stem, infos, lambda info, sink: sink.write(tensor_bytes(sd[info.name].contiguous())))


@pytest.mark.parametrize("mmap", [False, True])
def test_written_files_load_with_torch_weights_only(tmp_path, mmap):
    sd = every_dtype_state_dict()
    path = tmp_path / "ours.pt"
    _write_with_shardwise(path, sd)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert isinstance(loaded, OrderedDict)
    assert_same_tensors(sd, loaded)


def test_written_zip_is_valid_and_storages_are_64_byte_aligned(tmp_path):
    path = tmp_path / "ours.pt"
    _write_with_shardwise(path, dict(sample_state_dict()))
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        assert archive.testzip() is None  # every CRC-32 matches
        names = archive.namelist()
        assert names[:4] == ["ours/data.pkl", "ours/.format_version", "ours/.storage_alignment", "ours/byteorder"]
        assert names[-1] == "ours/version"
        for info in archive.infolist():
            raw.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
            data_start = info.header_offset + 30 + name_len + extra_len
            if "/data/" in info.filename:
                assert data_start % 64 == 0, info.filename


def test_written_file_reads_back_through_shardwise(tmp_path):
    sd = every_dtype_state_dict()
    path = tmp_path / "ours.pt"
    _write_with_shardwise(path, sd)
    with TorchFile(path) as src:
        assert_same_tensors(sd, {n: src.read(n) for n in src.keys()})


def test_truncated_zip_is_a_format_error(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(dict(sample_state_dict()), path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated or corrupted"):
        TorchFile(cut)


def test_truncated_legacy_file_is_a_format_error(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.randn(100, 100)}, path, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="truncated"):
        TorchFile(cut)


def test_a_plain_pickle_that_is_not_a_checkpoint_is_a_format_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"\x80\x02" + b"garbage" * 5)
    with pytest.raises(FormatError):
        TorchFile(path)


def test_big_endian_zip_checkpoints_are_refused(tmp_path):
    path = tmp_path / "be.pt"
    torch.save({"w": torch.ones(2)}, path)
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            data = b"big" if info.filename.endswith("byteorder") else src.read(info)
            dst.writestr(info.filename, data)
    path.write_bytes(buf.getvalue())
    with pytest.raises(FormatError, match="big-endian"):
        TorchFile(path)
