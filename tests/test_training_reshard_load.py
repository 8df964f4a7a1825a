"""resharded_model_state: one rank's model weights at a new TP/PP, built in memory from a training tag
saved at another, equal bit for bit to what `shardwise reshard` writes for that rank."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.cli import run
from shardwise.errors import IntegrityError, LayoutError, OptionError
from shardwise.reshard.convert import convert_layout
from shardwise.tensors import FileTensorSource
from shardwise.training.layout import DONE, MANIFEST, MARKER, manifest_document
from shardwise.training.reshard_load import resharded_model_state
from test_reshard import _llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {
        "gqa": _llama(root / "gqa", heads=8, kv_heads=4, layers=4, tied=False),
        "mha": _llama(root / "mha", heads=8, kv_heads=8, layers=4, tied=False),
        "gqa-tied": _llama(root / "gqa-tied", heads=8, kv_heads=4, layers=4, tied=True),
    }


def _config(hf: Path) -> dict:
    return json.loads((hf / "config.json").read_text())


def _tag_from(folder: Path, tag: Path, *, model_config: dict | None) -> Path:
    """A training tag around the model/ files of an engine-written nxdt folder: marker, manifest, done."""
    tag.mkdir(parents=True)
    (tag / MARKER).write_text("1")
    shutil.copytree(folder / "model", tag / "model")
    files = []
    for path in sorted((tag / "model").iterdir()):
        data = path.read_bytes()
        files.append({"name": f"model/{path.name}", "size": len(data), "crc32": f"{zlib.crc32(data):08x}"})
    tp = 1 + max(int(p.name.split("_")[5]) for p in (tag / "model").iterdir())
    pp = 1 + max(int(p.name.split("_")[8][:2]) for p in (tag / "model").iterdir())
    document = manifest_document(tag.name, 1, "pt", {"tp": tp, "pp": pp, "dp": 1, "optimizer": "replicated"}, files)
    if model_config is not None:
        document["model_config"] = model_config
    (tag / MANIFEST).write_text(json.dumps(document))
    (tag / DONE).write_text("1")
    return tag


def _source(models, tmp_path: Path, model: str, with_config: bool = True, **layout) -> tuple[Path, Path]:
    """(engine-written nxdt folder, training tag holding the same model files)."""
    src = tmp_path / "src"
    convert_layout(models[model], src, to="nxdt", **layout)
    return src, _tag_from(src, tmp_path / "ckpts" / "step_1", model_config=_config(models[model]) if with_config else None)


def _assert_same(state: dict, reference: dict, label: str) -> None:
    assert list(state) == list(reference), label
    for name, expected in reference.items():
        got = state[name]
        assert (got.dtype, tuple(got.shape)) == (expected.dtype, tuple(expected.shape)), f"{label}: {name}"
        assert torch.equal(got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)), f"{label}: {name}"


def _files(folder: Path) -> dict[tuple[int, int], Path]:
    return {(int(p.name.split("_")[5]), int(p.name.split("_")[8][:2])): p for p in (folder / "model").iterdir()}


def _check_every_rank(tag: Path, reference: Path, tp: int, pp: int, label: str, **kwargs) -> None:
    files = _files(reference)
    assert sorted(files) == [(t, p) for t in range(tp) for p in range(pp)]
    for (t, p), file in files.items():
        state = resharded_model_state(tag, tp_size=tp, pp_size=pp, tp_rank=t, pp_rank=p, **kwargs)
        _assert_same(state, torch.load(file, weights_only=True), f"{label} -> tp{tp} pp{pp} rank ({t}, {p})")


SOURCES = {
    "nxdt tp2 pp2": ("gqa", dict(tp=2, pp=2)),
    "nxdt qkv-linear tp2 pp2": ("gqa", dict(tp=2, pp=2, qkv_linear=True)),
    "nxdt fuse-qkv kv x2 tp8": ("gqa", dict(tp=8, fuse_qkv=True, kv_multiplier=2)),
    "nxdt mha tp4 pp2": ("mha", dict(tp=4, pp=2)),
    "nxdt tied tp2 pp2": ("gqa-tied", dict(tp=2, pp=2)),
    "megatron gqa (query + key_value) tp2 pp2": ("gqa", dict(style="megatron", tp=2, pp=2)),
    "megatron mha (query_key_value) tp1 pp2": ("mha", dict(style="megatron", tp=1, pp=2)),
}
TARGETS = [(1, 1), (4, 1), (1, 2), (2, 1)]
EXTRA_TARGETS = {"nxdt qkv-linear tp2 pp2": [(8, 1), (8, 2)], "nxdt fuse-qkv kv x2 tp8": [(8, 2)]}  # KV heads replicated x2 at TP 8


@pytest.mark.parametrize(("source", "target"), [(s, t) for s in SOURCES for t in TARGETS + EXTRA_TARGETS.get(s, [])])
def test_every_rank_equals_the_file_shardwise_reshard_writes_for_it(models, tmp_path, source, target):
    model, layout = SOURCES[source]
    src, tag = _source(models, tmp_path, model, **layout)
    tp, pp = target
    reference = tmp_path / "ref"
    assert run(["reshard", str(src), str(reference), "--tp", str(tp), "--pp", str(pp)]) == 0
    _check_every_rank(tag, reference, tp, pp, source)


def test_kv_heads_are_replicated_when_the_target_tp_exceeds_them(models, tmp_path):
    """The GQA model has 4 KV heads; at TP 8 each lives on two ranks, tiled K0 K1 K2 K3 K0 K1 K2 K3 as NxD places them."""
    from safetensors.torch import load_file

    _, tag = _source(models, tmp_path, "gqa", tp=2, pp=2, qkv_linear=True)
    full = load_file(models["gqa"] / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    for rank in range(8):
        k = resharded_model_state(tag, tp_size=8, pp_size=1, tp_rank=rank, pp_rank=0)["model.layers.0.self_attn.qkv_proj.weight_k"]
        head = rank % 4
        assert torch.equal(k, full[head * 8:(head + 1) * 8]), rank


@pytest.mark.parametrize(("model", "layout"), [
    ("gqa", dict(tp=4, pp=1)),
    ("gqa", dict(tp=1, pp=2, qkv_linear=True)),
    ("mha", dict(style="megatron", tp=2, pp=1)),
])
def test_a_rank_equals_the_direct_conversion_of_the_hf_model_at_that_layout(models, tmp_path, model, layout):
    """An independent path: the HF model converted straight to the target, never through the saved shards."""
    source_layout = dict(style=layout.get("style"), qkv_linear=layout.get("qkv_linear"), tp=2, pp=2)
    _, tag = _source(models, tmp_path, model, **source_layout)
    direct = tmp_path / "direct"
    convert_layout(models[model], direct, to="nxdt", **layout)
    _check_every_rank(tag, direct, layout["tp"], layout["pp"], f"{model} direct")


def test_a_tag_written_by_save_checkpoint_reshards_with_the_config_given_as_a_file(models, tmp_path):
    nx = tmp_path / "nx"
    convert_layout(models["gqa"], nx, to="nxdt", tp=1, qkv_linear=True)
    state = torch.load(nx / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt", weights_only=True)
    shardwise.save_checkpoint(tmp_path / "ckpts", "step_7", model=state, optimizer={"state": {}, "param_groups": []}, user_content={"step": 7})
    tag = tmp_path / "ckpts" / "step_7"
    assert (tag / "optim").is_dir() and (tag / DONE).is_file()
    reference = tmp_path / "ref"
    convert_layout(nx, reference, keep_layout=True, tp=2, pp=2)
    _check_every_rank(tag, reference, 2, 2, "save_checkpoint tp1", config=models["gqa"] / "config.json")
    same = resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0, config=models["gqa"])  # a folder holding config.json
    _assert_same(same, state, "same layout")


def _spy_reads(monkeypatch) -> dict[str, int]:
    """Bytes read from each file, through maps or preads."""
    read: dict[str, int] = {}
    mapped, pread = FileTensorSource.mapped_bytes, FileTensorSource.read_into

    def spy_mapped(self, entry, start=0, length=None):
        view = mapped(self, entry, start, length)
        read[Path(entry.path).name] = read.get(Path(entry.path).name, 0) + len(view)
        return view

    def spy_pread(self, entry, offset, out):
        read[Path(entry.path).name] = read.get(Path(entry.path).name, 0) + len(out)
        return pread(self, entry, offset, out)

    monkeypatch.setattr(FileTensorSource, "mapped_bytes", spy_mapped)
    monkeypatch.setattr(FileTensorSource, "read_into", spy_pread)
    return read


def test_a_rank_reads_only_the_source_rows_it_needs(models, tmp_path, monkeypatch):
    _, tag = _source(models, tmp_path, "gqa", tp=2, pp=2)
    read = _spy_reads(monkeypatch)
    state = resharded_model_state(tag, tp_size=2, pp_size=2, tp_rank=1, pp_rank=0)
    # the same layout: every byte read once, its own file but for the norms, which are read from their first copy
    assert sum(read.values()) == sum(t.numel() * t.element_size() for t in state.values())
    norms = sum(t.numel() * t.element_size() for n, t in state.items() if "norm" in n)
    assert read == {"dp_rank_00_tp_rank_01_pp_rank_00.pt": sum(read.values()) - norms, "dp_rank_00_tp_rank_00_pp_rank_00.pt": norms}
    read.clear()
    resharded_model_state(tag, tp_size=1, pp_size=2, tp_rank=0, pp_rank=1)  # the second stage: the saved second stage only
    assert set(read) == {"dp_rank_00_tp_rank_00_pp_rank_01.pt", "dp_rank_00_tp_rank_01_pp_rank_01.pt"}
    read.clear()
    state = resharded_model_state(tag, tp_size=4, pp_size=1, tp_rank=1, pp_rank=0)  # heads 2-3, KV head 1, vocab rows 32-63: saved TP rank 0
    assert set(read) == {"dp_rank_00_tp_rank_00_pp_rank_00.pt", "dp_rank_00_tp_rank_00_pp_rank_01.pt"}
    assert sum(read.values()) < 2 * sum(t.numel() * t.element_size() for t in state.values())


def test_nothing_is_written_and_the_optimizer_files_are_never_opened(models, tmp_path, monkeypatch):
    _, tag = _source(models, tmp_path, "gqa", tp=2, pp=2)
    (tag / "optim").mkdir()
    (tag / "optim" / "dp_rank_00_tp_rank_00_pp_rank_00.pt").write_bytes(b"not a torch file")
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}
    read = _spy_reads(monkeypatch)
    state = resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0)
    assert "lm_head.weight" in state and all(name.startswith("dp_rank_00_tp_rank") for name in read)
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")} == before
    state["model.embed_tokens.weight"].add_(1)  # the result owns its memory: the files stay as they were
    again = resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0)
    assert not torch.equal(state["model.embed_tokens.weight"], again["model.embed_tokens.weight"])


def test_the_config_comes_from_the_argument_or_the_manifest_and_is_required(models, tmp_path):
    _, tag = _source(models, tmp_path, "gqa", with_config=False, tp=2, pp=2)
    with pytest.raises(OptionError, match=r"step_1: .*pass model_config="):
        resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0)
    config = _config(models["gqa"])
    wrong = dict(config, num_key_value_heads=8)
    document = json.loads((tag / MANIFEST).read_text())
    document["model_config"] = wrong
    (tag / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(LayoutError, match=r"step_1/model: .*2 KV heads per rank, which does not fit the config's 8 KV heads"):
        resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0)
    state = resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0, config=config)  # the argument wins
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)


def test_layouts_the_model_cannot_take_are_refused_naming_the_folder_and_numbers(models, tmp_path):
    _, tag = _source(models, tmp_path, "gqa", tp=2, pp=2)
    with pytest.raises(LayoutError, match=r"step_1: saved at tp 2 x pp 2, cannot be resharded to tp 3 x pp 1: tensor parallel size 3 does not divide 8 query heads"):
        resharded_model_state(tag, tp_size=3, pp_size=1, tp_rank=0, pp_rank=0)
    with pytest.raises(LayoutError, match=r"cannot be resharded to tp 1 x pp 5: .*5 is more pipeline stages than the model's 4 layers"):
        resharded_model_state(tag, tp_size=1, pp_size=5, tp_rank=0, pp_rank=0)
    with pytest.raises(LayoutError, match=r"step_1: tp_rank 2 is out of range for tp_size 2 \(ranks 0..1\)"):
        resharded_model_state(tag, tp_size=2, pp_size=1, tp_rank=2, pp_rank=0)
    with pytest.raises(LayoutError, match=r"pp_rank -1 is out of range for pp_size 2"):
        resharded_model_state(tag, tp_size=2, pp_size=2, tp_rank=0, pp_rank=-1)
    with pytest.raises(LayoutError, match=r"tp_size must be at least 1, not 0"):
        resharded_model_state(tag, tp_size=0, pp_size=1, tp_rank=0, pp_rank=0)


def test_architectures_the_layout_engine_does_not_know_are_refused_with_the_way_out(models, tmp_path):
    tag = tmp_path / "ckpts" / "step_1"
    (tag / "model").mkdir(parents=True)
    for t in range(2):
        torch.save({"encoder.layer.0.attention.query.weight": torch.zeros(4, 8)}, tag / "model" / f"dp_rank_00_tp_rank_{t:02d}_pp_rank_00.pt")
    config = {"model_type": "bert", "hidden_size": 8}
    advice = r"resharding on load works for the architectures the layout engine knows \(Llama family\); otherwise load at the saved TP/PP"
    with pytest.raises(LayoutError, match=r"step_1/model: the model config says model_type 'bert'; " + advice):
        resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0, config=config)
    with pytest.raises(LayoutError, match=r"\(e.g. encoder.layer.0.attention.query.weight\) match none of the Llama layouts; " + advice):
        resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0, config={"hidden_size": 8})
    from safetensors.torch import load_file

    plain = tmp_path / "plain"  # a plain HF model trained in one process: HF names, which NxD's model/ folders never hold
    shardwise.save_checkpoint(plain, "step_1", model=load_file(models["gqa"] / "model.safetensors"))
    with pytest.raises(LayoutError, match=r"plain/step_1/model: holds hf-style tensor names, not NxD's nxdt or megatron styles; " + advice):
        resharded_model_state(plain / "step_1", tp_size=2, pp_size=1, tp_rank=0, pp_rank=0, config=models["gqa"])
    nx = tmp_path / "nx"  # Llama names plus a tensor the tables do not know (a bias)
    convert_layout(models["gqa"], nx, to="nxdt", tp=2)
    (nx / "shardwise.json").unlink()  # files rewritten under a manifest would be damage, refused before the layout is looked at
    for path in (nx / "model").iterdir():
        torch.save({**torch.load(path, weights_only=True), "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, path)
    with pytest.raises(LayoutError, match=r"a Llama model in this layout does not have.*; " + advice):
        resharded_model_state(nx, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0, config=_config(models["gqa"]))


def test_a_model_file_that_does_not_match_the_manifest_is_refused(models, tmp_path):
    _, tag = _source(models, tmp_path, "gqa", tp=2, pp=2)
    path = tag / "model" / "dp_rank_00_tp_rank_01_pp_rank_01.pt"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(IntegrityError, match=r"dp_rank_00_tp_rank_01_pp_rank_01.pt: .*the manifest says"):
        resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0)
    path.unlink()
    document = json.loads((tag / MANIFEST).read_text())
    document["files"] = [f for f in document["files"] if f["name"] != "model/dp_rank_00_tp_rank_01_pp_rank_01.pt"]
    (tag / MANIFEST).write_text(json.dumps(document))
    shutil.copy(tmp_path / "src" / "model" / path.name, path)  # intact again, but no longer part of the tag
    with pytest.raises(IntegrityError, match=r"dp_rank_00_tp_rank_01_pp_rank_01.pt: not listed in the checkpoint's manifest"):
        resharded_model_state(tag, tp_size=1, pp_size=1, tp_rank=0, pp_rank=0)
