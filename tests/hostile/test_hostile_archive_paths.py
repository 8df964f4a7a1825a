"""Archive member names that try to write outside the target, or through links planted in it.

Each hostile archive is built here from tiny bytes. The "absolute" victim paths live inside
tmp_path, so a regression writes there (and the test sees it) instead of anywhere on the system.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import shardwise
from shardwise.errors import FormatError

from conftest import listing, sample_state_dict


def _weights() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.ones(2)})


def _tar(path: Path, members: list[tuple[str, bytes | None]], *, gz: bool = False) -> Path:
    """A tar (gzip-compressed with ``gz``) of ``(name, data)`` members; data None makes a folder."""
    with tarfile.open(path, "w:gz" if gz else "w:", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _victim(tmp_path: Path) -> Path:
    """An existing file outside every target: it must keep its bytes."""
    victim = tmp_path / "victim" / "file.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"original")
    return victim


def _untouched(victim: Path) -> bool:
    return victim.read_bytes() == b"original" and listing(victim.parent) == ["file.txt"]


def _one_error_line(result) -> bool:
    return result.code == 2 and result.err.startswith("shardwise: error: ") and result.err.count("\n") == 1 and "Traceback" not in result.err


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_unpack_refuses_a_member_that_is_absolute_once_its_dot_slash_is_stripped(cli, tmp_path, gz):
    victim = _victim(tmp_path)
    archive = _tar(tmp_path / "evil.nemo", [("./model_config.yaml", b"a: 1\n"), (f"./{victim}", b"pwned")], gz=gz)
    result = cli("unpack", archive, tmp_path / "out")
    assert _one_error_line(result), result
    assert str(archive) in result.err and "absolute path" in result.err
    assert _untouched(victim) and not (tmp_path / "out").exists()


def test_unpack_treats_names_differing_only_by_double_or_dot_slashes_as_duplicates(cli, tmp_path):
    archive = shardwise.save_to(dict(sample_state_dict()), tmp_path / "good.nemo", config={"hidden": 16})
    with tarfile.open(archive) as tar:
        weights = tar.getmember("./model_weights.ckpt")
    data = archive.read_bytes()
    forged = data[weights.offset_data: weights.offset_data + weights.size].replace(b"embed", b"EMBED")
    for twin in ("./model_weights.ckpt/.", "././model_weights.ckpt"):
        copy = tmp_path / "twin.nemo"
        with tarfile.open(archive) as src, tarfile.open(copy, "w:", format=tarfile.GNU_FORMAT) as tar:
            for info in src:
                tar.addfile(info, src.extractfile(info) if info.isreg() else None)
            info = tarfile.TarInfo(twin)
            info.size = len(forged)
            tar.addfile(info, io.BytesIO(forged))  # a second copy, unchecked by the manifest's CRC
        result = cli("unpack", copy, tmp_path / "out")
        assert _one_error_line(result) and "appears twice" in result.err, (twin, result)
        assert not (tmp_path / "out").exists()


def test_duplicates_inside_a_rank_folder_are_caught_whatever_the_slashes(cli, tmp_path):
    archive = _tar(tmp_path / "dup.nemo", [
        ("./model_config.yaml", b"a: 1\n"), ("./mp_rank_00", None), ("./mp_rank_00/model_weights.ckpt", b"first"),
        ("./mp_rank_00//model_weights.ckpt", b"second"), ("./mp_rank_00/./model_weights.ckpt", b"third"),
    ])
    result = cli("unpack", archive, tmp_path / "out")
    assert _one_error_line(result) and "appears twice" in result.err, result


def test_convert_to_hf_refuses_an_hf_config_file_member_that_is_absolute(cli, tmp_path):
    victim = _victim(tmp_path)
    archive = _tar(tmp_path / "evil.nemo", [
        ("./model_config.yaml", f"hf_config_file: nemo:{victim}\n".encode()),
        (f"./{victim}", b'{"pwned": true}'), ("./model_weights.safetensors", _weights()),
    ])
    result = cli("convert", archive, tmp_path / "out" / "hf", "--to", "hf")
    assert _one_error_line(result) and "absolute path" in result.err, result
    assert _untouched(victim) and not (tmp_path / "out" / "hf").exists()


def test_convert_to_hf_refuses_a_folder_artifact_that_is_absolute(cli, tmp_path):
    victim = _victim(tmp_path)
    archive = _tar(tmp_path / "evil.nemo", [
        ("./model_config.yaml", f"hf_extra_files: nemo:{victim.parent}\n".encode()),
        (f"./{victim.parent}", None), (f"./{victim}", b"pwned"), ("./model_weights.safetensors", _weights()),
    ])
    result = cli("convert", archive, tmp_path / "out" / "hf", "--to", "hf")
    assert _one_error_line(result) and "absolute path" in result.err, result
    assert _untouched(victim) and not (tmp_path / "out" / "hf").exists()


def test_convert_to_hf_keeps_a_double_slash_inside_a_folder_artifact_under_the_output(cli, tmp_path):
    victim = _victim(tmp_path)
    artifact = "0" * 32 + "_hf_extra"
    archive = _tar(tmp_path / "evil.nemo", [
        ("./model_config.yaml", f"hf_extra_files: nemo:{artifact}\n".encode()),
        (f"./{artifact}", None), (f"./{artifact}/{victim}", b"pwned"),
        ("./model_weights.safetensors", _weights()),
    ])
    result = cli("convert", archive, tmp_path / "out" / "hf", "--to", "hf")
    assert _untouched(victim)
    assert result.code == 0, result  # extra//ABS is extra/ABS (as tar reads it): a file inside the output
    assert (tmp_path / "out" / "hf" / str(victim).lstrip("/")).read_bytes() == b"pwned"


def test_restore_from_refuses_an_artifact_reference_that_is_absolute(tmp_path):
    victim = _victim(tmp_path)
    archive = _tar(tmp_path / "evil.nemo", [
        ("./model_config.yaml", f"tokenizer:\n  model: nemo:{victim}\n".encode()),
        (f"./{victim}", b"pwned"), ("./model_weights.safetensors", _weights()),
    ])
    for artifacts_dir in (None, tmp_path / "artifacts"):
        with pytest.raises(FormatError, match="absolute path"):
            shardwise.restore_from(archive, artifacts_dir=artifacts_dir)
        assert _untouched(victim)


def test_restore_from_does_not_resolve_a_reference_to_a_file_outside_the_archive(tmp_path):
    victim = _victim(tmp_path)
    archive = _tar(tmp_path / "peek.nemo", [
        ("./model_config.yaml", f"tokenizer:\n  model: nemo:{victim}\n".encode()), ("./model_weights.safetensors", _weights()),
    ])
    with pytest.raises(FormatError, match="absolute path"):
        shardwise.restore_from(archive)


def test_unpack_of_a_root_stored_as_a_file_never_touches_the_output_parent(cli, tmp_path):
    archive = _tar(tmp_path / "root.nemo", [(".", b"not a folder"), ("./model_config.yaml", b"a: 1\n")])
    parent = tmp_path / "parent"
    parent.mkdir()
    before = parent.stat().st_mtime_ns
    result = cli("unpack", archive, parent / "out")
    assert _one_error_line(result) and "archive root" in result.err, result
    assert listing(parent) == [] and parent.stat().st_mtime_ns == before


def _archive_with_artifacts(tmp_path: Path) -> Path:
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("a\nb\n")
    (tmp_path / "merges.txt").write_text("a b\n")
    return shardwise.save_to(dict(sample_state_dict()), tmp_path / "m.nemo", config={"hidden": 16},
                             artifacts={"tokenizer.dir": tokenizer, "tokenizer.merge_file": tmp_path / "merges.txt"})


def test_restore_from_refuses_to_write_through_a_folder_link_planted_in_artifacts_dir(tmp_path):
    archive = _archive_with_artifacts(tmp_path)
    member = shardwise.restore_from(archive).config["tokenizer"]["dir"].rsplit("/", 1)[1]
    outside = tmp_path / "outside"
    outside.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / member).symlink_to(outside, target_is_directory=True)
    with pytest.raises(FormatError, match="link"):
        shardwise.restore_from(archive, artifacts_dir=artifacts)
    assert listing(outside) == []


def test_restore_from_replaces_a_file_link_planted_in_artifacts_dir_instead_of_following_it(tmp_path):
    archive = _archive_with_artifacts(tmp_path)
    member = shardwise.restore_from(archive).config["tokenizer"]["merge_file"].rsplit("/", 1)[1]
    victim = _victim(tmp_path)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / member).symlink_to(victim)
    restored = shardwise.restore_from(archive, artifacts_dir=artifacts)
    assert _untouched(victim)
    assert not (artifacts / member).is_symlink() and (artifacts / member).read_text() == "a b\n"
    restored.close()
