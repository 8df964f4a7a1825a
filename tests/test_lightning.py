"""A checkpoint written by the real PyTorch Lightning Trainer: weights separated from training state."""

from __future__ import annotations

import json

import pytest
import torch

import shardwise


def test_lightning_checkpoint_is_recognised_with_its_training_state(cli, lightning_ckpt):
    path, _ = lightning_ckpt
    result = cli("inspect", path, "--json")
    assert result.code == 0, result
    info = json.loads(result.out)
    assert info["format"] == "lightning"
    assert info["num_tensors"] == 4
    state = info["training_state"]
    assert state["epoch"] == 2 and state["global_step"] == 8  # saved after 2 epochs of 4 batches
    (opt,) = state["optimizer_states"]
    assert opt["num_tensors"] == 12 and opt["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.1**2)
    assert len(state["lr_schedulers"]) == 1
    assert info["config"] == {"lr": 0.01, "model": {"hidden": 8}}  # OmegaConf hparams as plain data


def test_lightning_weights_convert_exactly_and_optimizer_states_stay_out(cli, lightning_ckpt, tmp_path):
    path, weights = lightning_ckpt
    out = tmp_path / "weights.safetensors"
    assert cli("convert", path, out).code == 0
    with shardwise.open(out) as ckpt:
        assert sorted(ckpt.tensors.keys()) == sorted(weights)
        for name, tensor in weights.items():
            assert torch.equal(ckpt.tensors.read(name), tensor)
    assert cli("diff", path, out).code == 0


def test_lightning_table_shows_epoch_step_and_optimizer(cli, lightning_ckpt):
    path, _ = lightning_ckpt
    out = cli("inspect", path).out
    assert "lightning" in out and "global_step" in out and "not weights" in out
