"""xser (torch-xla's one-file-per-tensor encoding, NxD's --save_xser/--load_xser): read, written, round-tripped, refused when damaged.

torch-xla cannot be installed here, so "written by NxD" means written exactly as
``torch_xla.utils.serialization`` and NxD's ``_xser_save_data`` write it: ``torch.save`` of each
tensor to ``P.tensors/tensor_<tid>.pt``, ``torch.save`` of the structure with every tensor
replaced by a ``torch_xla.utils.serialization.TensorReference(tid)``, and ``torch.save`` of
``{tid: {"dtype", "shape"}}`` to ``P.info.pt``. The class is registered under its real module
name, so the pickles name the same global as real ones.
"""

from __future__ import annotations

import json
import os
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from shardwise.errors import FormatError, UnsafeCheckpointError
from shardwise.formats.torch_pickle import TorchFile
from shardwise.formats.xser import xser_files
from shardwise.reshard.convert import convert_layout
from shardwise.tensors import TensorInfo
from shardwise.verify.tensor_diff import diff

from conftest import raw_bytes
from test_reshard import _llama


class TensorReference:  # what torch_xla.utils.serialization defines
    def __init__(self, tid):
        self.tid = tid


@pytest.fixture
def torch_xla_module(monkeypatch):
    """``torch_xla.utils.serialization.TensorReference`` importable, so torch.save/torch.load can pickle it."""
    modules = {name: types.ModuleType(name) for name in ("torch_xla", "torch_xla.utils", "torch_xla.utils.serialization")}
    TensorReference.__module__ = "torch_xla.utils.serialization"
    modules["torch_xla.utils.serialization"].TensorReference = TensorReference
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["torch_xla.utils.serialization"]


def save_like_nxd(state: dict, path: Path, *, info: bool = True) -> None:
    """NxD's _xser_save_data + _extract_tensor_info_and_update_state_dict, with torch.save as the storage."""
    folder = Path(str(path) + ".tensors")
    folder.mkdir(parents=True)
    references, table = OrderedDict(), {}
    for tid, (name, tensor) in enumerate(state.items()):
        torch.save(tensor.clone(), folder / f"tensor_{tid}.pt")
        references[name] = TensorReference(tid)
        table[tid] = {"dtype": tensor.dtype, "shape": tensor.shape}
    torch.save(references, path)
    if info:
        torch.save(table, str(path) + ".info.pt")


def _state(seed=0) -> "OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([
        ("embed.weight", torch.randn(6, 4, generator=g).to(torch.bfloat16)),
        ("layers.0.weight", torch.randn(4, 4, generator=g)),
        ("layers.0.step", torch.tensor(7)),
        ("ids", torch.arange(5, dtype=torch.int64)),
    ])


