"""Hostile training checkpoints: pickles that torch's own loader accepts or hangs on, damaged
manifests in old tags, and ZeRO-1 files whose declared sizes the stored bytes cannot justify."""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.errors import FormatError, ShardwiseError, UnsafeCheckpointError
from shardwise.formats.torch_pickle import write_torch_archive

MANIFEST = "shardwise.json"


class _Rot13:
    """Pickles as ``_codecs.encode("hi", "rot13")``: torch's weights_only loader runs any codec, shardwise's allow-list does not."""

    def __reduce__(self):
        return codecs.encode, ("hi", "rot13")


def _relist(tag: Path, name: str) -> None:
    """Make the manifest of ``tag`` list ``name`` with its current size and CRC-32 (as if saved so)."""
    data = (tag / name).read_bytes()
    manifest = json.loads((tag / MANIFEST).read_text())
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry.update(size=len(data), crc32=f"{zlib.crc32(data):08x}")
    (tag / MANIFEST).write_text(json.dumps(manifest))


def _torch_file(data_pkl: bytes) -> bytes:
    """A torch zip file holding ``data_pkl`` and no tensors."""
    buf = io.BytesIO()
    write_torch_archive(buf, "user_content", data_pkl, [])
    return buf.getvalue()


def _dag_key_pickle(depth: int = 80) -> bytes:
    """A dict whose key is ``t = (t, t)`` nested ``depth`` times by DUP: 2**depth steps to hash, 170 bytes."""
    body = pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + (pickle.DUP + pickle.TUPLE2) * depth + pickle.BININT1 + b"\x01" + pickle.SETITEM
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def test_user_content_that_torch_would_load_but_the_allow_list_refuses_is_refused(tmp_path):
    shardwise.save_checkpoint(tmp_path, "t", user_content={"note": _Rot13()})
    assert torch.load(tmp_path / "t" / "user_content.pt", weights_only=True) == {"note": "uv"}  # torch's verdict
    with pytest.raises((FormatError, UnsafeCheckpointError), match="user_content.pt") as caught:
        shardwise.load_checkpoint(tmp_path)
    assert "\n" not in str(caught.value)


def test_user_content_with_two_pickles_in_its_zip_is_refused(tmp_path):
    shardwise.save_checkpoint(tmp_path, "t", user_content={"step": 1})
    path = tmp_path / "t" / "user_content.pt"
    with zipfile.ZipFile(path) as z:
        members = [(info.filename, z.read(info)) for info in z.infolist()]
    other = io.BytesIO()
    torch.save({"step": 2}, other)
    with zipfile.ZipFile(other) as z:
        second = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")  # the duplicate name is the point
        for name, data in members + [(next(n for n, _ in members if n.endswith("data.pkl")), second)]:
            z.writestr(name, data)
    _relist(tmp_path / "t", "user_content.pt")
    with pytest.raises(FormatError, match="user_content.pt.*not exactly one data.pkl"):
        shardwise.load_checkpoint(tmp_path)


