"""NeMo compatibility both ways: archives laid out exactly as NeMo writes them are read by shardwise,
and archives shardwise writes are read by NeMo's own restore steps (tar extract, OmegaConf, torch.load)."""

from __future__ import annotations

import os
import tarfile
import uuid
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import shardwise
from shardwise.errors import FormatError, LayoutError

from conftest import assert_same_tensors, sample_state_dict


def rank_state(tp_rank: int, pp_rank: int) -> dict:
    return dict(sample_state_dict(seed=10 * pp_rank + tp_rank))


def make_nemo(tmp: Path, *, tp: int = 1, pp: int = 1, mode: str = "w:", name: str = "model.nemo") -> tuple[Path, str]:
    """Build an archive the way NeMo's SaveRestoreConnector does: a folder tarred with arcname "."."""
    folder = tmp / f"nemo-src-{tp}-{pp}-{mode.replace(':', '')}"
    folder.mkdir()
    artifact = f"{uuid.uuid4().hex}_tokenizer.model"
    (folder / artifact).write_bytes(b"sentencepiece model bytes")
    cfg = OmegaConf.create({
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "nemo_version": "2.3.0",
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "tokenizer": {"library": "sentencepiece", "model": f"nemo:{artifact}"},
    })
    OmegaConf.save(cfg, folder / "model_config.yaml", resolve=True)
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            if tp == 1 and pp == 1:
                weights = folder / "model_weights.ckpt"
            elif pp == 1:
                weights = folder / f"mp_rank_{tp_rank:02d}" / "model_weights.ckpt"
            else:
                weights = folder / f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}" / "model_weights.ckpt"
            weights.parent.mkdir(exist_ok=True)
            torch.save(rank_state(tp_rank, pp_rank), weights)
    path = tmp / name
    with tarfile.open(path, mode) as tar:
        tar.add(folder, arcname=".")
    return path, artifact


@pytest.mark.parametrize("tp,pp,expected", [(1, 1, "single"), (2, 1, "sharded"), (2, 2, "sharded"), (1, 2, "sharded")])
def test_nemo_layouts_are_read_in_place_rank_by_rank(tmp_path, tp, pp, expected):
    path, _ = make_nemo(tmp_path, tp=tp, pp=pp)
    summary = shardwise.inspect(path)
    assert summary["format"] == "archive"
    assert summary["archive"]["layout"]["kind"] == expected
    assert (summary["archive"]["layout"]["tp"], summary["archive"]["layout"]["pp"]) == (tp, pp)
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            with shardwise.restore_from(path, tp_rank=tp_rank, pp_rank=pp_rank) as restored:
                assert_same_tensors(restored.state_dict, rank_state(tp_rank, pp_rank))
    if tp * pp > 1:
        folder = "mp_rank_01" if pp == 1 else "tp_rank_00_pp_rank_001"
        assert any(t["name"].startswith(folder + "/") for t in summary["tensors"])


def test_gzip_archives_from_old_nemo_versions_are_read(tmp_path):
    path, artifact = make_nemo(tmp_path, tp=2, mode="w:gz")
    with shardwise.restore_from(path, tp_rank=1) as restored:
        assert_same_tensors(restored.state_dict, rank_state(1, 0))
        assert Path(restored.config["tokenizer"]["model"]).read_bytes() == b"sentencepiece model bytes"
    assert shardwise.inspect(path)["archive"]["compressed"] is True


