"""NeMo 2 checkpoints (``context/model.yaml`` + ``weights/`` torch_dist with ``module.`` keys), converted to HF.

The checkpoints are written by ``torch.distributed.checkpoint.save`` from a tiny random Llama as
NeMo 2 saves them (``torch_dist_ranks.py ... nemo2``: stacked layers, ``module.`` keys, optimizer
moments beside the weights, a fiddle-style model.yaml), under 2 gloo ranks and in one process,
with an HF tokenizer in ``context/nemo_tokenizer/``; then read in place by shardwise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_llama
from test_torch_dist import CASES, build_case, logits, write_torch_dist


def write_tokenizer(folder: Path, vocab: int) -> None:
    """An HF fast tokenizer of ``vocab`` words, saved as AutoTokenizer saves it (NeMo copies that folder into context/)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(str(folder))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> dict:
    """The original HF folder and the NeMo 2 checkpoint holding it (GQA untied padded at 2 ranks; MHA tied at 1)."""
    built = build_case(request.param, tmp_path_factory.mktemp(f"nemo2_{request.param}"), "nemo2")
    write_tokenizer(built["dir"] / "context" / "nemo_tokenizer", built["model"]["vocab"])
    return built


def test_a_nemo2_checkpoint_converts_to_the_original_hf_model_with_its_tokenizer(case, tmp_path, cli):
    out = tmp_path / "hf"
    result = cli("convert", case["dir"], out, "--to", "hf")  # the vocabulary comes from context/nemo_tokenizer
    assert result.code == 0, result.err
    assert cli("diff", out, case["hf"]).code == 0
    assert torch.equal(logits(out), logits(case["hf"]))
    assert not (case["dir"] / "pwned").exists()  # common.pt holds a pickle that runs code: it was never loaded
    written = json.loads((out / "config.json").read_text())
    model = case["model"]
    assert (written["vocab_size"], written["tie_word_embeddings"], written["num_key_value_heads"]) == (model["vocab"], model["tied"], model["kv_heads"])
    assert (out / "tokenizer.json").read_bytes() == (case["dir"] / "context" / "nemo_tokenizer" / "tokenizer.json").read_bytes()
    import transformers

    assert len(transformers.AutoTokenizer.from_pretrained(out)) == model["vocab"]


def test_inspect_shows_a_nemo2_checkpoint_its_prefix_and_the_skipped_optimizer_state(case, cli):
    result = cli("inspect", case["dir"], "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    layout = summary["layout"]
    assert summary["format"] == "nemo2" and summary["weights_format"] == "dcp" and layout["kind"] == "torch_dist"
    assert layout["key_prefix"] == "module." and layout["skipped_other_keys"] == 2 and layout["files"] == case["world"]
    assert layout["stacked_layers"] == {"model.decoder.": case["model"]["layers"]}
    names = [t["name"] for t in summary["tensors"]]
    assert "model.decoder.layers.0.mlp.linear_fc1.weight" in names and not [n for n in names if "optimizer" in n or n.startswith("module.")]
    assert summary["config"]["_target_"] == "nemo.collections.llm.gpt.model.llama.LlamaConfig" and "tokenizer.json" in summary["tokenizer_files"]
    parallel = summary["parallel"]
    assert parallel["style"] == "mcore" and parallel["dims"]["kv_heads"] == case["model"]["kv_heads"] and parallel["dims"]["vocab"] == case["model"]["vocab"]
    table = cli("inspect", case["dir"])
    assert table.code == 0 and "nemo2" in table.out


def test_the_weights_folder_alone_takes_the_context_beside_it_or_config(case, tmp_path, cli):
    beside = tmp_path / "beside"
    assert cli("convert", case["dir"] / "weights", beside, "--to", "hf").code == 0
    assert cli("diff", beside, case["hf"]).code == 0
    bare = tmp_path / "weights"
    shutil.copytree(case["dir"] / "weights", bare)
    refused = cli("convert", bare, tmp_path / "none", "--to", "hf")
    assert refused.code == 2 and "pass --config" in refused.err and len(refused.err.strip().splitlines()) == 1 and not (tmp_path / "none").exists()
    given = cli("convert", bare, tmp_path / "given", "--to", "hf", "--config", case["hf"] / "config.json")
    assert given.code == 0, given.err
    assert cli("diff", tmp_path / "given", case["hf"]).code == 0


def test_without_a_tokenizer_the_padded_rows_are_kept_and_said_so(case, tmp_path, cli):
    copy = tmp_path / "nemo2"
    shutil.copytree(case["dir"], copy)
    shutil.rmtree(copy / "context" / "nemo_tokenizer")
    out = tmp_path / "hf"
    result = cli("convert", copy, out, "--to", "hf")
    assert result.code == 0, result.err
    rows = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].shape[0]
    vocab = case["model"]["vocab"]
    if case["padded"]:
        assert rows == 256 and "context/nemo_tokenizer/tokenizer.json" in result.err and "padding included" in result.err
        assert torch.equal(logits(out)[..., :vocab], logits(case["hf"]))
        assert cli("convert", copy, tmp_path / "trimmed", "--to", "hf", "--config", case["hf"] / "config.json").code == 0
        assert cli("diff", tmp_path / "trimmed", case["hf"]).code == 0
    else:
        assert rows == vocab and cli("diff", out, case["hf"]).code == 0


