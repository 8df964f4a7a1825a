"""Training checkpoint payloads: safetensors (no pickle for tensors, mapped loads) and xser (NxD's
per-tensor files), each readable by other tools, and shared files written tensor by tensor by
several DP ranks folding into one checksum."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

import shardwise
from shardwise.errors import IntegrityError, OptionError
from shardwise.training.assign import spread
from shardwise.training.encodings import fold_entries, owned_tensors, write_part


def _adam_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def test_safetensors_files_are_plain_safetensors_and_hold_the_whole_optimizer_state(tmp_path):
    from safetensors.torch import load_file

    model, optimizer = _adam_state()
    shardwise.save_checkpoint(tmp_path, "t", model=model, optimizer=optimizer, scheduler={"last_epoch": 3}, encoding="safetensors")
    tag = tmp_path / "t"
    files = sorted(p.relative_to(tag).as_posix() for p in tag.rglob("*") if p.is_file())
    assert files == ["checkpoint", "done", "model/dp_rank_00_tp_rank_00_pp_rank_00.safetensors",
                     "optim/dp_rank_00_tp_rank_00_pp_rank_00.safetensors", "scheduler.pt", "shardwise.json"]
    plain = load_file(tag / "model/dp_rank_00_tp_rank_00_pp_rank_00.safetensors")  # the reference library, no shardwise
    assert _same(dict(sorted(plain.items())), dict(sorted(model.state_dict().items())))
    state = {}
    _, fresh = _adam_state()
    shardwise.load_checkpoint(tmp_path, optimizer=state)
    assert _same(state, optimizer.state_dict())  # int keys, tuples (betas), floats, bools, None all come back
    manifest = json.loads((tag / "shardwise.json").read_text())
    assert manifest["encoding"] == "safetensors"
    for entry in manifest["files"]:
        assert f"{zlib.crc32((tag / entry['name']).read_bytes()):08x}" == entry["crc32"]


def test_safetensors_refuses_what_it_cannot_store(tmp_path):
    from fractions import Fraction

    with pytest.raises(OptionError, match=r"the state\['lr'\] is a Fraction; save with encoding='pt'"):
        shardwise.save_checkpoint(tmp_path, "t", optimizer={"lr": Fraction(1, 3)}, encoding="safetensors")
    assert not list(tmp_path.iterdir())  # the staging folder is gone
    with pytest.raises(OptionError, match="encoding 'npz' is not supported"):
        shardwise.save_checkpoint(tmp_path, "t", model={"w": torch.ones(1)}, encoding="npz")


def test_xser_files_are_nxd_layout_and_read_by_the_xser_reader(tmp_path):
    model, optimizer = _adam_state()
    shardwise.save_checkpoint(tmp_path, "t", model=model, optimizer=optimizer, encoding="xser")
    folder = tmp_path / "t/model"
    ref = folder / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    tensors = sorted(p.name for p in (folder / f"{ref.name}.tensors").iterdir())
    assert tensors == [f"tensor_{i}.pt" for i in range(4)] and (folder / f"{ref.name}.info.pt").is_file()
    for i, (name, value) in enumerate(model.state_dict().items()):  # tids in traversal order, as NxD numbers them
        assert torch.equal(torch.load(folder / f"{ref.name}.tensors/tensor_{i}.pt", weights_only=True), value)
    with shardwise.open(ref) as opened:  # shardwise's own xser reader (restricted unpickler) resolves the references
        assert sorted(opened.tensors.keys()) == sorted(model.state_dict())
    state = {}
    shardwise.load_checkpoint(tmp_path, model=state, optimizer=(optim := {}))
    assert _same(state, dict(model.state_dict())) and _same(optim, optimizer.state_dict())


def test_a_corrupted_xser_tensor_file_is_named(tmp_path):
    model, _ = _adam_state()
    shardwise.save_checkpoint(tmp_path, "t", model=model, encoding="xser")
    victim = tmp_path / "t/model/dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors/tensor_2.pt"
    data = bytearray(victim.read_bytes())
    data[-30] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="tensor_2.pt: CRC-32"):
        shardwise.load_checkpoint(tmp_path, model={})


@pytest.mark.parametrize("encoding", ["safetensors", "xser"])
def test_parts_written_by_several_ranks_fold_into_the_file_one_rank_would_write(tmp_path, encoding):
    model, optimizer = _adam_state()
    state = optimizer.state_dict()
    alone = fold_entries(write_part(encoding, state, tmp_path / "one", "optim/x.pt"))
    entries = []
    for part in range(3):  # each "rank" sees the tensors other parts write only as meta tensors
        keep = owned_tensors(state, part, 3)
        masked = _mask(state, keep)
        entries += write_part(encoding, masked, tmp_path / "three", "optim/x.pt", part, 3)
    assert fold_entries(entries) == alone
    for entry in alone:
        assert (tmp_path / "one" / entry["name"]).read_bytes() == (tmp_path / "three" / entry["name"]).read_bytes()

    data = bytes(range(10))
    folded = fold_entries([{"name": "f", "size": 10, "ranges": [[4, 6, zlib.crc32(data[4:])]]}, {"name": "f", "size": 10, "ranges": [[0, 4, zlib.crc32(data[:4])]]}])
    assert folded == [{"name": "f", "size": 10, "crc32": f"{zlib.crc32(data):08x}"}]
    with pytest.raises(IntegrityError, match=r"f: the ranks' writes end at byte 4 but the next starts at 6 \(bytes uncovered or written twice\)"):
        fold_entries([{"name": "f", "size": 10, "ranges": [[0, 4, 0], [6, 4, 0]]}])
    with pytest.raises(IntegrityError, match="f: the ranks wrote 4 of its 10 bytes"):
        fold_entries([{"name": "f", "size": 10, "ranges": [[0, 4, 0]]}])


def _mask(obj, keep):
    if isinstance(obj, torch.Tensor):
        return obj if id(obj) in keep else torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if isinstance(obj, dict):
        return {k: _mask(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask(v, keep) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_mask(v, keep) for v in obj)
    return obj


def test_spread_puts_the_largest_first_onto_the_least_loaded():
    assert spread([5, 1, 4, 4], 2) == [0, 0, 1, 1]  # 5 -> 0; 4 -> 1; 4 -> 1 (4 < 5); 1 -> 0 (5 < 8)
    assert spread([3, 3, 3], 1) == [0, 0, 0]


@pytest.mark.parametrize("encoding", ["pt", "xser"])
def test_a_tag_written_by_nxd_loads_without_a_manifest(tmp_path, encoding):
    """NxD writes no manifest: the layout comes from file names, ZeRO-1 from a dp_rank_01 file, xser from .tensors/."""
    from shardwise.training.zero1 import split_zero1

    model, optimizer = _adam_state()
    full = {
        "param_groups": [{"lr": 0.1, "params": [0, 1]}], "state": {},
        "base_state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn(5 + 2 * i, 3)} for i in range(2)},
        "shape_info": {i: torch.Size([5 + 2 * i, 3]) for i in range(2)},
    }
    shards = split_zero1(full, 2, "test")
    tag = tmp_path / "step_7"
    tag.mkdir()
    (tag / "checkpoint").write_text("1")
    write_part(encoding, dict(model.state_dict()), tag, "model/dp_rank_00_tp_rank_00_pp_rank_00.pt")
    for dp, shard in enumerate(shards):
        write_part(encoding, shard, tag, f"optim/dp_rank_{dp:02d}_tp_rank_00_pp_rank_00.pt")
    torch.save({"step": 7}, tag / "user_content.pt")
    (tag / "done").write_text("1")
    state, optim = {}, {}
    assert shardwise.load_checkpoint(tmp_path, model=state, optimizer=optim) == {"step": 7}  # one process: DP 2 -> 1
    assert _same(state, dict(model.state_dict()))
    assert _same(optim["base_state"], full["base_state"]) and tuple(optim["shape_info"][1]) == (7, 3)


@pytest.mark.parametrize("encoding", ["safetensors", "xser"])
def test_async_snapshots_of_parts_keep_shared_tensors_shared(tmp_path, encoding):
    """A tensor that appears twice (tied weights) is one tensor in every part's snapshot, so parts agree on who writes it."""
    from shardwise.training.assign import SnapshotBuffers, snapshot

    tied = torch.randn(4, 3)
    state = {"embed": tied, "lm_head": tied, "norm": torch.randn(3), "big": torch.randn(8, 8)}
    alone = fold_entries(write_part(encoding, state, tmp_path / "one", "model/m.pt"))
    entries = []
    for part in range(2):  # as save_checkpoint(async_save=True) does on each of 2 DP ranks
        copy = snapshot(state, SnapshotBuffers(), owned_tensors(state, part, 2))
        assert copy["embed"] is copy["lm_head"]
        entries += write_part(encoding, copy, tmp_path / "two", "model/m.pt", part, 2)
    assert fold_entries(entries) == alone


