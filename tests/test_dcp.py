"""PyTorch distributed checkpoints (DCP) as sources: written by torch under 2 and 4 gloo ranks, read in place."""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from shardwise.errors import FormatError
from shardwise.formats.dcp import chunk_tiles, read_state
from shardwise.layout.tiles import TiledTensor, assemble, check_cover, matrix_shape
from shardwise.tensors import TensorInfo

RANKS = Path(__file__).with_name("dcp_ranks.py")


def torch_ranks(command: str, path: Path, world: int) -> None:
    result = subprocess.run([sys.executable, str(RANKS), command, str(path), str(world)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


@pytest.fixture(scope="module", params=[2, 4])
def dcp_folder(request, tmp_path_factory) -> Path:
    """A DCP folder torch wrote at 2 or 4 ranks (row, uneven, column, inner-dimension and 2-D shards) and its reference."""
    folder = tmp_path_factory.mktemp(f"dcp{request.param}") / "ckpt"
    torch_ranks("save", folder, request.param)
    return folder


def _reference(folder: Path) -> dict:
    return load_file(str(folder / "reference.safetensors"))


@pytest.mark.parametrize("to, name", [("hf", "hf"), ("safetensors", "model.safetensors"), ("torch", "model.pt")])
def test_dcp_converts_bit_exactly_to_every_weights_format(dcp_folder, tmp_path, cli, to, name):
    out = tmp_path / name
    result = cli("convert", dcp_folder, out, "--to", to)
    assert result.code == 0, result.err
    weights = out / "model.safetensors" if to == "hf" else out
    loaded = load_file(str(weights)) if to != "torch" else torch.load(weights, weights_only=True)
    reference = _reference(dcp_folder)
    assert sorted(loaded) == sorted(reference)  # the "model" subtree, under its own names; the optimizer is not weights
    for key, tensor in reference.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    assert cli("diff", dcp_folder, dcp_folder / "reference.safetensors").code == 0


def test_dcp_casts_while_streaming_and_becomes_an_archive(dcp_folder, tmp_path, cli):
    assert cli("convert", dcp_folder, tmp_path / "bf16.safetensors", "--dtype", "bf16").code == 0
    cast = load_file(str(tmp_path / "bf16.safetensors"))
    for key, tensor in _reference(dcp_folder).items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert cast[key].dtype == expected.dtype and torch.equal(cast[key], expected), key
    result = cli("convert", dcp_folder, tmp_path / "model.nemo", "--to", "archive", "--weights-format", "safetensors")
    assert result.code == 0, result.err
    assert cli("diff", tmp_path / "model.nemo", dcp_folder / "reference.safetensors").code == 0


def test_inspect_names_the_format_and_the_training_state(dcp_folder, cli):
    result = cli("inspect", dcp_folder, "--json")
    assert result.code == 0, result.err
    import json

    summary = json.loads(result.out)
    assert summary["format"] == "dcp" and summary["num_tensors"] == len(_reference(dcp_folder))
    state = summary["training_state"]
    assert state["weights_key"] == "model" and state["objects"] == ["optim.step"]
    assert state["other_tensors"]["num_tensors"] == 1
    world = len(list(dcp_folder.glob("*.distcp")))
    assert summary["layout"]["kind"] == "dcp" and summary["layout"]["files"] == world
    assert summary["layout"]["sharded_weights"] == 5  # embed, qkv, o, conv, grid; the replicated ones are one chunk


def test_read_state_gives_the_dict_that_was_saved_every_tensor_whole(dcp_folder):
    state = read_state(dcp_folder)
    assert list(state) == ["model", "optim"] and sorted(state["model"]) == sorted(_reference(dcp_folder))
    for key, tensor in _reference(dcp_folder).items():  # rows, columns, inner dimensions, 2-D grids, merged from every rank
        assert state["model"][key].dtype == tensor.dtype and torch.equal(state["model"][key], tensor), key
    assert state["optim"]["step"] == 5 and torch.equal(state["optim"]["state"]["embed.weight"]["exp_avg"], torch.ones(37, 16))


def _saved_with_paths(folder: Path, state: dict, paths: dict) -> Path:
    """``state`` saved by torch, then its planner data given the key paths ``paths`` (by fqn)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=folder)
    _rewrite_metadata(folder, lambda m: m.planner_data.update(paths))
    return folder


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as meant
def test_read_state_builds_lists_from_integer_path_components_and_refuses_contradictions(tmp_path):
    ones, twos, threes = torch.ones(2), torch.full((2,), 2.0), torch.full((3,), 3.0)
    gap = _saved_with_paths(tmp_path / "gap", {"a": {"0": ones, "2": twos}, "b": threes}, {"a.0": ("a", 0), "a.2": ("a", 2)})
    built = read_state(gap)  # item 1 was an empty dict, which torch does not save: None in its place
    assert list(built) == ["a", "b"] and built["a"][1] is None and torch.equal(built["a"][2], twos) and torch.equal(built["b"], threes)
    sparse = _saved_with_paths(tmp_path / "sparse", {"a": {"0": ones, "9": twos}}, {"a.0": ("a", 0), "a.9": ("a", 9)})
    built = read_state(sparse)  # more gaps than entries: a list of empty optimizer states, say
    assert len(built["a"]) == 10 and built["a"][1:9] == [None] * 8 and torch.equal(built["a"][9], twos)

    cases = {
        "spelling": ({"a": {"x": ones}}, {"a.x": ("a", "y")}, "not a key path that spells it"),
        "kinds": ({"a": {"0": ones, "1": twos}}, {"a.1": ("a", 1)}, "needs a to be another kind of container"),
        "index": ({"a": {"1000000000": {"x": ones}}}, {"a.1000000000.x": ("a", 10**9, "x")}, "names list item 1000000000"),  # mid-path: 8 GB to allocate
    }
    for name, (state, paths, message) in cases.items():
        folder = _saved_with_paths(tmp_path / name, state, paths)
        with pytest.raises(FormatError, match=rf"^{folder / '.metadata'}: .*{message}"):
            read_state(folder)


def _copy(dcp_folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(dcp_folder, copy)
    return copy


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_metadata_pickle_is_refused_and_nothing_runs(dcp_folder, tmp_path, cli, monkeypatch):
    copy = _copy(dcp_folder, tmp_path)
    (copy / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Evil()}))
    monkeypatch.chdir(tmp_path)
    result = cli("convert", copy, tmp_path / "out.safetensors")
    assert result.code == 2 and "refused to load" in result.err and "system" in result.err and ".metadata" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()


def _rewrite_metadata(folder: Path, edit) -> None:
    """Change the metadata through torch's own classes (a test may import them; shardwise never does)."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    edit(metadata)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _first_storage(metadata):
    return next(iter(metadata.storage_data.values()))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is truncated"),
    ("missing", "is missing"),
    ("traversal", "not a plain file name"),
    ("garbage", "not a readable DCP metadata pickle"),
    ("gap", "do not tile it"),
    ("compressed", "transforms"),
    ("shared bytes", "two entries share bytes"),
])
def test_damaged_checkpoints_give_one_line_and_exit_2(dcp_folder, tmp_path, cli, damage, message):
    copy = _copy(dcp_folder, tmp_path)
    data_file = sorted(copy.glob("*.distcp"))[-1]
    if damage == "truncate":
        os.truncate(data_file, data_file.stat().st_size // 2)
    elif damage == "missing":
        data_file.unlink()
    elif damage == "traversal":
        _rewrite_metadata(copy, lambda m: setattr(_first_storage(m), "relative_path", "../../etc/passwd"))
    elif damage == "garbage":
        (copy / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    elif damage == "gap":
        _rewrite_metadata(copy, lambda m: m.state_dict_metadata["model.embed.weight"].chunks.pop())
    elif damage == "shared bytes":  # the embedding pointed at the optimizer's bytes of the same shape: no silent swap
        def share(m):
            keys = [k for k in m.storage_data if k.offset is not None]
            embed = [k for k in keys if k.fqn == "model.embed.weight"][0]
            moment = [k for k in keys if k.fqn.startswith("optim.") and tuple(k.offset) == tuple(embed.offset)][0]
            m.storage_data[embed] = m.storage_data[moment]
        _rewrite_metadata(copy, share)
    elif damage == "compressed":
        _rewrite_metadata(copy, lambda m: setattr(_first_storage(m), "transform_descriptors", ["stream.zstd"]))
    out = tmp_path / "out.safetensors"
    result = cli("convert", copy, out)
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and str(copy) in result.err
    assert not out.exists()


def _grid_chunks(shape, cuts):
    """Chunks (offsets, sizes) cutting each dimension at the given points."""
    bounds = [sorted({0, size, *[c for c in dim_cuts if 0 < c < size]}) for size, dim_cuts in zip(shape, cuts)]
    for box in itertools.product(*[list(zip(b, b[1:])) for b in bounds]):
        yield tuple(lo for lo, _ in box), tuple(hi - lo for lo, hi in box)


@pytest.mark.parametrize("seed", range(25))
def test_chunk_tiles_place_every_chunk_where_it_belongs(seed):
    g = torch.Generator().manual_seed(seed)
    rank = int(torch.randint(1, 5, (1,), generator=g))
    shape = tuple(int(s) for s in torch.randint(1, 6, (rank,), generator=g))
    cuts = [[int(torch.randint(1, 6, (1,), generator=g))] if torch.rand(1, generator=g) < 0.6 else [] for _ in shape]
    full = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    chunks = {}
    tiles = []
    for offsets, sizes in _grid_chunks(shape, cuts):
        piece = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone()
        chunks[offsets] = piece
        tiles += chunk_tiles(shape, offsets, sizes, offsets)
    check_cover("test", *matrix_shape(shape), tiles)
    rebuilt = assemble(TiledTensor(TensorInfo("t", shape, "int64"), tuple(tiles)), lambda ref: chunks[ref])
    assert torch.equal(rebuilt, full), (shape, cuts)


def test_to_dcp_writes_a_folder_torch_loads_at_other_world_sizes(dcp_folder, tmp_path, cli):
    out = tmp_path / "ours"
    result = cli("convert", dcp_folder / "reference.safetensors", out, "--to", "dcp")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp"]
    shutil.copy(dcp_folder / "reference.safetensors", out)  # what the loading ranks compare against
    torch_ranks("load", out, 2)  # torch.distributed.checkpoint.load into DTensors sharded over 2 ranks
    assert cli("diff", out, dcp_folder / "reference.safetensors").code == 0  # and shardwise reads its own output


def test_a_sharded_llama_becomes_one_dcp_folder_without_passing_through_hf(tmp_path, cli):
    tiny_llama(tmp_path / "hf", layers=3, dtype=torch.bfloat16)
    assert cli("convert", tmp_path / "hf", tmp_path / "nx", "--to", "nxdt", "--tp", "2", "--pp", "2").code == 0
    result = cli("convert", tmp_path / "nx", tmp_path / "dcp", "--to", "dcp")
    assert result.code == 0, result.err
    assert cli("diff", tmp_path / "dcp", tmp_path / "hf").code == 0
    refused = cli("convert", tmp_path / "hf", tmp_path / "dcp2", "--to", "dcp", "--tp", "2")
    assert refused.code == 2 and "layout options do not apply" in refused.err and not (tmp_path / "dcp2").exists()
