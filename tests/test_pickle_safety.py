"""No pickle runs code: disallowed globals are refused by name, allowed containers load inertly."""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import shardwise

from shardwise.errors import UnsafeCheckpointError
from shardwise.formats.torch_pickle import TorchFile

from conftest import run_subprocess


class _RunsCommand:
    """Pickles to os.system(<command>) - what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    payload = {"weight": torch.ones(2), "hook": _RunsCommand(f"touch {marker}")}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_naming_the_global_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker, legacy)
    with pytest.raises(UnsafeCheckpointError) as err:
        TorchFile(path)
    message = str(err.value)
    assert str(path) in message and "posix.system" in message and "--trust-pickle" in message
    assert not marker.exists()


def test_cli_refuses_malicious_pickle_with_exit_2_and_one_line(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.bin", marker)
    result = run_subprocess("inspect", path)
    assert result.code == 2
    assert result.err.count("\n") == 1 and result.err.startswith("shardwise: error: ")
    assert "posix.system" in result.err and "Traceback" not in result.err
    assert not marker.exists()


def test_builtins_that_could_run_code_are_not_allowed(tmp_path):
    for module, name in [("builtins", "eval"), ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen")]:
        data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."
        archive = tmp_path / f"{name}.pt"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("archive/data.pkl", data)
        with pytest.raises(UnsafeCheckpointError, match=f"'{module}.{name}'"):
            TorchFile(archive)


def test_trust_pickle_resolves_other_globals(tmp_path):
    path = tmp_path / "counter.pt"
    from collections import Counter

    torch.save({"state_dict": {"w": torch.ones(3)}, "counts": Counter(a=2)}, path)
    with pytest.raises(UnsafeCheckpointError, match="collections.Counter"):
        TorchFile(path)
    with TorchFile(path, trust=True) as src:
        assert src.keys() == ["w"]
        assert torch.equal(src.read("w"), torch.ones(3))


def test_namespace_paths_numpy_scalars_and_omegaconf_load_as_plain_data(tmp_path):
    import numpy as np
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"hidden": 64, "layers": [1, 2], "name": "tiny"}, "lr": 1e-3})
    ckpt = {
        "state_dict": {"layer.weight": torch.ones(2, 2)},
        "hyper_parameters": {"cfg": cfg, "args": argparse.Namespace(seed=3, out=Path("/tmp/x"))},
        "best_score": np.float64(0.25),
        "pytorch-lightning_version": "2.4.0",
        "epoch": 1,
        "global_step": 10,
    }
    path = tmp_path / "rich.ckpt"
    torch.save(ckpt, path)
    with TorchFile(path) as src:
        assert src.format_name == "lightning"
        hp = src.training_state["hyper_parameters"]
        assert hp["cfg"] == {"model": {"hidden": 64, "layers": [1, 2], "name": "tiny"}, "lr": 1e-3}
        assert hp["args"] == {"seed": 3, "out": "/tmp/x"}
        assert src.training_state["best_score"] == 0.25


def test_protocol_2_bytes_values_load(tmp_path):
    path = tmp_path / "bytes.pt"
    torch.save({"w": torch.ones(1), "blob": b"\x00\x01binary"}, path, pickle_protocol=2)
    with TorchFile(path) as src:
        assert src.keys() == ["w"]


def test_refusal_happens_before_any_tensor_data_is_read(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    reads = []
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(a) or 0)
    with pytest.raises(UnsafeCheckpointError):
        TorchFile(path)
    assert reads == []


def test_pickle_module_is_never_used_to_load(tmp_path, monkeypatch):
    # shardwise's reader must not fall back to pickle.load / torch.load on untrusted input
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load used"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    with TorchFile(path) as src:
        assert torch.equal(src.read("w"), torch.ones(2))


# -- hostile pickles found in review: each must fail cleanly, and none may affect a later load ----
def _zip_with_pickle(path: Path, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
    return path


def test_a_pickle_cannot_modify_the_allow_list_for_later_loads(tmp_path):
    # BUILD {'dtype': 'int32'} on torch.FloatStorage, then on torch.float32: used to poison later reads
    evil = (
        b"\x80\x02ctorch\nFloatStorage\n}U\x05dtypeU\x05int32sb0"
        b"ctorch\nfloat32\n}U\x04nameU\x05int64sb0N."
    )
    with pytest.raises(shardwise.FormatError):
        TorchFile(_zip_with_pickle(tmp_path / "evil.pt", evil))
    good = tmp_path / "good.pt"
    torch.save({"w": torch.tensor([1.5, 2.5])}, good)
    with TorchFile(good) as src:
        assert src.info("w").dtype == "float32"
        assert torch.equal(src.read("w"), torch.tensor([1.5, 2.5]))


@pytest.mark.parametrize(
    "name, data",
    [
        ("bytes of a size", b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R."),
        ("bytearray of a size", b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R."),
        ("str of a structure", b"\x80\x02c__builtin__\nstr\n]\x85R."),
    ],
)
def test_constructors_cannot_be_used_to_allocate_or_expand(tmp_path, name, data):
    with pytest.raises(shardwise.FormatError, match="only allowed on"):
        TorchFile(_zip_with_pickle(tmp_path / "x.pt", data))


def test_reference_cycles_and_billion_laughs_are_format_errors(cli, tmp_path):
    cycle = _zip_with_pickle(tmp_path / "cycle.pt", b"\x80\x02]q\x00h\x00a.")
    laughs = bytearray(b"\x80\x02Nr\x00\x00\x00\x000")
    for i in range(1, 61):
        prev = (i - 1).to_bytes(4, "little")
        laughs += b"j" + prev + b"j" + prev + b"\x86r" + i.to_bytes(4, "little") + (b"0" if i < 60 else b"")
    bomb = _zip_with_pickle(tmp_path / "laughs.pt", bytes(laughs) + b".")
    for path, problem in [(cycle, "reference cycle"), (bomb, "nodes")]:
        result = cli("inspect", path)
        assert result.code == 2 and problem in result.err and result.err.count("\n") == 1


def _view_pickle(offset: bytes, shape: bytes, stride: bytes) -> bytes:
    return (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
        b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ" + offset + shape + stride
        + b"\x89ccollections\nOrderedDict\n)RtRs."
    )


@pytest.mark.parametrize(
    "case, offset, shape, stride, problem",
    [
        ("negative offset", b"J\xff\xff\xff\xff", b"K\x04\x85", b"K\x01\x85", "invalid tensor view"),
        ("negative stride", b"K\x00", b"K\x04\x85", b"J\xff\xff\xff\xff\x85", "invalid tensor view"),
        ("negative shape", b"K\x00", b"J\xff\xff\xff\xff\x85", b"K\x01\x85", "invalid tensor view"),
        ("float shape", b"K\x00", b"G@\x10\x00\x00\x00\x00\x00\x00\x85", b"K\x01\x85", "invalid tensor view"),
        ("rank mismatch", b"K\x00", b"K\x02K\x02\x86", b"K\x01\x85", "invalid tensor view"),
        ("past the storage", b"K\x02", b"K\x04\x85", b"K\x01\x85", "needs"),
        ("zero-stride blow-up", b"K\x00", b"J\x00\x00\x00\x40J\x00\x00\x00\x40\x86", b"K\x00K\x00\x86", "expands"),
    ],
)
def test_tensor_views_are_validated(tmp_path, case, offset, shape, stride, problem):
    path = tmp_path / "view.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _view_pickle(offset, shape, stride))
        z.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(shardwise.FormatError, match=problem):
        TorchFile(path)


def test_the_view_pickle_builder_makes_a_valid_file(tmp_path):
    path = tmp_path / "view.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _view_pickle(b"K\x01", b"K\x03\x85", b"K\x01\x85"))
        z.writestr("archive/data/0", torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy().tobytes())
    assert torch.equal(TorchFile(path).read("w"), torch.tensor([2.0, 3.0, 4.0]))


@pytest.mark.parametrize("protocol", [1, 2, 4, 5])
def test_legacy_files_of_every_pickle_protocol_are_recognised(cli, tmp_path, protocol):
    path = tmp_path / f"p{protocol}.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result
