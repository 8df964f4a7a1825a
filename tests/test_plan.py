"""Conversion plans are pure: which tensor goes to which file, with which dtype, without any I/O."""

from __future__ import annotations

import pytest

from shardwise.dtypes import parse_cast_dtype
from shardwise.errors import OptionError
from shardwise.plan import infer_format, plan_output, split_into_shards
from shardwise.tensors import TensorInfo
from shardwise.units import parse_size


def infos(*sizes: int, dtype: str = "uint8") -> list[TensorInfo]:
    return [TensorInfo(f"t{i}", (n,), dtype) for i, n in enumerate(sizes)]


def test_greedy_split_keeps_order_and_gives_oversized_tensors_their_own_shard():
    shards = split_into_shards(infos(6, 2, 2, 9, 1), 8)
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


def test_no_tensors_still_make_one_empty_shard():
    assert split_into_shards([], 10) == [[]]


def test_single_file_plan_for_plain_formats():
    plan = plan_output(infos(4, 4), to="torch")
    assert not plan.is_dir and [f.relpath for f in plan.files] == [""] and plan.index_name is None


def test_sharded_plan_uses_hf_names_and_an_index():
    plan = plan_output(infos(5, 5, 5), to="safetensors", max_shard_size=10)
    assert [f.relpath for f in plan.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert plan.index_name == "model.safetensors.index.json"
    assert plan.weight_map() == {"t0": plan.files[0].relpath, "t1": plan.files[0].relpath, "t2": plan.files[1].relpath}
    assert plan.total_bytes == 15


def test_one_shard_means_no_index():
    plan = plan_output(infos(5), to="torch", max_shard_size=100)
    assert [f.relpath for f in plan.files] == ["pytorch_model.bin"] and plan.index_name is None


def test_hf_plan_is_a_folder_with_companions_and_5gb_default_shards():
    plan = plan_output(infos(10), to="hf")
    assert plan.is_dir and plan.copy_companions and plan.files[0].relpath == "model.safetensors"


def test_cast_plans_floating_tensors_only():
    tensors = [TensorInfo("w", (2,), "float32"), TensorInfo("ids", (2,), "int64"), TensorInfo("q", (2,), "float8_e4m3fn")]
    plan = plan_output(tensors, to="safetensors", cast=parse_cast_dtype("bf16"))
    casts = {t.out.name: (t.cast, t.out.dtype) for t in plan.files[0].tensors}
    assert casts == {"w": ("bfloat16", "bfloat16"), "ids": (None, "int64"), "q": (None, "float8_e4m3fn")}
    assert plan.total_bytes == 4 + 16 + 2


def test_cast_to_the_same_dtype_is_a_plain_copy():
    plan = plan_output([TensorInfo("w", (2,), "bfloat16")], to="torch", cast=parse_cast_dtype("bfloat16"))
    assert plan.files[0].tensors[0].cast is None


@pytest.mark.parametrize("name, fmt", [("a.safetensors", "safetensors"), ("a.PT", "torch"), ("x/y.bin", "torch"), ("m.pth", "torch")])
def test_format_is_inferred_from_the_suffix(name, fmt):
    assert infer_format(name) == fmt


def test_unknown_suffix_asks_for_to():
    with pytest.raises(OptionError, match="--to"):
        infer_format("model.onnx")


@pytest.mark.parametrize("text, value", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1000", 1000), ("1.5KB", 1500)])
def test_sizes_parse_like_huggingface(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-5GB", "0", "5 parsecs", "GB"])
def test_bad_sizes_are_option_errors(text):
    with pytest.raises(OptionError):
        parse_size(text)
