"""A checkpoint written by the real PyTorch Lightning Trainer: weights separated from training state."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import shardwise


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """Fit a tiny LightningModule (OmegaConf hparams, Adam, a scheduler) for a few CPU steps."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    class Tiny(pl.LightningModule):
        def __init__(self, cfg):
            super().__init__()
            self.save_hyperparameters(cfg)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.body(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1)]

    tmp = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    model = Tiny(OmegaConf.create({"lr": 0.01, "model": {"hidden": 8}}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp, enable_checkpointing=False,
        )
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp / "epoch=2.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


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