def _write_ours(state: dict, folder: Path, relpath: str = "m.pt") -> Path:
    infos = [TensorInfo(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in state.items()]
    for planned in xser_files(relpath, infos, lambda info, out: out.write(raw_bytes(state[info.name]))):
        target = folder / planned.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            planned.produce(f)
    return folder / relpath


def test_files_written_by_nxd_are_read_lazily_with_their_values(torch_xla_module, tmp_path):
    state = _state()
    save_like_nxd(state, tmp_path / "m.pt")
    source = TorchFile(tmp_path / "m.pt")
    assert source.xser and source.keys() == list(state)
    for name, tensor in state.items():
        assert torch.equal(source.read(name), tensor) and source.read(name).dtype == tensor.dtype
        assert source.stored(name).path == str(tmp_path / "m.pt.tensors" / f"tensor_{list(state).index(name)}.pt")


def test_ours_load_in_torch_xla_terms_and_pickle_as_torch_save_does(torch_xla_module, tmp_path):
    state = _state(1)
    path = _write_ours(state, tmp_path)
    references = torch.load(path, weights_only=False)
    assert list(references) == list(state) and [r.tid for r in references.values()] == [0, 1, 2, 3]
    assert all(type(r) is TensorReference for r in references.values())
    for tid, tensor in enumerate(state.values()):
        loaded = torch.load(tmp_path / "m.pt.tensors" / f"tensor_{tid}.pt", weights_only=True)
        assert torch.equal(loaded, tensor) and loaded.dtype == tensor.dtype
    table = torch.load(str(path) + ".info.pt", weights_only=True)
    assert table == {tid: {"dtype": t.dtype, "shape": t.shape} for tid, t in enumerate(state.values())}
    assert type(table[0]["shape"]) is torch.Size
    torch.save(table, tmp_path / "real_info.pt")
    assert zipfile.ZipFile(str(path) + ".info.pt").read("m.pt.info/data.pkl") == zipfile.ZipFile(tmp_path / "real_info.pt").read("real_info/data.pkl")
    assert [(r.shape, r.dtype) for r in references.values()] == [(t.shape, t.dtype) for t in state.values()]
    # the reference pickle is the one torch.save writes for the same references
    torch.save(references, tmp_path / "real.pt")
    ours = zipfile.ZipFile(path).read("m/data.pkl")
    real = zipfile.ZipFile(tmp_path / "real.pt").read("real/data.pkl")
    assert ours == real


def test_tensors_kept_inline_and_the_older_info_less_files_are_read(torch_xla_module, tmp_path):
    state = _state(2)
    save_like_nxd(state, tmp_path / "m.pt", info=False)  # NxD <= 0.6 wrote no info file
    assert all(torch.equal(TorchFile(tmp_path / "m.pt").read(n), t) for n, t in state.items())
    # stock torch-xla pickles CPU tensors inline; a mix of inline tensors and references reads too
    (tmp_path / "mix.pt.tensors").mkdir()
    torch.save(state["ids"], tmp_path / "mix.pt.tensors" / "tensor_0.pt")
    torch.save({"ids": TensorReference(0), "inline": state["embed.weight"]}, tmp_path / "mix.pt")
    mixed = TorchFile(tmp_path / "mix.pt")
    assert torch.equal(mixed.read("ids"), state["ids"]) and torch.equal(mixed.read("inline"), state["embed.weight"])


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("xser") / "gqa", heads=8, kv_heads=2, layers=5, tied=False)


@pytest.mark.parametrize("options", [dict(tp=2, pp=2), dict(tp=4, pp=2, fuse_qkv=True, kv_multiplier=2), dict(tp=2, style="megatron")])
def test_hf_to_xser_nxdt_to_hf_is_bit_exact(gqa, tmp_path, options):
    out = tmp_path / "nxdt"
    result = convert_layout(gqa, out, to="nxdt", weights_format="xser", **options)
    tp, pp = options["tp"], options.get("pp", 1)
    files = {f for f in result.files}
    for t in range(tp):
        for p in range(pp):
            name = f"model/dp_rank_00_tp_rank_{t:02d}_pp_rank_{p:02d}.pt"
            assert {name, name + ".info.pt", name + ".tensors/tensor_0.pt"} <= files
    manifest = json.loads((out / "shardwise.json").read_text())
    assert manifest["parallel"]["encoding"] == "xser"
    assert {m["name"] for m in manifest["members"]} == files - {"shardwise.json"}
    back = tmp_path / "back"
    convert_layout(out, back, to="hf")
    assert diff(gqa, back).equal and diff(gqa, out).equal