def test_user_content_with_a_self_sharing_tuple_key_is_refused_without_hanging(tmp_path):
    """Needs the restricted reader to refuse DAG-shaped structures (issue 17's pickle part)."""
    shardwise.save_checkpoint(tmp_path, "t", user_content={"step": 1})
    (tmp_path / "t" / "user_content.pt").write_bytes(_torch_file(_dag_key_pickle()))
    _relist(tmp_path / "t", "user_content.pt")
    script = textwrap.dedent(f"""
        import shardwise
        from shardwise.errors import ShardwiseError
        try:
            shardwise.load_checkpoint({str(tmp_path)!r})
        except ShardwiseError as e:
            print("refused:", e)
        else:
            print("loaded")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("load_checkpoint of a user_content.pt with a self-sharing tuple key did not finish in 20 s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "user_content.pt" in done.stdout


def _flip_a_bit_in_a_key(text: str) -> str:
    at = text.index('"size"') + 1
    return text[:at] + chr(ord(text[at]) ^ 1) + text[at + 1:]  # "size" -> "rize"


def _edit(change):
    """A manifest damage: ``change(document)`` on the parsed manifest, written back as JSON."""
    def damage(text: str) -> str:
        document = json.loads(text)
        change(document)
        return json.dumps(document)
    return damage


_DAMAGE = {
    "a flipped bit in a key": _flip_a_bit_in_a_key,
    "truncated": lambda text: text[: len(text) // 2],
    "a list instead of an object": lambda text: "[]",
    "a file entry without its size": _edit(lambda d: d["files"][0].pop("size")),
    "a size as text": _edit(lambda d: d["files"][0].update(size="12")),
    "files as an object": _edit(lambda d: d.update(files={})),
    "a layout without tp": _edit(lambda d: d["layout"].pop("tp")),
    "a layout of the wrong type": _edit(lambda d: d.update(layout=[1, 2])),
    "an unknown encoding": _edit(lambda d: d.update(encoding="zz")),
    "a sequence as text": _edit(lambda d: d.update(sequence="2")),
    "a file named outside the tag": _edit(lambda d: d["files"][0].update(name="../../../../etc/passwd")),
    "deep nesting": lambda text: "[" * 100_000 + "]" * 100_000,
}


def _three_tags(root: Path) -> None:
    model = torch.nn.Linear(4, 2)
    for step in (1, 2, 3):
        shardwise.save_checkpoint(root, f"step_{step}", model=model, user_content={"step": step})


@pytest.mark.parametrize("damage", list(_DAMAGE), ids=list(_DAMAGE))
@pytest.mark.parametrize("which, expected", [("step_1", 3), ("step_3", 2)], ids=["old tag", "newest tag"])
def test_a_damaged_manifest_skips_its_tag_with_a_warning_and_never_stops_loading_or_saving(tmp_path, damage, which, expected):
    _three_tags(tmp_path)
    manifest = tmp_path / which / MANIFEST
    manifest.write_text(_DAMAGE[damage](manifest.read_text()))

    with pytest.warns(UserWarning, match=f"{which}/{MANIFEST}: skipped, the manifest is damaged"):
        assert shardwise.load_checkpoint(tmp_path, model=torch.nn.Linear(4, 2)) == {"step": expected}
    with pytest.raises(ShardwiseError, match=f"{which}/{MANIFEST}: checkpoint is damaged"):
        shardwise.load_checkpoint(tmp_path, which)

    shardwise.save_checkpoint(tmp_path, "step_4", model=torch.nn.Linear(4, 2), user_content={"step": 4}, num_kept_ckpts=1)
    with pytest.warns(UserWarning, match=which):
        assert shardwise.load_checkpoint(tmp_path) == {"step": 4}
    assert manifest.is_file()  # what cannot be read is not deleted by retention either


def test_a_save_without_a_tag_name_never_takes_the_name_of_a_damaged_tag(tmp_path):
    for step in (1, 2):
        shardwise.save_checkpoint(tmp_path, user_content={"step": step})
    damaged = tmp_path / "checkpoint_2" / MANIFEST
    damaged.write_text(_flip_a_bit_in_a_key(damaged.read_text()))
    text = damaged.read_text()

    assert shardwise.save_checkpoint(tmp_path, user_content={"step": 3}) == "checkpoint_3"
    assert damaged.read_text() == text
    with pytest.warns(UserWarning, match="checkpoint_2"):
        assert shardwise.load_checkpoint(tmp_path) == {"step": 3}


def _zero_tag(tag: Path, state: dict, files: list[dict] | None = None) -> Path:
    """A checkpoint tag holding one merged ZeRO-1 optimizer file; a manifest listing ``files`` when given."""
    (tag / "optim").mkdir(parents=True)
    (tag / "checkpoint").write_text("1")
    torch.save(state, tag / "optim" / "full_tp_rank_00_pp_rank_00.pt")
    if files is not None:
        layout = {"tp": 1, "pp": 1, "dp": 2, "optimizer": "zero1-full"}
        document = {"format": "shardwise-training-checkpoint", "version": 1, "tag": tag.name, "sequence": 1, "layout": layout, "files": files}
        (tag / MANIFEST).write_text(json.dumps(document))
    return tag


def _zero1(base_state: dict, rows: int) -> dict:
    return {"state": {}, "param_groups": [], "base_state": base_state, "shape_info": {k: torch.Size([rows]) for k in base_state}}


_REPEATING = {  # a few KB on disk each
    "a stride-0 view of 64 MiB": lambda: _zero1({0: {"exp_avg": torch.zeros(1).expand(2**24)}}, 2**24),
    "a stride-0 view of 4 PiB": lambda: _zero1({0: {"exp_avg": torch.zeros(1).expand(2**50)}}, 2**50),
    "one tensor under 64 parameters": lambda: (lambda t: _zero1({k: {"exp_avg": t} for k in range(64)}, 1024))(torch.zeros(1024)),
}


@pytest.mark.parametrize("build", list(_REPEATING), ids=list(_REPEATING))
def test_zero_convert_refuses_states_that_declare_more_bytes_than_the_file_stores(tmp_path, cli, build):
    src = _zero_tag(tmp_path / "in", _REPEATING[build]())
    assert (src / "optim" / "full_tp_rank_00_pp_rank_00.pt").stat().st_size < 8192
    result = cli("zero-convert", src, tmp_path / "out", "--to-sharded", "--dp", "2")
    assert result.code == 2, result
    assert result.err.count("\n") == 1 and "full_tp_rank_00_pp_rank_00.pt" in result.err and "declare" in result.err, result.err
    assert not (tmp_path / "out").exists()


def test_loading_a_zero1_checkpoint_at_another_dp_size_refuses_repeating_views_too(tmp_path):
    tag = tmp_path / "t"
    shardwise.save_checkpoint(tmp_path, "t", user_content={"step": 1})
    _zero_tag(tmp_path / "scratch", _REPEATING["a stride-0 view of 4 PiB"]())
    (tag / "optim").mkdir()
    (tmp_path / "scratch" / "optim" / "full_tp_rank_00_pp_rank_00.pt").rename(tag / "optim" / "full_tp_rank_00_pp_rank_00.pt")
    manifest = json.loads((tag / MANIFEST).read_text())
    manifest["layout"]["optimizer"] = "zero1-full"
    manifest["files"].append({"name": "optim/full_tp_rank_00_pp_rank_00.pt", "size": 0, "crc32": "0"})
    (tag / MANIFEST).write_text(json.dumps(manifest))
    _relist(tag, "optim/full_tp_rank_00_pp_rank_00.pt")
    with pytest.raises(FormatError, match="declare"):
        shardwise.load_checkpoint(tmp_path, optimizer={})


def _outside(kind: str, tag: Path, secret: Path) -> str:
    """A manifest name for ``secret`` (outside ``tag``): absolute, through '..', or a symbolic link inside the tag."""
    if kind == "absolute":
        return str(secret)
    if kind == "dot-dot":
        return os.path.relpath(secret, tag)
    (tag / "model").mkdir(exist_ok=True)
    (tag / "model" / "link.pt").symlink_to(secret)
    return "model/link.pt"


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "symlink"])
def test_zero_convert_never_reads_a_file_its_manifest_names_outside_the_tag(tmp_path, monkeypatch, kind):
    from shardwise.training import zero_convert as module

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    src = tmp_path / "in"
    src.mkdir()
    name = _outside(kind, src, secret)
    entry = {"name": name, "size": secret.stat().st_size, "crc32": f"{zlib.crc32(secret.read_bytes()):08x}"}
    _zero_tag(src, _zero1({0: {"exp_avg": torch.zeros(4)}}, 4), files=[entry])
    read = []
    checked = module.check_file
    monkeypatch.setattr(module, "check_file", lambda path, *args, **kw: (read.append(Path(path).resolve()), checked(path, *args, **kw))[1])

    with pytest.raises(ShardwiseError, match="inside"):
        module.zero_convert(src, tmp_path / "out", to_full=False, dp=2)
    assert secret.resolve() not in read
    assert not (tmp_path / "out").exists()


def test_zero_convert_of_a_tag_with_a_deeply_nested_manifest_is_one_line_exit_2(tmp_path, cli):
    src = _zero_tag(tmp_path / "in", _zero1({0: {"exp_avg": torch.zeros(4)}}, 4))
    (src / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    result = cli("zero-convert", src, tmp_path / "out", "--to-full")
    assert result.code == 2 and result.err.count("\n") == 1 and MANIFEST in result.err, result
    assert not (tmp_path / "out").exists()
