"""``save_checkpoint`` / ``load_checkpoint`` / ``finalize_checkpoint``: training state in NxD's layout,
crash-safe, checksummed, on one process or every rank of torch.distributed.

Ranks come from ``parallel`` (see :mod:`shardwise.distributed`): by default the coordinates
:func:`shardwise.distributed.initialize_model_parallel` built, else pure DP over the world, else
one process. Every rank calls both functions with its own states. A tag is written into a
hidden staging folder and renamed into place only when every rank's files, the manifest and
``done`` are durable (:mod:`.save`), so a crash at any moment leaves the previous checkpoints as
they were, and re-saving an existing tag replaces it atomically.

>>> shardwise.save_checkpoint("ckpts", "step_100", model=model, optimizer=opt, user_content={"step": 100})  # doctest: +SKIP
>>> shardwise.load_checkpoint("ckpts", model=model, optimizer=opt)  # newest complete tag  # doctest: +SKIP
{'step': 100}
"""

from __future__ import annotations

import os
from typing import Any

from ..distributed import coords_of
from ..errors import OptionError
from ..storage.urls import is_url
from . import background
from .assign import FileWrite, SnapshotBuffers, files_to_write, snapshot
from .encodings import ENCODINGS, SPLIT_BY_TENSOR, owned_tensors
from .group import checkpoint_group
from .load import load_states
from .save import begin, finish, run_save
from .staging import DeferredCopies, guarded_pointers
from .zero1 import is_zero1_state

__all__ = ["save_checkpoint", "load_checkpoint", "finalize_checkpoint"]

_buffers = SnapshotBuffers()
_staged: DeferredCopies | None = None  # the last staged save's copier, its step hook removed once the save is over


def _wait_for_pending_save() -> None:
    """Wait for the async save in flight (raising its error) and drop its optimizer hook."""
    global _staged
    try:
        background.wait()
    finally:
        if _staged is not None:
            _staged.close()
            _staged = None