def test_a_damaged_structure_is_a_format_error_naming_the_file(tmp_path):
    from shardwise.formats.safetensors import header_bytes
    from shardwise.tensors import TensorInfo

    shardwise.save_checkpoint(tmp_path, "t", model={"w": torch.ones(2)}, encoding="safetensors")
    path = tmp_path / "t/model/dp_rank_00_tp_rank_00_pp_rank_00.safetensors"
    for structure in ('{"D": [[{"D": []}, 2]]}', '{"T": "nope"}', '{"S": "ab"}', "[" * 5000):
        header, _ = header_bytes([TensorInfo("w", (2,), "float32")], {"shardwise.structure": structure})
        path.write_bytes(header + torch.ones(2).numpy().tobytes())
        manifest = json.loads((tmp_path / "t/shardwise.json").read_text())
        manifest["files"] = [{**f, "size": path.stat().st_size} if f["name"].endswith(".safetensors") else f for f in manifest["files"]]
        (tmp_path / "t/shardwise.json").write_text(json.dumps(manifest))
        with pytest.raises(shardwise.FormatError, match="dp_rank_00_tp_rank_00_pp_rank_00.safetensors: "):
            shardwise.load_checkpoint(tmp_path, "t", model={}, verify=False)


def test_a_rank_reading_resharded_weights_from_a_url_fetches_every_xser_file(tmp_path):
    """A rank that reshards the model on load checks every model file the manifest lists, xser's
    ``.info.pt`` tables included, so it must download them all (and its own when not resharding)."""
    import json

    from shardwise.distributed import ParallelCoords
    from shardwise.training.layout import MANIFEST
    from shardwise.training.remote import files_for_rank

    model, optimizer = _adam_state()
    shardwise.save_checkpoint(tmp_path, "t", model=model, optimizer=optimizer, encoding="xser")
    listed = [f["name"] for f in json.loads((tmp_path / "t" / MANIFEST).read_text())["files"]]
    model_files = [n for n in listed if n.startswith("model/")]
    assert any(n.endswith(".info.pt") for n in model_files) and any(".tensors/" in n for n in model_files)
    for same_grid in (True, False):
        chosen = files_for_rank(listed, {}, ParallelCoords(), model=True, optimizer=True, same_grid=same_grid)
        assert set(model_files) <= set(chosen)
        assert {n for n in listed if n.startswith("optim/")} <= set(chosen)