def test_reshard_keeps_xser_unless_told_and_nxdt_convert_takes_the_xser_flags(gqa, tmp_path, cli):
    cli("convert", gqa, tmp_path / "x", "--to", "nxdt", "--tp", "2", "--pp", "2", "--weights-format", "xser", "--qkv-linear")
    assert cli("reshard", tmp_path / "x", tmp_path / "x4", "--tp", "4", "--kv-size-multiplier", "2").code == 0
    assert (tmp_path / "x4/model/dp_rank_00_tp_rank_03_pp_rank_01.pt.tensors").is_dir()
    assert cli("reshard", tmp_path / "x", tmp_path / "plain", "--pp", "1", "--weights-format", "torch").code == 0
    assert sorted(p.name for p in (tmp_path / "plain/model").iterdir()) == ["dp_rank_00_tp_rank_00_pp_rank_00.pt", "dp_rank_00_tp_rank_01_pp_rank_00.pt"]
    for folder in ("x4", "plain"):
        assert diff(gqa, tmp_path / folder).equal
    # NxD's flags: --load_xser reads xser, --save_xser writes it (checkpoint.pt as xser when going to full)
    full = tmp_path / "full"
    assert cli("nxdt-convert", "--convert_to_full_state", "--input_dir", tmp_path / "x/model", "--output_dir", full, "--config", gqa / "config.json",
               "--tp_size", "2", "--pp_size", "2", "--qkv_linear", "True", "--load_xser", "True", "--save_xser", "True").code == 0
    assert (full / "checkpoint.pt.tensors").is_dir() and (full / "checkpoint.pt.info.pt").is_file()
    assert diff(gqa, full).equal
    again = tmp_path / "again"
    assert cli("nxdt-convert", "--convert_from_full_state", "--input_dir", full / "checkpoint.pt", "--output_dir", again, "--config", gqa / "config.json",
               "--tp_size", "2", "--load_xser", "--save_xser").code == 0
    assert (again / "model/dp_rank_00_tp_rank_01_pp_rank_00.pt.tensors").is_dir() and diff(gqa, again).equal
    # a flag that contradicts the files is refused before anything is written
    result = cli("nxdt-convert", "--convert_to_full_state", "--input_dir", tmp_path / "plain/model", "--output_dir", tmp_path / "no",
                 "--config", gqa / "config.json", "--tp_size", "2", "--load_xser")
    assert result.code == 2 and "encoding 'torch', not the 'xser'" in result.err and not (tmp_path / "no").exists()
    result = cli("convert", gqa, tmp_path / "no", "--to", "archive", "--weights-format", "xser")
    assert result.code == 2 and "xser cannot be written as archive" in result.err


def test_xser_folders_written_by_nxd_v1_and_v2_are_read_without_a_manifest(torch_xla_module, gqa, tmp_path):
    ours = tmp_path / "ours"
    convert_layout(gqa, ours, to="nxdt", tp=2, pp=2)
    for version in ("v2", "v1"):
        nxd = tmp_path / version
        for shard in sorted((ours / "model").iterdir()):
            state = OrderedDict(torch.load(shard, weights_only=True))
            tp, pp = shard.name.split("_tp_rank_")[1].removesuffix(".pt").split("_pp_rank_")
            target = nxd / "model" / shard.name if version == "v2" else nxd / f"tp_rank_{tp}_pp_rank_{pp}"
            target.parent.mkdir(parents=True, exist_ok=True)
            save_like_nxd(state, target)
        back = tmp_path / f"back-{version}"
        convert_layout(nxd, back, to="hf", config=gqa / "config.json")
        assert diff(gqa, back).equal, version


def _damage_cases(folder: Path) -> dict:
    tensors = folder / "m.pt.tensors"
    return {
        "missing tensor file": (lambda: (tensors / "tensor_2.pt").unlink(), "tensor_2.pt: xser tensor file is missing"),
        "missing folder": (lambda: [p.unlink() for p in tensors.iterdir()] and tensors.rmdir(), "tensor folder"),
        "truncated tensor file": (lambda: (tensors / "tensor_0.pt").write_bytes((tensors / "tensor_0.pt").read_bytes()[:-300]), "tensor_0.pt"),
        "info disagrees": (lambda: torch.save({1: {"dtype": torch.float16, "shape": torch.Size([4, 4])}}, str(folder / "m.pt") + ".info.pt"),
                           "tensor_1.pt: holds float32 [4, 4] but m.pt.info.pt records float16"),
        "tensor file holds a dict": (lambda: torch.save({"a": torch.ones(2)}, tensors / "tensor_3.pt"), "must hold one tensor"),
        "bad tid": (lambda: torch.save({"a": TensorReference("../../x")}, folder / "m.pt"), "no valid tid"),
    }


