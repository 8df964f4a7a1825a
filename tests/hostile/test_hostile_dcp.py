"""Hostile DCP metadata: geometry that a few bytes declare must cost time linear in those bytes.

The metadata is built with torch's own DCP classes and pickled as torch writes it; the data file
is a sparse file of the size the storage entries claim (nothing in it is read by ``inspect``).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata

from conftest import run_subprocess
from safetensors import safe_open

HANG = 20  # seconds: every case here finishes in about one; the unfixed code takes minutes (or years)


def dcp_metadata(folder: Path, shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]], fqn: str = "model.w") -> Path:
    """A DCP folder whose uint8 tensor ``fqn`` of ``shape`` is saved in ``chunks`` (offsets,
    sizes), each given a storage entry exactly as long as its elements (at least one byte)."""
    folder.mkdir()
    metas, storage, at = [], {}, 0
    for offsets, sizes in chunks:
        length = max(math.prod(sizes), 1)
        metas.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        storage[MetadataIndex(fqn, torch.Size(offsets))] = _StorageInfo("__0_0.distcp", at, length)
        at += length
    entry = TensorStorageMetadata(TensorProperties(dtype=torch.uint8), torch.Size(shape), metas)
    metadata = Metadata({fqn: entry}, planner_data={fqn: tuple(fqn.split("."))}, storage_data=storage)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with open(folder / "__0_0.distcp", "wb") as f:
        f.truncate(at)
    return folder


def _one_line_exit_2(result, folder: Path, message: str) -> None:
    assert result.code == 2, result
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, result.err
    assert str(folder / ".metadata") in result.err and message in result.err, result.err


def test_a_zero_sized_tensor_cut_in_its_last_dimension_converts_without_enumerating_its_tiles(tmp_path):
    side = 1 << 20  # the chunks' inner extents: 2**40 tiles if enumerated
    folder = dcp_metadata(tmp_path / "ckpt", (0, side, side, 2), [((0, 0, 0, 0), (0, side, side, 1)), ((0, 0, 0, 1), (0, side, side, 1))])
    out = tmp_path / "out.safetensors"
    result = run_subprocess("convert", folder, out, timeout=HANG)
    assert result.code == 0, result
    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["w"] and f.get_slice("w").get_shape() == [0, side, side, 2]


def test_a_chunk_declaring_more_elements_than_its_bytes_is_refused_before_its_tiles_are_made(tmp_path):
    side = 1 << 20
    folder = dcp_metadata(tmp_path / "ckpt", (1, side, side, 2), [((0, 0, 0, 0), (1, 1, 1, 1))])
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # now claim the whole first half of the last dimension
    metadata.state_dict_metadata["model.w"].chunks[0] = ChunkStorageMetadata(torch.Size((0, 0, 0, 0)), torch.Size((1, side, side, 1)))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    result = run_subprocess("convert", folder, tmp_path / "out.safetensors", timeout=HANG)
    _one_line_exit_2(result, folder, f"holds {side * side} bytes, but its storage entry __0_0.distcp[0:1] has only 1")
    assert not (tmp_path / "out.safetensors").exists()


def test_thousands_of_chunks_sharing_rows_are_checked_in_linear_time(tmp_path):
    columns = 8000  # every chunk shares the one row with every other: 32 million pairs to compare
    folder = dcp_metadata(tmp_path / "ckpt", (1, columns), [((0, i), (1, 1)) for i in range(columns)])
    result = run_subprocess("inspect", folder, "--json", timeout=HANG)
    assert result.code == 0 and '"chunks": 8000' in result.out, result


def test_thousands_of_overlapping_chunks_sharing_rows_are_refused_in_linear_time(tmp_path):
    columns = 8000  # column 2 saved twice and column 0 not at all, by the last two chunks: as many elements as the tensor has
    chunks = [((0, i), (1, 1)) for i in range(3, columns)] + [((0, 1), (1, 2)), ((0, 2), (1, 1))]
    folder = dcp_metadata(tmp_path / "ckpt", (1, columns), chunks)
    _one_line_exit_2(run_subprocess("inspect", folder, timeout=HANG), folder, "chunks overlap")


def test_a_torch_dist_stack_of_2_to_the_40_empty_layers_is_refused_before_any_layer_is_made(tmp_path):
    layers = 1 << 40  # a Megatron stacked key: one tensor per layer, none of them holding a byte
    fqn = "decoder.layers.mlp.linear_fc1.weight"
    folder = dcp_metadata(tmp_path / "ckpt", (layers, 0), [((0, 0), (layers, 0))], fqn=fqn)
    backend = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
    (folder / "metadata.json").write_text(json.dumps(backend))
    _one_line_exit_2(run_subprocess("inspect", folder, timeout=HANG), folder, f"stacked key '{fqn}' holds {layers} layers")
