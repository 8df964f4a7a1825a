"""HuggingFace folders: weights found as from_pretrained finds them, companion files carried along."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shardwise

from conftest import assert_same_tensors, listing, sample_state_dict


@pytest.fixture
def minilm(minilm_path) -> Path:
    return minilm_path


def test_real_minilm_is_read_as_an_hf_folder(minilm):
    with shardwise.open(minilm) as ckpt:
        assert ckpt.format == "hf" and ckpt.weights_format == "safetensors"
        assert ckpt.config["model_type"] == "bert"
        assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= set(ckpt.tokenizer_files)
        assert "embeddings.word_embeddings.weight" in ckpt.tensors.keys()
        assert ckpt.tensors.info("embeddings.word_embeddings.weight").shape == (30522, 384)


def test_real_minilm_to_hf_folder_carries_config_and_tokenizer_and_is_bit_exact(cli, minilm, tmp_path):
    out = tmp_path / "minilm-hf"
    assert cli("convert", minilm, out, "--to", "hf", "--max-shard-size", "40MB").code == 0
    names = set(listing(out))
    assert {"config.json", "tokenizer.json", "vocab.txt", "modules.json", "model.safetensors.index.json"} <= names
    assert (out / "config.json").read_bytes() == (minilm / "config.json").read_bytes()
    assert cli("diff", minilm, out).code == 0


def test_real_minilm_bf16_copy_is_close_but_not_identical(cli, minilm, tmp_path):
    out = tmp_path / "bf16"
    assert cli("convert", minilm, out, "--to", "hf", "--dtype", "bf16").code == 0
    with shardwise.open(out) as ckpt:
        assert ckpt.tensors.info("embeddings.word_embeddings.weight").dtype == "bfloat16"
        assert ckpt.tensors.info("embeddings.position_ids").dtype == "int64"
    assert cli("diff", minilm, out).code == 1
    assert cli("diff", minilm, out, "--rtol", "0.01", "--atol", "1e-6").code == 0


def test_sharded_torch_folder_with_index_is_read_across_files(tmp_path):
    sd = dict(sample_state_dict())
    folder = tmp_path / "bin-model"
    folder.mkdir()
    names = list(sd)
    torch.save({k: sd[k] for k in names[:3]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in names[3:]}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if i < 3 else 2}-of-00002.bin" for i, k in enumerate(names)}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "toy"}')
    (folder / "training_args.bin").write_bytes(b"not a weight file and never opened")
    with shardwise.open(folder) as ckpt:
        assert ckpt.format == "hf" and ckpt.weights_format == "torch" and len(ckpt.files) == 2
        assert_same_tensors(sd, {n: ckpt.tensors.read(n) for n in ckpt.tensors.keys()})


def test_index_file_itself_can_be_opened(tmp_path, cli):
    folder = tmp_path / "m"
    assert cli("convert", _st(tmp_path), folder, "--to", "hf", "--max-shard-size", "1KB").code == 0
    with shardwise.open(folder / "model.safetensors.index.json") as ckpt:
        assert ckpt.format == "safetensors" and len(ckpt.files) > 1
        assert len(ckpt.tensors.keys()) == len(sample_state_dict())


def _st(tmp_path: Path) -> Path:
    path = tmp_path / "src.safetensors"
    save_file(dict(sample_state_dict()), path)
    return path


def test_folder_of_unindexed_safetensors_shards_is_merged(tmp_path):
    sd = dict(sample_state_dict())
    names = list(sd)
    folder = tmp_path / "shards"
    folder.mkdir()
    save_file({k: sd[k] for k in names[:2]}, folder / "part-a.safetensors")
    save_file({k: sd[k] for k in names[2:]}, folder / "part-b.safetensors")
    with shardwise.open(folder) as ckpt:
        assert ckpt.format == "safetensors" and ckpt.config is None
        assert sorted(ckpt.tensors.keys()) == sorted(names)


def test_same_tensor_in_two_shards_is_a_format_error(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"w": torch.ones(1)}, folder / "a.safetensors")
    save_file({"w": torch.zeros(1)}, folder / "b.safetensors")
    with pytest.raises(shardwise.FormatError, match="also appears"):
        shardwise.open(folder)


def test_hf_output_takes_config_from_option_and_warns_without_one(cli, tmp_path):
    src = _st(tmp_path)
    result = cli("convert", src, tmp_path / "no-config", "--to", "hf")
    assert result.code == 0 and "warning" in result.err and "--config" in result.err
    config = tmp_path / "my-config.json"
    config.write_text('{"model_type": "toy", "hidden_size": 16}')
    assert cli("convert", src, tmp_path / "with-config", "--to", "hf", "--config", config).code == 0
    assert json.loads((tmp_path / "with-config" / "config.json").read_text())["hidden_size"] == 16


def test_a_config_that_is_not_json_is_refused_before_writing(cli, tmp_path):
    src = _st(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text("model_type: toy")
    result = cli("convert", src, tmp_path / "out", "--to", "hf", "--config", bad)
    assert result.code == 2 and str(bad) in result.err and not (tmp_path / "out").exists()
