"""A Lightning checkpoint saved with ``torch.distributed.checkpoint`` (DCP), read back as the one dict
Lightning's ``CheckpointIO.load_checkpoint`` returns.

Two kinds of DCP folder are read:

- Lightning's own sharded checkpoints (``ModelParallelStrategy``, ``FSDPStrategy(state_dict_type="sharded")``):
  the DCP holds the model state under ``state_dict`` (ModelParallel) or ``model`` (FSDP) and each
  optimizer's state under ``optimizer_0``, ``optimizer_1``...; ``meta.pt``, a ``torch.save`` file
  rank 0 writes next to them, holds the rest of the checkpoint dict (epoch, global step, loops,
  callbacks, schedulers, hyper-parameters). Read as ``meta.pt``'s dict plus ``state_dict`` and the
  list ``optimizer_states``, as a single-file checkpoint has them.
- Any other DCP folder (no ``meta.pt``): the checkpoint dict itself, as ``dcp.save`` was given it.

Sharded optimizer states are keyed by parameter name (``net.0.weight``), and DCP turns the integer
keys of a single-process state into strings; both come back keyed by position, as
``torch.optim.Optimizer.state_dict`` keys them (which is also what ``load_state_dict`` matches on).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..formats.dcp import METADATA, read_state
from ..training.files import torch_load
from .values import inert_classes

__all__ = ["LIGHTNING_META", "read_dcp_checkpoint"]

LIGHTNING_META = "meta.pt"  # lightning_fabric.utilities.load._METADATA_FILENAME
_OPTIMIZER_KEY = re.compile(r"optimizer_(0|[1-9][0-9]*)")


def read_dcp_checkpoint(path: Path, *, trust_pickle: bool) -> dict:
    """The Lightning checkpoint dict saved in the DCP folder ``path`` (see the module docstring),
    every tensor whole on CPU, merged from the chunks of all ranks.

    ``meta.pt`` and the DCP's byte objects are unpickled as a single-file checkpoint is
    (``weights_only`` plus the inert classes Lightning checkpoints carry) unless ``trust_pickle``:
    anything else is an UnsafeCheckpointError naming the file, raised before any tensor is read.
    FormatError naming the file for a damaged folder (truncated ``.distcp``, contradictory
    metadata) or a ``meta.pt`` that is not a dict or repeats a key the DCP holds.
    """
    meta_path = path / LIGHTNING_META
    meta = torch_load(meta_path, trust_pickle, allowed=inert_classes()) if meta_path.is_file() else None
    if meta is not None and not isinstance(meta, dict):
        raise FormatError(f"{meta_path}: holds a {type(meta).__name__}, not the dict Lightning writes beside a sharded checkpoint")
    state = read_state(path, trust=trust_pickle, allowed=inert_classes())
    if meta is None:
        if _looks_sharded_by_lightning(state):
            raise FormatError(
                f"{meta_path}: missing; the folder holds Lightning's sharded model and optimizer states but not the rest of "
                f"the checkpoint (epoch, loops, callbacks), which Lightning writes there last (an interrupted save?)"
            )
        checkpoint = state
    else:
        checkpoint = meta
        for key, value in _as_checkpoint_keys(state, path / METADATA).items():
            if key in checkpoint:
                raise FormatError(f"{meta_path}: holds {key!r}, which the distributed checkpoint beside it holds too")
            checkpoint[key] = value
    optimizers = checkpoint.get("optimizer_states")
    if isinstance(optimizers, list):
        checkpoint["optimizer_states"] = [_keyed_by_position(each) for each in optimizers]
    return checkpoint


def _looks_sharded_by_lightning(state: dict) -> bool:
    """Lightning's sharded layout (``model`` or ``state_dict`` plus ``optimizer_N``, no loop state): what
    a folder holds without the ``meta.pt`` that carries the rest."""
    has_optimizer_n = any(_OPTIMIZER_KEY.fullmatch(str(key)) for key in state)
    return bool(state) and "pytorch-lightning_version" not in state and "epoch" not in state and (has_optimizer_n or set(state) <= {"model", "state_dict"})


def _as_checkpoint_keys(state: dict, where: Path) -> dict:
    """Lightning's sharded layout renamed to the checkpoint dict's keys: ``model`` (when there is no
    ``state_dict``) to ``state_dict``, ``optimizer_N`` to item N of ``optimizer_states``."""
    renamed: dict[str, Any] = {}
    optimizers: dict[int, Any] = {}
    for key, value in state.items():
        match = _OPTIMIZER_KEY.fullmatch(key)
        if match:
            optimizers[int(match.group(1))] = value
        else:
            renamed["state_dict" if key == "model" and "state_dict" not in state else key] = value
    if optimizers:
        if sorted(optimizers) != list(range(len(optimizers))):
            raise FormatError(f"{where}: holds the optimizer states {sorted(optimizers)}; Lightning numbers them from 0 without gaps")
        if "optimizer_states" in renamed:
            raise FormatError(f"{where}: holds both optimizer_states and optimizer_N keys")
        renamed["optimizer_states"] = [optimizers[i] for i in range(len(optimizers))]
    return renamed


def _keyed_by_position(optimizer_state: Any) -> Any:
    """``optimizer_state`` with its ``state`` keyed by each parameter's position in ``param_groups``
    (and the groups' ``params`` made those positions), as ``torch.optim.Optimizer.state_dict`` gives it.

    Applies when every key of ``state`` names, as itself or as its string, one listed parameter
    (parameter names of a sharded state, ``"0"`` for ``0`` after DCP); a missing ``state`` is an empty
    one (DCP does not save empty dicts); anything else is returned as it is.
    ``Optimizer.load_state_dict`` pairs saved ids with parameters by position, so this changes which
    key holds a state, never which parameter it goes to.
    """
    if not isinstance(optimizer_state, dict):
        return optimizer_state
    state, groups = optimizer_state.get("state", {}), optimizer_state.get("param_groups")  # DCP saves no empty dict: no state yet
    if not (isinstance(state, dict) and isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return optimizer_state
    if "state" not in optimizer_state:
        optimizer_state = {"state": state, **optimizer_state}
    ids = [str(p) for group in groups for p in group["params"]]
    position = {name: i for i, name in enumerate(ids)}
    if len(position) != len(ids) or not all(str(key) in position for key in state):
        return optimizer_state
    numbered, first = [], 0
    for group in groups:
        numbered.append({**group, "params": list(range(first, first + len(group["params"])))})
        first += len(group["params"])
    return {**optimizer_state, "state": {position[str(key)]: value for key, value in state.items()}, "param_groups": numbered}
