"""No pickle runs code: disallowed globals are refused by name, allowed containers load inertly."""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

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