def _state_of(obj: Any) -> Any:
    return obj if obj is None or isinstance(obj, dict) else obj.state_dict()


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    user_content: Any = None,
    async_save: bool = False,
    async_staging: bool = False,
    num_kept_ckpts: int | None = None,
    zero1: bool = False,
    encoding: str = "pt",
    parallel: Any = None,
    model_config: dict | None = None,
) -> str:
    """Save what is given under ``checkpoint_dir/tag`` on every rank and return the tag (collective).

    ``model``, ``optimizer`` and ``scheduler`` are objects with ``state_dict()`` or plain dicts,
    this rank's part; ``user_content`` is any picklable object (kept from rank 0). ``tag``
    defaults to ``checkpoint_<n>``, ``n`` the save's sequence number in this folder. ``zero1``
    marks the optimizer state as this rank's ZeRO-1 shard (detected for NxD's ``base_state`` /
    ``shape_info`` states). ``num_kept_ckpts`` keeps that many complete checkpoints, newest by save
    order, removing the others once this one is complete. With ``async_save`` the call returns as
    soon as the states are copied to CPU memory; a writer thread finishes the save, and the next
    save, a load or :func:`finalize_checkpoint` waits for it and raises its error, if any.
    ``async_staging`` (with ``async_save`` and a torch optimizer object) returns sooner still: the
    parameters and optimizer states are copied on the writer thread, overlapping the caller's next
    forward and backward, and the optimizer's next ``step()`` waits for that copy; nothing else may
    change them in place meanwhile (see :mod:`.staging`).
    ``model_config`` (the model's HF config dict) is recorded in the manifest, so a later load at
    another TP/PP can reshard the weights without being told the model's shape.
    Raises OptionError for bad arguments; a failed write raises OSError naming the file (on the
    rank that failed; the others name that rank) and leaves earlier checkpoints untouched.
    """
    global _staged
    _wait_for_pending_save()  # the previous async save; its error surfaces here
    if async_staging and not async_save:
        raise OptionError("async_staging=True needs async_save=True")
    guarded = guarded_pointers(optimizer) if async_staging else None
    if encoding not in ENCODINGS:
        raise OptionError(f"encoding {encoding!r} is not supported here; choose {', '.join(ENCODINGS)}")
    if num_kept_ckpts is not None and (type(num_kept_ckpts) is not int or not (num_kept_ckpts >= 1 or num_kept_ckpts == -1)):
        raise OptionError(f"num_kept_ckpts must be an int of at least 1 (or None/-1 to keep everything), not {num_kept_ckpts!r}")
    coords = coords_of(parallel)
    group = checkpoint_group()
    optimizer_state = _state_of(optimizer)
    zero1 = bool(zero1 or is_zero1_state(optimizer_state))
    writes = files_to_write(
        coords, model=_state_of(model), optimizer=optimizer_state, scheduler=_state_of(scheduler),
        user_content=user_content, zero1=zero1, split_by_tensor=encoding in SPLIT_BY_TENSOR and not is_url(checkpoint_dir),  # an object has one writer
    )
    layout = {"tp": coords.tp_size, "pp": coords.pp_size, "dp": coords.dp_size, "optimizer": "zero1" if zero1 else "replicated"}
    plan = begin(group, checkpoint_dir, tag, encoding, layout, num_kept_ckpts, model_config)
    if not async_save:
        run_save(group, plan, writes)
        return plan.tag
    try:
        copier = DeferredCopies(_buffers, guarded) if async_staging else _buffers
        copies = [
            FileWrite(w.name, snapshot(w.obj, copier, owned_tensors(w.obj, w.part, w.parts) if w.parts > 1 else None), w.nbytes, w.part, w.parts)
            for w in writes
        ]
    except BaseException as e:  # out of memory, say: the other ranks still meet this one in finish, and the stage goes
        finish(group, plan, e)  # raises e

    def write() -> None:
        release = lambda: [_buffers.release(w.obj) for w in copies]  # noqa: E731
        if async_staging:
            try:
                copier.run()
            except BaseException as e:  # the other ranks still meet this one in finish
                release()
                finish(group, plan, e)  # raises e
        run_save(group, plan, copies, after=release)

    try:
        if async_staging:
            copier.hold(optimizer)
            _staged = copier
        background.submit(write)
    except BaseException as e:  # no writer thread: the step must not wait for it, the other ranks still meet this one
        if async_staging:
            copier.close()
            _staged = None
        finish(group, plan, e)  # raises e
    return plan.tag


def finalize_checkpoint() -> None:
    """Wait for the pending async save, if any, and raise its error (interpreter exit waits too)."""
    _wait_for_pending_save()


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    strict: bool = True,
    verify: bool = True,
    trust_pickle: bool = False,
    parallel: Any = None,
    model_config: Any = None,
) -> Any:
    """Load ``tag`` (default: the newest complete checkpoint) into this rank's objects; return the user content or None.

    Collective under torch.distributed: the leader picks the tag for every rank. Each rank checks
    the files it reads against the manifest first (size and CRC-32; ``verify=False`` checks sizes
    only): a damaged file is an IntegrityError naming it, and with ``tag=None`` the newest complete
    checkpoint is never silently passed over for an older one; a tag whose manifest is damaged is
    skipped with a warning naming it. A ZeRO-1 optimizer state saved at
    another DP size is merged and re-split for this one; model weights saved at another TP/PP are
resharded for this rank (Llama family, through the layout engine; ``model_config``, an HF
config dict or config.json, is needed unless the save recorded one). Files are unpickled with
    ``torch.load(weights_only=True)`` after shardwise's restricted reader accepted them, unless ``trust_pickle``. ``model`` takes ``load_state_dict``
    (with ``strict``) or is a dict updated in place; ``optimizer`` and ``scheduler`` likewise.
    """
    _wait_for_pending_save()
    return load_states(
        checkpoint_dir, tag, coords_of(parallel), checkpoint_group(), model=model, optimizer=optimizer, scheduler=scheduler,
        strict=strict, verify=verify, trust_pickle=trust_pickle, model_config=model_config,
    )
