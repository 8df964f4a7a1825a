"""--to hf writes what transformers' save_pretrained writes, and from_pretrained loads it as the same model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import transformers

from shardwise.formats.hf_conventions import aliased_duplicates, config_for_dtype, derived_generation_config
from shardwise.tensors import StoredTensor, TensorInfo

from conftest import assert_same_tensors, tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models as save_pretrained writes them: Llama tied and untied, and a BERT encoder."""
    root = tmp_path_factory.mktemp("save-pretrained")
    torch.manual_seed(3)
    bert = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(bert).save_pretrained(root / "bert")
    return {"tied": tiny_llama(root / "tied", tied=True), "untied": tiny_llama(root / "untied", seed=1), "bert": root / "bert"}


def _load(folder: Path, cls=transformers.AutoModelForCausalLM, **kwargs):
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def _same_model(a, b) -> None:
    assert_same_tensors(a.state_dict(), b.state_dict())


def _safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)).get("__metadata__")


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_weights_file_and_config_become_the_folder_save_pretrained_writes(cli, saved, tmp_path, kind):
    src = saved[kind]
    out = tmp_path / "out"
    result = cli("convert", src / "model.safetensors", out, "--to", "hf", "--config", src / "config.json")
    assert result.code == 0, result
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert _safetensors_metadata(out / "model.safetensors") == {"format": "pt"}
    ours = transformers.GenerationConfig.from_pretrained(out).to_dict()
    theirs = transformers.GenerationConfig.from_pretrained(src).to_dict()
    assert {k: v for k, v in ours.items() if k != "transformers_version"} == {k: v for k, v in theirs.items() if k != "transformers_version"}
    model = _load(out)
    _same_model(model, _load(src))
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == (kind == "tied")


def test_sharded_output_is_named_and_indexed_as_save_pretrained_does_and_loads(cli, saved, tmp_path):
    src = saved["untied"]
    out = tmp_path / "sharded"
    assert cli("convert", src, out, "--to", "hf", "--max-shard-size", "10KB").code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    assert all(_safetensors_metadata(out / s) == {"format": "pt"} for s in shards)
    reference = tmp_path / "reference"
    model = _load(src)
    model.save_pretrained(reference, max_shard_size="10KB")
    theirs = json.loads((reference / "model.safetensors.index.json").read_text())
    assert index["metadata"] == theirs["metadata"]  # total_size and total_parameters
    assert set(index["weight_map"]) == set(theirs["weight_map"])
    _same_model(_load(out), model)


def test_hf_output_fits_in_one_file_up_to_50gb_by_default():
    from shardwise.plan import plan_output

    infos = [TensorInfo(f"w{i}", (10**9,), "float32") for i in range(3)]  # 12 GB: save_pretrained 5 writes one file
    assert [f.relpath for f in plan_output(infos, to="hf").files] == ["model.safetensors"]


def test_tied_duplicate_from_a_torch_state_dict_is_written_once_and_tied_again(cli, saved, tmp_path):
    src = saved["tied"]
    model = _load(src)
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)  # lm_head.weight and the embedding share one storage
    out = tmp_path / "out"
    result = cli("convert", state, out, "--to", "hf", "--config", src / "config.json")
    assert result.code == 0 and "lm_head.weight (= model.embed_tokens.weight)" in result.err
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    loaded = _load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    _same_model(loaded, model)


def test_shared_storage_is_kept_twice_when_the_config_unties_embeddings(cli, tmp_path):
    shared = torch.randn(4, 4)
    torch.save({"embed.weight": shared, "lm_head.weight": shared}, tmp_path / "state.pt")
    (tmp_path / "config.json").write_text('{"model_type": "toy", "tie_word_embeddings": false}')
    assert cli("convert", tmp_path / "state.pt", tmp_path / "out", "--to", "hf", "--config", tmp_path / "config.json").code == 0
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "out" / "model.safetensors")) == {"embed.weight", "lm_head.weight"}


