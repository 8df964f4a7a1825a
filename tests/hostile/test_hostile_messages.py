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


def test_tensor_names_that_look_like_rich_markup_are_shown_as_they_are(tmp_path, cli):
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"[/bold]": torch.zeros(2), "[red]x": torch.ones(1)}, a)  # an unmatched closing tag once raised MarkupError
    save_file({"[/bold]": torch.ones(2), "[link=file:///etc]y": torch.ones(1)}, b)
    shown = cli("inspect", a)
    assert shown.code == 0 and "[/bold]" in shown.out and "[red]x" in shown.out, shown
    compared = cli("diff", a, b)
    assert compared.code == 1 and "[/bold]" in compared.out and "[link=file:///etc]y" in compared.out, compared
