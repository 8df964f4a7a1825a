"""Which part of an unpickled checkpoint is the model's weights, and what else it carries.

Rule (applied to the object a torch file unpickles to):

1. a top-level ``state_dict`` mapping holds the weights (PyTorch Lightning ``.ckpt``, NeMo);
2. otherwise a top-level ``model`` or ``module`` mapping that contains tensors does (plain training
   scripts, DeepSpeed, Megatron-LM);
3. otherwise the whole object does (``torch.save(model.state_dict())``, HF ``pytorch_model.bin``).

Nested mappings inside the weights are flattened with dots (``model.language_model.embedding...``).
Everything else (optimizer states, schedulers, epoch, hyper-parameters) is *training state*:
:func:`training_state` summarises it for ``inspect`` without treating its tensors as weights.
"""

from __future__ import annotations

from typing import Any

from ..pickle_safety import LazyTensor, iter_tensors, to_plain
from ..tensors import TensorInfo

__all__ = ["select_weights", "is_lightning", "training_state"]

WEIGHT_KEYS = ("state_dict", "model", "module")
_LIGHTNING_MARKERS = ("pytorch-lightning_version", "lightning_version")


def select_weights(root: Any) -> tuple[str | None, list[tuple[str, LazyTensor]]]:
    """The key holding the weights (None for the whole object) and its tensors with flat names."""
    if isinstance(root, dict):
        for key in WEIGHT_KEYS:
            value = root.get(key)
            if isinstance(value, dict):
                tensors = iter_tensors(value)
                if key == "state_dict" or tensors:
                    return key, tensors
    return None, iter_tensors(root)


def is_lightning(root: Any) -> bool:
    """True for checkpoints written by PyTorch Lightning's Trainer."""
    return isinstance(root, dict) and "state_dict" in root and any(m in root for m in _LIGHTNING_MARKERS)


def _tensor_summary(tensors: list[tuple[str, LazyTensor]]) -> dict:
    nbytes = sum(TensorInfo("", t.shape, t.dtype).nbytes for _, t in tensors)
    return {"num_tensors": len(tensors), "total_bytes": nbytes}


def _optimizer_summary(state: Any) -> dict:
    summary = _tensor_summary(iter_tensors(state))
    if isinstance(state, dict):
        groups = state.get("param_groups")
        if isinstance(groups, list):
            summary["param_groups"] = [
                {k: to_plain(v) for k, v in g.items() if k != "params"} | {"num_params": len(g.get("params", []))}
                for g in groups
                if isinstance(g, dict)
            ]
        inner = state.get("state")
        if isinstance(inner, dict):
            summary["num_param_states"] = len(inner)
    return summary


def training_state(root: Any, weights_key: str | None) -> dict:
    """Everything outside the weights, made JSON-friendly; optimizer tensors are counted, not listed."""
    if weights_key is None or not isinstance(root, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in root.items():
        if key == weights_key:
            continue
        key = str(key)
        if key == "optimizer_states" and isinstance(value, list):
            out[key] = [_optimizer_summary(s) for s in value]
        elif key in ("optimizer", "optimizer_state_dict"):
            out[key] = _optimizer_summary(value)
        elif key in ("hyper_parameters", "hparams"):
            out[key] = to_plain(value)
        else:
            tensors = iter_tensors(value)
            plain = to_plain(value)
            out[key] = _tensor_summary(tensors) if tensors and len(str(plain)) >= 2000 else plain
    return out