def test_shared_storage_is_kept_twice_when_the_config_does_not_say_tied(cli, tmp_path):
    shared = torch.randn(4, 4)
    torch.save({"embed.weight": shared, "lm_head.weight": shared}, tmp_path / "state.pt")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # no key: Llama's default is untied
    assert cli("convert", tmp_path / "state.pt", tmp_path / "out", "--to", "hf", "--config", tmp_path / "config.json").code == 0
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "out" / "model.safetensors")) == {"embed.weight", "lm_head.weight"}


def test_aliases_are_same_bytes_not_overlapping_views():
    info = TensorInfo("x", (2, 2), "float32")
    entries = [
        ("a", StoredTensor(info, "f.pt", 0)), ("b", StoredTensor(info, "f.pt", 0)),
        ("row", StoredTensor(TensorInfo("x", (2,), "float32"), "f.pt", 0)), ("other", StoredTensor(info, "g.pt", 0)),
        ("t", StoredTensor(info, "f.pt", 0, (1, 2))), ("m", None),
    ]
    assert aliased_duplicates(entries) == {"b": "a"}


def test_a_cast_names_its_dtype_in_config_so_from_pretrained_keeps_it(cli, saved, tmp_path):
    out = tmp_path / "bf16"
    assert cli("convert", saved["tied"], out, "--to", "hf", "--dtype", "bf16").code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _load(out).dtype == torch.bfloat16
    assert config_for_dtype({"torch_dtype": "float32", "vision_config": {"dtype": "float32"}, "n": 1}, "float16") == {
        "torch_dtype": "float16", "vision_config": {"dtype": "float16"}, "n": 1, "dtype": "float16",
    }


def test_encoders_get_no_generation_config_and_load_with_automodel(cli, saved, tmp_path):
    out = tmp_path / "bert"
    assert cli("convert", saved["bert"] / "model.safetensors", out, "--to", "hf", "--config", saved["bert"] / "config.json").code == 0
    assert not (out / "generation_config.json").exists()
    _same_model(_load(out, transformers.AutoModel), _load(saved["bert"], transformers.AutoModel))
    assert derived_generation_config({"architectures": ["BertModel"], "bos_token_id": 0}) is None
    assert derived_generation_config({"architectures": ["T5ForConditionalGeneration"], "decoder_start_token_id": 0})["decoder_start_token_id"] == 0


def test_source_generation_config_and_tokenizer_files_survive_nxdt_and_archive_round_trips(cli, saved, tmp_path):
    src = tmp_path / "chat"
    src.mkdir()
    for f in saved["tied"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    generation = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (src / "generation_config.json").write_text(json.dumps(generation))
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    assert cli("convert", src, tmp_path / "nx", "--to", "nxdt", "--tp", "2").code == 0
    assert cli("convert", tmp_path / "nx", tmp_path / "back", "--to", "hf").code == 0
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text()) == generation
    assert cli("convert", tmp_path / "nx", tmp_path / "m.nemo", "--tp", "2").code == 0
    assert cli("convert", tmp_path / "m.nemo", tmp_path / "from-archive", "--to", "hf").code == 0
    assert json.loads((tmp_path / "from-archive" / "generation_config.json").read_text()) == generation
    assert cli("convert", src, tmp_path / "copy", "--to", "hf").code == 0
    assert (tmp_path / "copy" / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    _same_model(_load(tmp_path / "back"), _load(src))


@pytest.mark.parametrize("to", ["nxdt", "archive"])
def test_a_cast_into_a_parallel_layout_still_names_its_dtype_on_the_way_back_to_hf(cli, saved, tmp_path, to):
    sharded = tmp_path / ("sharded.nemo" if to == "archive" else "sharded")
    assert cli("convert", saved["untied"], sharded, "--to", to, "--tp", "2", "--dtype", "bf16").code == 0
    assert cli("convert", sharded, tmp_path / "back", "--to", "hf").code == 0
    assert _load(tmp_path / "back").dtype == torch.bfloat16
