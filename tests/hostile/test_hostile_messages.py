"""Error and warning lines quote names taken from hostile files: they stay one line and never carry
bytes a terminal would act on."""

from __future__ import annotations

import torch


def test_a_global_name_with_control_bytes_is_quoted_escaped_on_one_line(tmp_path, cli):
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    end = data.index(b"_rebuild_tensor_v2") + len(b"_rebuild_tensor_v2")
    data[end] ^= 1  # the newline ending the global's name: the name now runs on over raw pickle bytes
    path.write_bytes(bytes(data))
    result = cli("inspect", path)
    assert result.code == 2 and len(result.err.splitlines()) == 1, result
    assert result.err.endswith("\n") and result.err[:-1].isprintable(), result
    assert "_rebuild_tensor_v2\\x0b" in result.err and str(path) in result.err
