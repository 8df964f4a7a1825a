"""Hostile, truncated and corrupted archives: one clear error line, exit 2, nothing written."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import shardwise

from conftest import listing, sample_state_dict


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"a: 1"[:3]))
        member.size = len(data) if member.type == tarfile.REGTYPE else 0
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


HOSTILE = {
    "absolute path": (_member("/tmp/shardwise-escape"), b"x", "absolute path"),
    "dot-dot": (_member("./../escape.txt"), b"x", "'..'"),
    "nested dot-dot": (_member("./a/../../escape.txt"), b"x", "'..'"),
    "symlink": (_member("./link", tarfile.SYMTYPE, "/etc/passwd"), b"", "symlink"),
    "hard link": (_member("./hard", tarfile.LNKTYPE, "../../etc/passwd"), b"", "hardlink"),
    "character device": (_member("./dev", tarfile.CHRTYPE), b"", "device"),
    "fifo": (_member("./fifo", tarfile.FIFOTYPE), b"", "device, fifo"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_unpack_refuses_hostile_members_and_writes_nothing(cli, tmp_path, case):
    member, data, problem = HOSTILE[case]
    archive = _tar_with(tmp_path / "evil.nemo", member, data)
    before = listing(tmp_path)
    result = cli("unpack", archive, tmp_path / "out")
    assert result.code == 2, result
    assert result.err.startswith("shardwise: error: ") and result.err.count("\n") == 1
    assert str(archive) in result.err and problem in result.err and "nothing was written" in result.err
    assert listing(tmp_path) == before
    assert not Path("/tmp/shardwise-escape").exists()


def _good_archive(tmp_path: Path) -> Path:
    return shardwise.save_to(dict(sample_state_dict()), tmp_path / "good.nemo", config={"hidden": 16})


@pytest.mark.parametrize("inside", ["./model_weights.ckpt", "./shardwise.json"])
def test_truncated_archives_are_named_as_truncated(cli, tmp_path, inside):
    archive = _good_archive(tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember(inside)
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(archive.read_bytes()[: member.offset_data + member.size // 2])
    for command in (("inspect", cut), ("unpack", cut, tmp_path / "out"), ("convert", cut, tmp_path / "o.safetensors")):
        result = cli(*command)
        assert result.code == 2, (command, result)
        assert str(cut) in result.err and "truncated" in result.err, result.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.safetensors").exists()


def test_an_archive_cut_at_a_member_boundary_is_still_caught(cli, tmp_path):
    archive = _good_archive(tmp_path)
    with tarfile.open(archive) as tar:
        manifest = tar.getmember("./shardwise.json")
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(archive.read_bytes()[: manifest.offset])  # the manifest and the end marker are gone
    result = cli("inspect", cut)
    assert result.code == 2 and "end-of-archive marker" in result.err


def test_unpack_checks_checksums_against_the_manifest(cli, tmp_path):
    archive = _good_archive(tmp_path)
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        weights = tar.getmember("./model_weights.ckpt")
    data[weights.offset_data + weights.size // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    result = cli("unpack", archive, tmp_path / "out")
    assert result.code == 2 and "model_weights.ckpt is corrupted" in result.err
    assert not (tmp_path / "out").exists()


def test_a_manifest_that_contradicts_the_members_is_refused(cli, tmp_path):
    archive = _good_archive(tmp_path)
    unpacked = tmp_path / "unpacked"
    assert cli("unpack", archive, unpacked).code == 0
    (unpacked / "model_config.yaml").write_text("hidden: 16\nextra: true\n")
    with tarfile.open(tmp_path / "edited.nemo", "w:") as tar:
        tar.add(unpacked, arcname=".")  # re-tarred by hand: the old manifest no longer fits
    result = cli("inspect", tmp_path / "edited.nemo")
    assert result.code == 2 and "model_config.yaml holds" in result.err and "the manifest says" in result.err


def test_pack_then_unpack_round_trips_a_folder(cli, tmp_path):
    archive = _good_archive(tmp_path)
    assert cli("unpack", archive, tmp_path / "a").code == 0
    assert cli("pack", tmp_path / "a", tmp_path / "again.nemo").code == 0
    assert cli("unpack", tmp_path / "again.nemo", tmp_path / "b").code == 0
    for name in listing(tmp_path / "a"):
        if (tmp_path / "a" / name).is_file() and name != "shardwise.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert cli("diff", archive, tmp_path / "again.nemo").code == 0


def test_unpack_will_not_replace_an_existing_folder_unless_asked(cli, tmp_path):
    archive = _good_archive(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    result = cli("unpack", archive, tmp_path / "out")
    assert result.code == 2 and "exists" in result.err
    assert listing(tmp_path / "out") == ["mine.txt"]
    assert cli("unpack", archive, tmp_path / "out", "--overwrite").code == 0
    assert (tmp_path / "out" / "model_weights.ckpt").is_file() and not (tmp_path / "out" / "mine.txt").exists()


def test_pack_refuses_symlinks(cli, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to("/etc/passwd")
    result = cli("pack", tmp_path / "d", tmp_path / "x.tar")
    assert result.code == 2 and "link" in result.err and not (tmp_path / "x.tar").exists()


def test_converting_to_hf_refuses_artifact_members_that_climb_out_of_the_output(cli, tmp_path):
    artifact = "0" * 32 + "_hf_extra"
    with tarfile.open(tmp_path / "evil.nemo", "w:", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(_member(f"./{artifact}", tarfile.DIRTYPE))
        for name, data in {"./model_config.yaml": f"hf_extra_files: nemo:{artifact}\n".encode(),
                           f"./{artifact}/../../escaped.txt": b"x", "./model_weights.safetensors": None}.items():
            if data is None:
                import torch
                from safetensors.torch import save

                data = save({"w": torch.ones(2)})
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = cli("convert", tmp_path / "evil.nemo", tmp_path / "out" / "hf", "--to", "hf")
    assert result.code == 2 and "'..'" in result.err, result
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "escaped.txt").exists()
    assert not (tmp_path / "out" / "hf").exists()
