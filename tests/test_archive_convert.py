"""Lightning checkpoints (one file, or NeMo's per-rank folders) and HF folders into archives, and back."""

from __future__ import annotations

import json

import pytest
import torch

import shardwise

from conftest import assert_same_tensors


def test_a_real_lightning_checkpoint_becomes_an_archive_tensor_for_tensor(cli, tmp_path, lightning_ckpt):
    path, weights = lightning_ckpt
    result = cli("convert", path, tmp_path / "model.nemo")
    assert result.code == 0, result
    with shardwise.restore_from(tmp_path / "model.nemo") as restored:
        assert_same_tensors(restored.state_dict, weights)
        assert restored.config == {"hidden": 8}  # no cfg, so all hyper-parameters; restoring unwraps model: as NeMo does
    with shardwise.open(tmp_path / "model.nemo") as ckpt:
        assert ckpt.archive.config == {"lr": 0.01, "model": {"hidden": 8}}


def _nemo_training_folder(tmp_path, tp: int, pp: int, tokenizer: str | None = None):
    """NeMo's legacy training layout: one full Lightning checkpoint per model-parallel rank."""
    folder = tmp_path / "checkpoints"
    expected = {}
    cfg = {"precision": "bf16-mixed", "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
           "tokenizer": {"library": "sentencepiece", "model": tokenizer}}
    for t in range(tp):
        for p in range(pp):
            rank = f"mp_rank_{t:02d}" if pp == 1 else f"tp_rank_{t:02d}_pp_rank_{p:03d}"
            (folder / rank).mkdir(parents=True)
            state = {f"model.layers.{p}.weight": torch.full((2, 3), 10.0 * p + t), "model.bias": torch.arange(3) + t}
            expected[(t, p)] = state
            adam = {"state": {0: {"exp_avg": torch.randn(2, 3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
            torch.save({"epoch": 3, "global_step": 100, "state_dict": state, "optimizer_states": [adam],
                        "lr_schedulers": [], "hyper_parameters": {"cfg": cfg}}, folder / rank / "megatron--step=100.ckpt")
            torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}}, folder / rank / "megatron--last.ckpt")
    return folder, expected


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_nemo_rank_folders_become_a_sharded_archive(cli, tmp_path, tp, pp):
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"spm")
    folder, expected = _nemo_training_folder(tmp_path, tp, pp, str(tokenizer))
    out = tmp_path / "model.nemo"
    result = cli("convert", folder, out, "--to", "archive", "--checkpoint-name", "megatron--step=100.ckpt")
    assert result.code == 0, result
    summary = shardwise.inspect(out)
    layout = summary["archive"]["layout"]
    assert (layout["kind"], layout["tp"], layout["pp"]) == ("sharded", tp, pp)
    assert summary["config"]["precision"] == "bf16-mixed"
    for (t, p), state in expected.items():
        with shardwise.restore_from(out, tp_rank=t, pp_rank=p) as restored:
            assert_same_tensors(restored.state_dict, state)
            with open(restored.config["tokenizer"]["model"], "rb") as f:
                assert f.read() == b"spm"


def test_rank_folders_with_several_checkpoints_need_a_name(cli, tmp_path):
    folder, _ = _nemo_training_folder(tmp_path, 2, 1)
    result = cli("convert", folder, tmp_path / "m.nemo", "--to", "archive")
    assert result.code == 2 and "--checkpoint-name" in result.err and "megatron--last.ckpt" in result.err


def test_a_missing_rank_is_named(cli, tmp_path):
    folder, _ = _nemo_training_folder(tmp_path, 2, 2)
    (folder / "tp_rank_01_pp_rank_001" / "megatron--last.ckpt").unlink()
    result = cli("convert", folder, tmp_path / "m.nemo", "--checkpoint-name", "megatron--last.ckpt")
    assert result.code == 2 and "tp_rank_01_pp_rank_001/megatron--last.ckpt" in result.err
    assert not (tmp_path / "m.nemo").exists()


def test_hparams_file_overrides_the_checkpoint_config_and_missing_tokenizers_are_reported(cli, tmp_path):
    folder, _ = _nemo_training_folder(tmp_path, 2, 1, tokenizer="/nonexistent/tokenizer.model")
    hparams = tmp_path / "hparams.yaml"
    hparams.write_text("cfg:\n  precision: 32\n  hidden_size: 64\n")
    result = cli("convert", folder, tmp_path / "m.nemo", "--checkpoint-name", "megatron--last.ckpt", "--hparams-file", hparams)
    assert result.code == 0, result
    assert shardwise.inspect(tmp_path / "m.nemo")["config"] == {"precision": 32, "hidden_size": 64}
    result = cli("convert", folder, tmp_path / "n.nemo", "--checkpoint-name", "megatron--last.ckpt")
    assert result.code == 0 and "/nonexistent/tokenizer.model, which does not exist here" in result.err


def test_hf_folder_to_archive_and_back_loads_with_transformers(cli, tmp_path, minilm_path):
    from transformers import AutoModel, AutoTokenizer

    archive = tmp_path / "minilm.nemo"
    assert cli("convert", minilm_path, archive).code == 0
    summary = shardwise.inspect(archive)
    assert summary["config"]["model_type"] == "bert"
    assert {a["referenced_by"][0] for a in summary["archive"]["artifacts"]} == {"hf_config_file", "tokenizer.type", "hf_extra_files"}
    back = tmp_path / "back"
    result = cli("convert", archive, back, "--to", "hf")
    assert result.code == 0 and result.err == "", result
    assert json.loads((back / "config.json").read_text()) == json.loads((minilm_path / "config.json").read_text())
    assert (back / "1_Pooling" / "config.json").is_file() and (back / "tokenizer.json").is_file()
    assert cli("diff", minilm_path, back).code == 0
    text = ["a quick brown fox", "shardwise packs models"]
    original, restored = AutoModel.from_pretrained(minilm_path), AutoModel.from_pretrained(back)
    batch = AutoTokenizer.from_pretrained(minilm_path)(text, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == AutoTokenizer.from_pretrained(back)(text, padding=True, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(original(**batch).last_hidden_state, restored(**batch).last_hidden_state)


def test_an_archive_from_nemo_converts_to_hf_weights_with_a_warning(cli, tmp_path):
    archive = shardwise.save_to({"w": torch.ones(2)}, tmp_path / "n.nemo", config={"precision": 16})
    result = cli("convert", archive, tmp_path / "hf", "--to", "hf")
    assert result.code == 0 and "has no HuggingFace config.json" in result.err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model.safetensors"]
