"""The command line as a user meets it: inspect, convert, diff, exit codes and messages."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import assert_same_tensors, listing, run_subprocess, sample_state_dict


def test_inspect_json_has_the_documented_fields(cli, st_file):
    result = cli("inspect", st_file, "--json")
    assert result.code == 0, result
    info = json.loads(result.out)
    sd = sample_state_dict()
    assert info["format"] == "safetensors"
    assert info["num_tensors"] == len(sd)
    assert info["num_params"] == sum(t.numel() for t in sd.values())
    assert info["total_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert info["dtypes"] == {"bfloat16": 1, "bool": 1, "float16": 1, "float32": 2, "float64": 1, "int64": 1}
    assert {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in info["tensors"]} == {
        name: (tuple(t.shape), str(t.dtype)[6:]) for name, t in sd.items()
    }
    assert info["config"] is None and info["layout"] is None


def test_inspect_table_names_format_and_counts(cli, st_file):
    result = cli("inspect", st_file)
    assert result.code == 0
    assert str(st_file) in "".join(result.out.split())  # shown whole, wrapped rather than cut
    assert "safetensors" in result.out and "embed.weight" in result.out
    assert f"{sum(t.numel() for t in sample_state_dict().values()):,}" in result.out


def test_convert_safetensors_to_torch_and_back_is_bit_exact(cli, st_file, tmp_path):
    pt = tmp_path / "model.pt"
    assert cli("convert", st_file, pt).code == 0
    assert_same_tensors(dict(sample_state_dict()), torch.load(pt, weights_only=True))
    back = tmp_path / "back.safetensors"
    assert cli("convert", pt, back, "--to", "safetensors").code == 0
    assert back.read_bytes() == st_file.read_bytes()  # same tensors, same metadata -> same bytes
    assert cli("diff", st_file, back).code == 0


def test_convert_with_max_shard_size_writes_hf_shards_and_index(cli, st_file, tmp_path):
    out = tmp_path / "sharded"
    result = cli("convert", st_file, out, "--to", "safetensors", "--max-shard-size", "1000B")
    assert result.code == 0, result
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sample_state_dict().values())
    merged = {}
    for shard in shards:
        merged.update(load_file(out / shard))
    assert_same_tensors(dict(sample_state_dict()), merged)
    assert cli("diff", st_file, out).code == 0


def test_sharded_torch_output_has_a_bin_index(cli, st_file, tmp_path):
    out = tmp_path / "bins"
    assert cli("convert", st_file, out, "--to", "torch", "--max-shard-size", "1KB").code == 0
    assert (out / "pytorch_model.bin.index.json").is_file()
    assert cli("diff", st_file, out).code == 0


def test_dtype_cast_changes_only_floating_tensors(cli, st_file, tmp_path):
    out = tmp_path / "bf16.safetensors"
    assert cli("convert", st_file, out, "--dtype", "bf16").code == 0
    got = load_file(out)
    for name, tensor in sample_state_dict().items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name
    assert cli("diff", st_file, out).code == 1
    assert cli("diff", st_file, out, "--atol", "0.05", "--rtol", "0.01").code == 0


def test_diff_reports_missing_extra_and_changed_tensors_as_json(cli, tmp_path):
    from safetensors.torch import save_file

    a = dict(sample_state_dict())
    b = dict(a)
    del b["mask"]
    b["new"] = torch.zeros(1)
    b["embed.weight"] = a["embed.weight"].clone()
    b["embed.weight"][0, 0] += 1.0
    b["layers.0.norm.weight"] = torch.ones(8)
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    result = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    assert report["equal"] is False
    assert report["missing"] == ["mask"] and report["extra"] == ["new"]
    by_name = {m["name"]: m for m in report["mismatches"]}
    assert by_name["embed.weight"]["reason"] == "values"
    assert by_name["embed.weight"]["mismatched_elements"] == 1
    assert abs(by_name["embed.weight"]["max_abs_diff"] - 1.0) < 1e-6
    assert by_name["layers.0.norm.weight"]["reason"] == "shape"
    text = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert text.code == 1 and "DIFFERENT" in text.out and "mask" in text.out


def test_python_dash_m_runs_the_same_cli(st_file):
    result = run_subprocess("inspect", st_file, "--json")
    assert result.code == 0 and json.loads(result.out)["format"] == "safetensors"


def test_version_and_help(cli):
    assert cli("--version").out.startswith("shardwise ")
    help_text = cli("--help")
    assert help_text.code == 0 and all(cmd in help_text.out for cmd in ("inspect", "convert", "diff"))


def test_unknown_option_is_a_usage_error_with_exit_2(cli, st_file):
    assert cli("inspect", st_file, "--no-such-flag").code == 2


def test_convert_leaves_no_staging_files_behind(cli, st_file, tmp_path):
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    assert cli("convert", st_file, out_dir / "a.pt").code == 0
    assert cli("convert", st_file, out_dir / "b", "--to", "hf").code == 0
    assert listing(out_dir) == ["a.pt", "b", "b/model.safetensors"]