def test_other_layouts_and_the_canonical_diff_fall_out_and_reshard_is_refused(case, tmp_path, cli):
    assert cli("diff", case["dir"], case["hf"]).code == 0
    assert cli("convert", case["dir"], tmp_path / "nx", "--to", "nxdt", "--tp", "2").code == 0
    assert cli("diff", tmp_path / "nx", case["hf"]).code == 0
    assert cli("convert", case["dir"], tmp_path / "out.nemo", "--to", "archive", "--tp", "2").code == 0
    assert cli("diff", tmp_path / "out.nemo", case["hf"]).code == 0
    refused = cli("reshard", case["dir"], tmp_path / "re", "--tp", "2")
    assert refused.code == 2 and "distributed checkpoint of global tensors" in refused.err and not (tmp_path / "re").exists()


# -- bad input ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nemo2_bad")
    hf = tiny_llama(root / "hf", **CASES["gqa"]["model"])
    write_torch_dist(hf, root / "nemo2", 1, "layer", 128, "nemo2")
    return root / "nemo2"


def _edit_config(copy: Path, change) -> Path:
    path = copy / "context" / "model.yaml"
    model = yaml.safe_load(path.read_text())
    change(model["config"])
    path.write_text(yaml.safe_dump(model))
    return path


def _damaged(gqa: Path, tmp_path: Path, damage: str) -> Path:
    """The damaged file of a copy of ``gqa`` at ``tmp_path / "nemo2"``."""
    copy = tmp_path / "nemo2"
    shutil.copytree(gqa, copy)
    if damage == "no .metadata":
        (copy / "weights" / ".metadata").unlink()
        return copy / "weights" / ".metadata"
    if damage == "truncated":
        data = sorted((copy / "weights").glob("*.distcp"))[0]
        os.truncate(data, data.stat().st_size - 100)
        return data
    if damage == "not yaml":
        (copy / "context" / "model.yaml").write_text("config: [unclosed\n  _target_: {\n")
        return copy / "context" / "model.yaml"
    if damage == "no dims":
        return _edit_config(copy, lambda c: c.pop("hidden_size"))
    if damage == "not llama":
        return _edit_config(copy, lambda c: c.update(_target_="nemo.collections.llm.t5.model.t5.T5Config"))
    if damage == "layernorm":
        return _edit_config(copy, lambda c: c.update(normalization="LayerNorm"))
    if damage == "gelu":
        return _edit_config(copy, lambda c: c.update(activation_func={"_target_": "torch.nn.functional.gelu", "_call_": False}))
    if damage == "partial rotary":
        return _edit_config(copy, lambda c: c.update(rotary_percent=0.5))
    raise AssertionError(damage)


@pytest.mark.parametrize("damage, message", [
    ("no .metadata", "missing"),
    ("truncated", "is truncated"),
    ("not yaml", "not readable YAML"),
    ("no dims", "config hidden_size is None"),
    ("not llama", "'nemo.collections.llm.t5.model.t5.T5Config' is not a NeMo GPT/Llama config"),
    ("layernorm", "normalization is 'LayerNorm'"),
    ("gelu", "activation_func is 'torch.nn.functional.gelu'"),
    ("partial rotary", "rotary_percent is 0.5"),
])
def test_damaged_nemo2_checkpoints_give_one_line_naming_the_file(gqa, tmp_path, cli, damage, message):
    """Also for the weights/ folder given alone: a context that is refused must not fall back to
    copying the mcore tensors under their own names into an "HF" folder or an archive."""
    bad = _damaged(gqa, tmp_path, damage)
    commands = [["convert", tmp_path / "nemo2", tmp_path / "out", "--to", "hf"], ["inspect", tmp_path / "nemo2"]]
    if bad.name == "model.yaml":
        commands.append(["convert", tmp_path / "nemo2" / "weights", tmp_path / "out", "--to", "hf"])
        commands.append(["convert", tmp_path / "nemo2" / "weights", tmp_path / "out", "--to", "archive"])
    for command in commands:
        result = cli(*command)
        assert result.code == 2 and message in result.err and str(bad.parent) in result.err and bad.name in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_llama31_rope_scaling_reaches_config_json_with_or_without_a_tokenizer(gqa, tmp_path, cli):
    copy = tmp_path / "nemo2"
    shutil.copytree(gqa, copy)
    _edit_config(copy, lambda c: c.update(scale_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192))
    expected = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    for tokenizer in (False, True):
        if tokenizer:
            write_tokenizer(copy / "context" / "nemo_tokenizer", CASES["gqa"]["model"]["vocab"])
        out = tmp_path / f"hf{tokenizer}"
        assert cli("convert", copy, out, "--to", "hf").code == 0
        assert json.loads((out / "config.json").read_text())["rope_scaling"] == expected


def test_only_tokenizer_files_are_taken_from_the_context_links_included(gqa, tmp_path, cli):
    """A weight-named file in nemo_tokenizer/ cannot replace the converted weights; files linked as a
    hub cache links them (into blobs/) are copied like plain ones."""
    copy = tmp_path / "nemo2"
    shutil.copytree(gqa, copy)
    tokenizer = copy / "context" / "nemo_tokenizer"
    write_tokenizer(tokenizer, CASES["gqa"]["model"]["vocab"])
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (tokenizer / "tokenizer.json").rename(blobs / "abc123")
    (tokenizer / "tokenizer.json").symlink_to(blobs / "abc123")
    (tokenizer / "model.safetensors").write_bytes(b"junk")
    (tokenizer / "config.json").write_text("{}")
    out = tmp_path / "hf"
    assert cli("convert", copy, out, "--to", "hf").code == 0
    assert cli("diff", out, gqa.parent / "hf").code == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").read_bytes() == (blobs / "abc123").read_bytes() and not (out / "tokenizer.json").is_symlink()