def test_a_command_decompresses_a_gzip_archive_once_and_removes_the_copy(cli, tmp_path, monkeypatch):
    """Detection and conversion both open the archive; inside one command they share one decompressed copy."""
    import gzip
    import tempfile

    from conftest import tiny_llama
    from shardwise.archive import tar_index

    src = tiny_llama(tmp_path / "hf")
    plain = tmp_path / "a.nemo"
    assert cli("convert", src, plain, "--to", "archive", "--tp", "2", "-q").code == 0
    packed = tmp_path / "a_gz.nemo"
    with tarfile.open(plain) as tar, tarfile.open(packed, "w:gz") as out:
        for member in tar:
            out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    opened = []
    real_open = gzip.open
    monkeypatch.setattr(tar_index.gzip, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for args in (("convert", packed, tmp_path / "back", "--to", "hf", "-q"), ("inspect", packed, "--json"), ("diff", src, packed, "-q")):
        opened.clear()
        result = cli(*args)
        assert result.code == 0, result
        assert len(opened) == 1 and list(scratch.iterdir()) == []
    with tar_index.shared_decompression():
        first = tar_index.open_tar(packed)
        packed.write_bytes(packed.read_bytes())  # the same bytes rewritten: a new modification time, so a new copy
        second = tar_index.open_tar(packed)
        assert first.path != second.path and len(list(scratch.iterdir())) == 2
    assert list(scratch.iterdir()) == []


def test_another_thread_keeps_its_own_copy_while_a_command_shares_one(tmp_path):
    """The sharing is per context: a library call on another thread must not get the command's copy,
    which is deleted when the command ends."""
    import threading

    from shardwise.archive import tar_index

    packed, _ = make_nemo(tmp_path, mode="w:gz")
    opened, ended, seen = threading.Event(), threading.Event(), {}

    def command():
        with tar_index.shared_decompression():
            seen["command"] = tar_index.open_tar(packed).path
            opened.set()
            ended.wait(10)  # the library call has its index before the command ends
        ended.set()

    def library_call():
        opened.wait(10)
        index = tar_index.open_tar(packed)
        seen["library"] = index.path
        ended.set()
        thread.join()
        seen["read"] = index.read(index.get("model_config.yaml"))
        index.close()

    thread = threading.Thread(target=command)
    thread.start()
    library_call()
    assert seen["library"] != seen["command"] and b"tensor_model_parallel_size" in seen["read"]
    assert not os.path.exists(seen["command"]) and not os.path.exists(seen["library"])


def test_nemo_artifact_references_resolve_to_real_files(tmp_path):
    path, artifact = make_nemo(tmp_path)
    restored = shardwise.restore_from(path)
    resolved = Path(restored.config["tokenizer"]["model"])
    assert resolved.name == artifact and resolved.read_bytes() == b"sentencepiece model bytes"
    assert restored.raw_config["tokenizer"]["model"] == f"nemo:{artifact}"
    artifacts = shardwise.inspect(path)["archive"]["artifacts"]
    assert artifacts == [{"name": artifact, "kind": "file", "files": 1, "size": 25, "referenced_by": ["tokenizer.model"]}]
    restored.close()
    assert not resolved.exists()


def test_a_sharded_archive_needs_a_rank(tmp_path):
    path, _ = make_nemo(tmp_path, tp=2)
    with pytest.raises(LayoutError, match="pass tp_rank= and pp_rank="):
        shardwise.restore_from(path)
    with pytest.raises(LayoutError, match="outside the archive's TP=2, PP=1"):
        shardwise.restore_from(path, tp_rank=2)


def test_sharded_archives_cannot_be_flattened_by_convert(cli, tmp_path):
    path, _ = make_nemo(tmp_path, tp=2)
    result = cli("convert", path, tmp_path / "out", "--to", "hf")
    assert result.code == 2 and "is sharded (TP=2, PP=1)" in result.err
    assert not (tmp_path / "out").exists()


def _restore_as_nemo_does(archive: Path, tmp: Path) -> tuple[dict, dict, Path]:
    """NeMo's restore steps: tarfile 'r:' (then 'r:gz'), extract, OmegaConf.load, torch.load the weights."""
    out = tmp / "nemo-extracted"
    try:
        tar = tarfile.open(archive, "r:")
    except tarfile.ReadError:
        tar = tarfile.open(archive, "r:gz")
    with tar:
        tar.extractall(out, filter="data")
    cfg = OmegaConf.to_container(OmegaConf.load(out / "model_config.yaml"))
    weights = torch.load(out / "model_weights.ckpt", map_location="cpu", weights_only=False)
    return cfg, weights, out


def test_archives_written_by_shardwise_follow_nemos_layout(tmp_path):
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"spm")
    state = dict(sample_state_dict())
    path = shardwise.save_to(state, tmp_path / "m.nemo", config={"precision": 16}, artifacts={"tokenizer.model": tokenizer})
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names[0] == "." and all(n.startswith("./") for n in names[1:])
    assert "./model_config.yaml" in names and "./model_weights.ckpt" in names and names[-1] == "./shardwise.json"
    cfg, weights, out = _restore_as_nemo_does(path, tmp_path)
    assert cfg["precision"] == 16
    reference = cfg["tokenizer"]["model"]
    assert reference.startswith("nemo:") and len(reference.split(":")[1].split("_")[0]) == 32
    assert (out / reference[len("nemo:"):]).read_bytes() == b"spm"
    assert_same_tensors(weights, state)


def test_sharded_archives_written_by_shardwise_use_nemos_rank_folders(tmp_path):
    src, _ = make_nemo(tmp_path, tp=2, pp=2)
    out = tmp_path / "unpacked"
    shardwise_archive = tmp_path / "copy.nemo"
    from shardwise.archive.unpack import pack, unpack

    unpack(src, out)
    pack(out, shardwise_archive)
    with tarfile.open(shardwise_archive) as tar:
        names = set(tar.getnames())
    assert {f"./tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt" for t in range(2) for p in range(2)} <= names
    assert shardwise.diff(src, shardwise_archive).equal


def test_a_distributed_checkpoint_inside_an_archive_with_unreadable_metadata_is_refused_by_name(cli, tmp_path):
    folder = tmp_path / "dist"
    (folder / "model_weights").mkdir(parents=True)
    (folder / "model_config.yaml").write_text("mcore_gpt: true\n")
    for name, data in {".metadata": b"\x80\x04meta", "__0_0.distcp": b"\0" * 64, "__0_1.distcp": b"\0" * 64,
                       "common.pt": b"PK", "metadata.json": b'{"sharded_backend": "torch_dist"}'}.items():
        (folder / "model_weights" / name).write_bytes(data)
    path = tmp_path / "dist.nemo"
    with tarfile.open(path, "w:") as tar:
        tar.add(folder, arcname=".")
    with pytest.raises(FormatError, match="model_weights/.metadata: not a readable DCP metadata pickle"):
        shardwise.inspect(path)
    with pytest.raises(FormatError, match="model_weights/.metadata"):
        shardwise.restore_from(path)
    for to in ("hf", "dcp"):  # never an empty output
        result = cli("convert", path, tmp_path / f"out-{to}", "--to", to)
        assert result.code == 2 and f"{path}:model_weights/.metadata" in result.err and not (tmp_path / f"out-{to}").exists()
        assert len(result.err.strip().splitlines()) == 1
