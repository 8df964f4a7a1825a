"""A tiny NeMo ``ModelPT`` subclass, shared by ``make_fixtures.py`` and ``check_with_nemo.py``.

Needs NVIDIA NeMo (``nemo_toolkit==2.3.0``) and so runs only in the separate NeMo venv; the
shardwise test suite never imports this module (it reads the committed fixtures instead).

Config keys it understands::

    hidden_size, ffn_hidden_size        sizes of the *unsharded* model
    tensor_model_parallel_size          TP degree; linear1 is column-parallel (split on dim 0),
                                        linear2 row-parallel (split on dim 1), the rest replicated
    tokenizer.tokenizer_model           a file artifact (registered with register_artifact)
    tokenizer.vocab_file                a second file artifact (optional)
    tokenizer.vocab_dir                 a folder artifact (optional; NeMo 2.3.0 cannot *save* one,
                                        but check_with_nemo.py uses it on hand-made archives)

During the constructor every registered artifact is looked at (the resolved paths only exist
while the constructor runs) and the findings are kept in ``self.artifact_report``.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import torch
from torch import nn

from nemo.core import ModelPT

ARTIFACT_KEYS = ("tokenizer.tokenizer_model", "tokenizer.vocab_file", "tokenizer.vocab_dir")

# name -> split dim under tensor parallelism (None: replicated on every rank)
TP_SPLIT_DIM = OrderedDict(
    [
        ("position_ids", None),
        ("scale", None),
        ("linear1.weight", 0),
        ("linear1.bias", 0),
        ("linear2.weight", 1),
        ("norm.weight", None),
        ("norm.bias", None),
    ]
)


def _describe_path(path: str) -> dict:
    info = {"resolved_path": path, "existed_in_constructor": os.path.exists(path), "is_dir": os.path.isdir(path)}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            info["sha256"] = hashlib.sha256(f.read()).hexdigest()
    elif os.path.isdir(path):
        files = []
        for root, _, names in os.walk(path):
            for n in names:
                files.append(os.path.relpath(os.path.join(root, n), path))
        info["files"] = sorted(files)
    return info


class TinyModel(ModelPT):
    """Two linears, a bf16 LayerNorm, an int64 and a 0-d float64 buffer; no training logic."""

    def __init__(self, cfg, trainer=None):
        super().__init__(cfg=cfg, trainer=trainer)
        tp = int(self.cfg.get("tensor_model_parallel_size", 1))
        hidden = int(self.cfg.hidden_size)
        ffn = int(self.cfg.ffn_hidden_size) // tp
        self.linear1 = nn.Linear(hidden, ffn, bias=True)  # float32, column-parallel
        self.linear2 = nn.Linear(ffn, hidden, bias=False, dtype=torch.float16)  # row-parallel
        self.norm = nn.LayerNorm(hidden, dtype=torch.bfloat16)
        self.register_buffer("position_ids", torch.zeros(hidden, dtype=torch.int64))
        self.register_buffer("scale", torch.tensor(0.0, dtype=torch.float64))

        self.artifact_report = {}
        tok = self.cfg.get("tokenizer")
        for key in ARTIFACT_KEYS:
            sub = key.split(".", 1)[1]
            if tok is None or not tok.get(sub):
                continue
            original = str(tok.get(sub))
            resolved = self.register_artifact(key, original)
            info = {"config_value": original}
            info.update(_describe_path(resolved))
            self.artifact_report[key] = info

    # ModelPT's abstract methods: nothing to set up for a fixture model.
    def setup_training_data(self, train_data_config):
        pass

    def setup_validation_data(self, val_data_config):
        pass

    @classmethod
    def list_available_models(cls):
        return None


def reference_full_state_dict(hidden: int, ffn: int) -> "OrderedDict[str, torch.Tensor]":
    """Deterministic unsharded weights in TinyModel.state_dict() order (own buffers first, then children).

    Exact small dyadic values, so they are the same on every torch version.
    """
    return OrderedDict(
        [
            ("position_ids", torch.arange(hidden, dtype=torch.int64)),
            ("scale", torch.tensor(0.125, dtype=torch.float64)),
            ("linear1.weight", (torch.arange(ffn * hidden, dtype=torch.float32).reshape(ffn, hidden) - 7) / 8),
            ("linear1.bias", torch.arange(ffn, dtype=torch.float32) / 4 - 0.5),
            ("linear2.weight", ((torch.arange(hidden * ffn).reshape(hidden, ffn) - 5) / 16).to(torch.float16)),
            ("norm.weight", (1 + torch.arange(hidden) / 32).to(torch.bfloat16)),
            ("norm.bias", (torch.arange(hidden) / 64 - 0.25).to(torch.bfloat16)),
        ]
    )


def shard_state_dict(full, tp: int, rank: int) -> "OrderedDict[str, torch.Tensor]":
    """The rank-``rank`` slice of ``full`` under TP degree ``tp`` (see TP_SPLIT_DIM)."""
    out = OrderedDict()
    for name, t in full.items():
        dim = TP_SPLIT_DIM[name]
        out[name] = t.clone() if dim is None else torch.chunk(t, tp, dim=dim)[rank].clone()
    return out


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's raw little-endian element bytes in C order (what shardwise writes)."""
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def describe_state_dict(sd) -> "OrderedDict[str, list]":
    """name -> [shape, dtype (torch name without 'torch.'), sha256], in state-dict order."""
    return OrderedDict(
        (k, [list(v.shape), str(v.dtype).replace("torch.", ""), tensor_sha256(v)]) for k, v in sd.items()
    )
