"""Shared helpers: tiny checkpoints built in tmp folders, and the CLI run in-process or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from shardwise.cli import run


def sample_state_dict(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """A small mixed-dtype state dict, shaped like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("embed.weight", torch.randn(32, 16, generator=g)),
            ("layers.0.attn.qkv.weight", torch.randn(48, 16, generator=g).to(torch.bfloat16)),
            ("layers.0.attn.qkv.bias", torch.randn(48, generator=g).half()),
            ("layers.0.norm.weight", torch.ones(16)),
            ("position_ids", torch.arange(32).unsqueeze(0)),
            ("mask", torch.rand(4, 4, generator=g) > 0.5),
            ("scale", torch.tensor(0.125, dtype=torch.float64)),
        ]
    )


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes, for bit-exact comparison of any dtype."""
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert tuple(a[name].shape) == tuple(b[name].shape), name
        assert raw_bytes(a[name]) == raw_bytes(b[name]), name


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[:300]!r}, err={self.err[:300]!r})"


@pytest.fixture
def cli(capsys):
    """Run ``shardwise ARGS...`` in this process; returns exit code, stdout and stderr."""

    def invoke(*args: str | os.PathLike) -> CliResult:
        capsys.readouterr()
        code = run([os.fspath(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


def run_subprocess(*args: str | os.PathLike, **kwargs) -> CliResult:
    """Run ``python -m shardwise ARGS...`` as a user would; returns exit code, stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "shardwise", *map(os.fspath, args)], capture_output=True, text=True, timeout=300, **kwargs
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    """A small safetensors file written by the safetensors library."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(dict(sample_state_dict()), path, metadata={"format": "pt"})
    return path


def listing(folder: Path) -> list[str]:
    """Every entry under ``folder`` (hidden ones included), for no-partial-output checks."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
