"""Every bad input: exit 2, one line on stderr naming the file and the problem, nothing left behind."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from conftest import listing, run_subprocess, sample_state_dict


def _empty(tmp: Path) -> Path:
    p = tmp / "empty.safetensors"
    p.write_bytes(b"")
    return p


def _truncated_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save

    p = tmp / "cut.safetensors"
    p.write_bytes(save(dict(sample_state_dict()))[:-17])
    return p


def _corrupted_header(tmp: Path) -> Path:
    p = tmp / "corrupt.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    return p


def _folder_without_weights(tmp: Path) -> Path:
    p = tmp / "just-config"
    p.mkdir()
    (p / "config.json").write_text("{}")
    return p


def _unknown_format(tmp: Path) -> Path:
    p = tmp / "notes.txt"
    p.write_text("these are not weights\n" * 10)
    return p


def _truncated_torch(tmp: Path) -> Path:
    full = tmp / "full.pt"
    torch.save(dict(sample_state_dict()), full)
    p = tmp / "cut.pt"
    p.write_bytes(full.read_bytes()[:300])
    return p


def _missing(tmp: Path) -> Path:
    return tmp / "does-not-exist.safetensors"


def _nemo_archive(tmp: Path) -> Path:
    import tarfile

    p = tmp / "model.nemo"
    with tarfile.open(p, "w") as tar:
        cfg = tmp / "model_config.yaml"
        cfg.write_text("a: 1\n")
        tar.add(cfg, arcname="./model_config.yaml")
    return p


def _index_with_missing_shard(tmp: Path) -> Path:
    p = tmp / "broken-index"
    p.mkdir()
    (p / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001-of-00002.safetensors"}}')
    return p


def _index_escaping_folder(tmp: Path) -> Path:
    p = tmp / "evil-index"
    p.mkdir()
    (p / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../../etc/passwd"}}')
    return p


BAD_INPUTS = {
    "empty file": (_empty, "file is empty"),
    "truncated safetensors": (_truncated_safetensors, "truncated"),
    "corrupted header": (_corrupted_header, "not valid JSON"),
    "folder without weights": (_folder_without_weights, "holds no weights"),
    "unknown format": (_unknown_format, "unknown format"),
    "truncated torch file": (_truncated_torch, "truncated or corrupted"),
    "missing path": (_missing, "no such file or folder"),
    "archive without weights": (_nemo_archive, "no model weights in the archive"),
    "index naming a missing shard": (_index_with_missing_shard, "missing"),
    "index escaping its folder": (_index_escaping_folder, "not a plain file name"),
}


def _assert_one_clear_line(result, path: Path, problem: str) -> None:
    assert result.code == 2, result
    assert result.err.startswith("shardwise: error: ") and result.err.count("\n") == 1, result.err
    assert str(path) in result.err and problem in result.err, result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_to_inspect(cli, tmp_path, case):
    make, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    _assert_one_clear_line(cli("inspect", path), path, problem)


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_to_convert_leaves_no_output(cli, tmp_path, case):
    make, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_one_clear_line(cli("convert", path, out_dir / "model.pt"), path, problem)
    _assert_one_clear_line(cli("convert", path, out_dir / "hf", "--to", "hf"), path, problem)
    assert listing(out_dir) == []


def test_bad_input_to_diff_is_exit_2_not_1(cli, tmp_path, st_file):
    path = _truncated_safetensors(tmp_path)
    _assert_one_clear_line(cli("diff", st_file, path), path, "truncated")


def test_existing_output_is_refused_and_left_untouched(cli, st_file, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"precious")
    result = cli("convert", st_file, out)
    _assert_one_clear_line(result, out, "already exists")
    assert "--overwrite" in result.err
    assert out.read_bytes() == b"precious"
    assert listing(tmp_path) == ["model.pt", "model.safetensors"]


def test_existing_output_folder_is_refused_and_left_untouched(cli, st_file, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_one_clear_line(cli("convert", st_file, out, "--to", "hf"), out, "already exists")
    assert listing(out) == ["keep.txt"]


def test_overwrite_replaces_a_file_and_a_folder(cli, st_file, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"old")
    assert cli("convert", st_file, out, "--overwrite").code == 0
    assert torch.load(out, weights_only=True).keys() == sample_state_dict().keys()
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "stale.bin").write_bytes(b"old")
    assert cli("convert", st_file, folder, "--to", "hf", "--overwrite").code == 0
    assert listing(folder) == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if "shardwise-tmp" in p.name]


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--dtype", "int3"], "--dtype 'int3'"),
        (["--max-shard-size", "lots"], "size 'lots'"),
        (["--to", "onnx"], "--to 'onnx'"),
    ],
)
def test_bad_option_values_are_one_line_errors(cli, st_file, tmp_path, args, problem):
    result = cli("convert", st_file, tmp_path / "x.pt", *args)
    assert result.code == 2 and problem in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_output_format_that_cannot_be_inferred_asks_for_to(cli, st_file, tmp_path):
    result = cli("convert", st_file, tmp_path / "weights.xyz")
    assert result.code == 2 and "--to" in result.err


def test_failure_mid_write_leaves_nothing_behind(cli, st_file, tmp_path, monkeypatch):
    from shardwise import engine

    calls = []

    def explode(self, planned, sink):
        calls.append(planned.out.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(tmp_path / "out.pt"))
        return original(self, planned, sink)

    original = engine.TensorStreamer.write
    monkeypatch.setattr(engine.TensorStreamer, "write", explode)
    result = cli("convert", st_file, tmp_path / "out.pt")
    assert result.code == 2 and "No space left on device" in result.err
    assert listing(tmp_path) == ["model.safetensors"]


def test_errors_from_a_real_subprocess_have_no_traceback(tmp_path):
    path = _truncated_torch(tmp_path)
    result = run_subprocess("convert", path, tmp_path / "o.safetensors")
    _assert_one_clear_line(result, path, "truncated")


@pytest.mark.parametrize(
    "sd, problem",
    [({"__metadata__": torch.ones(1)}, "reserves that key"), ({"z": torch.zeros(2, dtype=torch.complex128)}, "complex128")],
)
def test_tensors_safetensors_cannot_hold_are_refused_naming_output_and_tensor(cli, tmp_path, sd, problem):
    src = tmp_path / "src.pt"
    torch.save(sd, src)
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, out)
    _assert_one_clear_line(result, out, problem)
    assert listing(tmp_path) == ["src.pt"]