@pytest.mark.parametrize("case", ["missing tensor file", "missing folder", "truncated tensor file", "info disagrees", "tensor file holds a dict", "bad tid"])
def test_damaged_xser_files_are_one_clear_error(torch_xla_module, tmp_path, cli, case):
    _write_ours(_state(3), tmp_path)
    damage, expected = _damage_cases(tmp_path)[case]
    damage()
    with pytest.raises(FormatError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        TorchFile(tmp_path / "m.pt")
    result = cli("inspect", tmp_path / "m.pt")
    assert result.code == 2 and result.err.count("\n") == 1 and expected.split(":")[0] in result.err


def test_a_malicious_tensor_file_is_refused_without_running_it(torch_xla_module, tmp_path, cli):
    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    _write_ours(_state(4), tmp_path)
    torch.save(Boom(), tmp_path / "m.pt.tensors" / "tensor_1.pt")
    with pytest.raises(UnsafeCheckpointError, match="builtins.print"):
        TorchFile(tmp_path / "m.pt")
    result = cli("inspect", tmp_path / "m.pt")
    assert result.code == 2 and "ran" not in result.out


def test_a_tensor_referenced_twice_reads_the_same_bytes_both_times(torch_xla_module, tmp_path):
    state = _state(5)
    save_like_nxd(state, tmp_path / "m.pt")
    shared = TensorReference(1)
    torch.save(OrderedDict([("a", shared), ("b", TensorReference(0)), ("tied", shared), ("again", TensorReference(1))]), tmp_path / "m.pt")
    source = TorchFile(tmp_path / "m.pt")
    for name in ("a", "tied", "again"):
        assert torch.equal(source.read(name), state["layers.0.weight"])
    assert torch.equal(source.read("b"), state["embed.weight"])


def test_references_inside_an_archive_member_and_runaway_nesting_are_refused(torch_xla_module, tmp_path):
    from shardwise.formats.region import Region
    from shardwise.formats.torch_pickle import TorchPickle
    from shardwise.formats.xser import REFERENCE_CLASS, resolve_references

    torch.save({"a": TensorReference(0)}, tmp_path / "member.pt")
    (tmp_path / "outer.tar").write_bytes(b"\0" * 512 + (tmp_path / "member.pt").read_bytes())
    region = Region(str(tmp_path / "outer.tar"), 512, (tmp_path / "member.pt").stat().st_size, "outer.tar:member.pt")
    with pytest.raises(FormatError, match="outer.tar:member.pt: holds xser tensor references"):
        TorchFile(region)
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    region = Region.whole_file(tmp_path / "member.pt")
    with pytest.raises(FormatError, match="nests too deeply"):
        resolve_references(TorchPickle(region, deep, {}, frozenset({REFERENCE_CLASS})))


def test_many_tensor_files_never_hold_more_descriptors_than_the_pool_allows(torch_xla_module, tmp_path, monkeypatch):
    from shardwise import tensors

    monkeypatch.setattr(tensors._DESCRIPTORS, "limit", 4)
    state = OrderedDict((f"t{i}", torch.full((3,), float(i))) for i in range(40))
    save_like_nxd(state, tmp_path / "m.pt")
    import gc

    gc.collect()
    tensors._DESCRIPTORS.close_orphans()  # earlier tests' forgotten sources, closed lazily, must not count
    before = len(os.listdir("/proc/self/fd"))
    with TorchFile(tmp_path / "m.pt") as source:
        for name, tensor in state.items():
            assert torch.equal(source.read(name), tensor)
            assert len(os.listdir("/proc/self/fd")) <= before + 4
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_finalizer_run_while_the_descriptor_pool_is_locked_does_not_deadlock(tmp_path):
    """The garbage collector may finalize a forgotten source inside the pool's locked section."""
    import threading

    from safetensors.torch import save_file

    from shardwise import tensors
    from shardwise.formats.safetensors import SafetensorsFile

    save_file({"w": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    source = SafetensorsFile(tmp_path / "a.safetensors")
    source.read("w")  # holds a descriptor in the pool
    owned = lambda: [k for k in tensors._DESCRIPTORS._open if k[0] == id(source)]  # noqa: E731
    assert owned()

    def finalize_under_the_lock():
        with tensors._DESCRIPTORS._lock:
            source.__del__()

    worker = threading.Thread(target=finalize_under_the_lock, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the finalizer deadlocked on the descriptor pool's lock"
    other = SafetensorsFile(tmp_path / "a.safetensors")
    other.read("w")  # the next call closes what the finalizer left
    assert not owned()
    other.close()
