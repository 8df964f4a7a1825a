"""Writes that meet a full disk or a file-size limit name the output; huge safetensors headers open in linear time."""

from __future__ import annotations

import gc
import json
import resource
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_subprocess
from shardwise.formats.safetensors import SafetensorsFile

LIMIT = 64 * 1024  # bytes any file of the writing process may reach; the model is 256 KiB


def _file_size_limited() -> None:
    """In the child: writes past LIMIT fail with EFBIG (as a full disk fails with ENOSPC) instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.parametrize("to, name", [("safetensors", "out.safetensors"), ("hf", "out"), ("archive", "out.nemo")])
def test_a_write_past_the_file_size_limit_is_one_line_naming_the_output(tmp_path, to, name):
    source = tmp_path / "in.safetensors"
    save_file({"w": torch.zeros(256, 256)}, str(source))
    out = tmp_path / name
    result = run_subprocess("convert", source, out, "--to", to, preexec_fn=_file_size_limited, timeout=120)
    assert result.code == 2, result
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, result.err
    assert f"{out}: File too large" in result.err, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]  # no output, no staging leftovers


def test_opening_a_header_of_many_tensors_runs_no_garbage_collection(tmp_path):
    """A million-entry header took minutes, much of it the cyclic collector re-walking the millions of
    objects the header becomes (none of them in a cycle) hundreds of times over; the count of passes
    is what is checked here."""
    count = 20_000
    header = {f"t.{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(count)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(count))
    passes = []
    collect = lambda phase, info: passes.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.collect()  # from a count of zero: the few objects made before the header is parsed start no pass
    gc.callbacks.append(collect)
    try:
        opened = SafetensorsFile(path)
    finally:
        gc.callbacks.remove(collect)
    with opened:
        assert len(opened.keys()) == count and opened.info("t.7").shape == (1,)
    assert len(passes) <= 1, passes  # at most the one pass when collection resumes, over what was made once
