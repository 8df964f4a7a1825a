"""Hostile JSON and YAML documents: whatever their nesting or aliases, one line naming the file, exit 2.

Every document goes through :mod:`shardwise.jsonfile` (config.json, index files, archive members,
``--config``, model_config.yaml, the safetensors header): these run a few of its callers end to end,
in process (``cli`` returns the exit code and stderr; any exception but the project's would escape).
"""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import pytest

from conftest import run_subprocess, tiny_llama
from shardwise.errors import FormatError
from shardwise import jsonfile

HANG = 60  # seconds, for the one subprocess (the archive conversion)
DEEP = 100_000  # levels: far past Python's recursion limit, a few hundred kilobytes
DEEP_JSON = b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"
DEEP_YAML = b"a: " + b"[" * DEEP + b"]" * DEEP + b"\n"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module")
def archive(hf_folder, tmp_path_factory) -> Path:
    """A .nemo archive converted from the HF folder; its model_config.yaml names its config.json member (hf_config_file)."""
    path = tmp_path_factory.mktemp("archive") / "model.nemo"
    result = run_subprocess("convert", hf_folder, path, "--to", "archive", timeout=HANG)
    assert result.code == 0, result
    return path


def _one_line_exit_2(result, *named: str) -> None:
    assert result.code == 2, result
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, result.err
    for text in named:
        assert text in result.err, result.err


def _copy_folder(folder: Path, tmp_path: Path, name: str, data: bytes) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / name).write_bytes(data)
    return copy


def _rewrite_archive(archive: Path, out: Path, edit) -> Path:
    """``archive`` without its manifest (whose checksums would refuse the edit first), each member's
    bytes replaced by ``edit(name, data)``."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            if member.name.endswith("shardwise.json"):
                continue
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None:
                data = edit(member.name, data)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_deeply_nested_json_file_of_an_hf_folder_is_one_line_exit_2(hf_folder, tmp_path, name, cli):
    folder = _copy_folder(hf_folder, tmp_path, name, DEEP_JSON)
    _one_line_exit_2(cli("inspect", folder), str(folder / name), "nested too deeply")


def test_a_deeply_nested_config_option_is_one_line_exit_2(hf_folder, tmp_path, cli):
    config = tmp_path / "config.json"
    config.write_bytes(DEEP_JSON)
    result = cli("convert", hf_folder / "model.safetensors", tmp_path / "out", "--to", "hf", "--config", config)
    _one_line_exit_2(result, str(config), "nested too deeply")
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_model_config_yaml_in_an_archive_is_one_line_exit_2(archive, tmp_path, cli):
    edited = _rewrite_archive(archive, tmp_path / "deep.nemo", lambda name, data: DEEP_YAML if name.endswith("model_config.yaml") else data)
    _one_line_exit_2(cli("inspect", edited), str(edited), "model_config.yaml", "nested too deeply")


@pytest.mark.parametrize("command", [("reshard", "out.nemo", "--tp", "2", "--pp", "1"), ("convert", "out", "--to", "hf")], ids=["reshard", "to-hf"])
def test_a_non_json_hf_config_member_of_an_archive_is_one_line_exit_2(archive, tmp_path, cli, command):
    edited = _rewrite_archive(archive, tmp_path / "garbage.nemo", lambda name, data: b"\x00not json" if name.endswith("_config.json") else data)
    verb, out, *options = command
    result = cli(verb, edited, tmp_path / out, *options)
    _one_line_exit_2(result, f"{edited}:", "_config.json: the HF config (hf_config_file) is not valid JSON")
    assert not (tmp_path / out).exists()


def test_a_deeply_nested_safetensors_header_is_one_line_exit_2(tmp_path, cli):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(DEEP_JSON)) + DEEP_JSON)
    _one_line_exit_2(cli("inspect", path), str(path), "nested too deeply")


def test_documents_nested_up_to_the_limit_are_read_and_deeper_ones_refused():
    at_limit = b"[" * jsonfile.MAX_NESTING + b"]" * jsonfile.MAX_NESTING
    assert jsonfile.parse_json(at_limit, "x.json", "config") is not None
    assert jsonfile.parse_yaml(at_limit, "x.yaml", "config") is not None
    with pytest.raises(FormatError, match="x.json: config is nested too deeply"):
        jsonfile.parse_json(b"[" + at_limit + b"]", "x.json", "config")
    with pytest.raises(FormatError, match="x.yaml: config is nested too deeply"):
        jsonfile.parse_yaml(b"[" + at_limit + b"]", "x.yaml", "config")


def test_brackets_and_escaped_quotes_inside_json_strings_do_not_count_as_nesting():
    text = '{"a": "' + "[{" * 1000 + '\\"' + "[" * 1000 + '\\\\", "b": ["]]]", "\\\\"]}'
    assert jsonfile.parse_json(text.encode(), "x.json", "config")["b"] == ["]]]", "\\"]


def test_yaml_aliases_that_expand_past_the_limit_or_contain_themselves_are_refused():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
    )  # ten values, each level ten times the last: 10**9 once expanded, in a few hundred bytes
    with pytest.raises(FormatError, match="x.yaml: config expands .* to more than"):
        jsonfile.parse_yaml(laughs, "x.yaml", "config")
    with pytest.raises(FormatError, match="alias \\*a refers to a collection that contains it"):
        jsonfile.parse_yaml("a: &a [1, *a]", "x.yaml", "config")
    assert jsonfile.parse_yaml("a: &a {b: 1}\nc: *a\nd:\n  <<: *a\n  e: 2\n", "x.yaml", "config") == {"a": {"b": 1}, "c": {"b": 1}, "d": {"b": 1, "e": 2}}
