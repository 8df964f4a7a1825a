"""Loading one rank's part of a training checkpoint (see :func:`shardwise.load_checkpoint`).

The leader picks the tag; each rank then reads only its own files: the model shard of its
(tp, pp), the optimizer state of its (dp, tp, pp), the scheduler and the user content. A ZeRO-1
state saved at another DP size (or merged to ``full_`` by ``zero-convert``) is merged over the
saved DP ranks of this (tp, pp) and re-split for this run's DP size. Every file read is first
checked against the manifest; tags written by NxD (no manifest) are loaded unchecked, their
layout read from file names. Model weights saved at another TP/PP are rebuilt for this rank by
the layout engine (:mod:`.reshard_load`, Llama family; the model's HF config comes from the
manifest or ``model_config``).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..distributed import ParallelCoords
from ..errors import FormatError, IntegrityError, LayoutError, ShardwiseError
from .encodings import read_state, stored_name
from .files import check_against, check_file, file_crc32, torch_load
from .group import Group
from .layout import MANIFEST, SCHEDULER, USER_CONTENT, full_optim_file, model_file, optim_file, parse_rank_file
from .tags import Tag, list_tags
from ..storage.mirror import Scratch
from ..storage.urls import url_text

__all__ = ["load_states", "saved_layout", "read_file"]


def _choose(root: Path | str, tags: list[Tag], tag: str | None) -> Tag:
    """The tag to load among ``tags`` (those of ``root``, oldest first): ``tag``, or the newest complete one.

    Tags with a damaged manifest are passed over, each named in a warning; they never stop the
    newest good tag from loading.
    """
    if tag is not None:
        for t in tags:
            if t.name == tag:
                if t.damage is not None:
                    raise IntegrityError(f"{t.path}/{MANIFEST}: checkpoint is damaged: {t.damage}")
                if not t.complete:
                    raise IntegrityError(f"{t.path}: checkpoint is incomplete (no done marker, or files shorter than its manifest says)")
                return t
        raise FormatError(f"{root}/{tag}: no such checkpoint")
    complete = [t for t in tags if t.complete]
    chosen = complete[-1] if complete else None
    instead = f"loading {chosen.name} instead" if chosen else "no complete checkpoint is left"
    for t in tags:
        if t.damage is not None:
            warnings.warn(f"{t.path}/{MANIFEST}: skipped, the manifest is damaged ({t.damage}); {instead}", stacklevel=4)
    if chosen is None:
        raise FormatError(f"{root}: holds no complete checkpoint")
    for t in tags[tags.index(chosen) + 1:]:
        if t.done and t.damage is None:
            warnings.warn(f"{t.path}: marked done but its files do not match its manifest; {instead}", stacklevel=4)
    return chosen


def saved_layout(tag: Tag) -> dict:
    """The tag's layout (tp, pp, dp, optimizer kind): from its manifest, else from NxD's file names."""
    if tag.manifest is not None and isinstance(tag.manifest.get("layout"), dict) and "optimizer" in tag.manifest["layout"]:
        return tag.manifest["layout"]
    def ranks(folder: str) -> list:
        if tag.listing is not None:  # a remote tag: its listing
            names = [rel.split("/")[1] for rel in tag.listing if rel.startswith(f"{folder}/") and rel.count("/") == 1]
        else:
            names = os.listdir(tag.path / folder) if (tag.path / folder).is_dir() else []
        return [r for r in map(parse_rank_file, names) if r is not None]

    model, optim = ranks("model"), ranks("optim")
    dps = {r.dp for r in optim}
    kind = "zero1-full" if None in dps else "zero1" if len(dps) > 1 else "replicated"  # NxD's rule: a dp_rank_01 file means ZeRO-1
    return {
        "tp": 1 + max((r.tp for r in model + optim), default=0), "pp": 1 + max((r.pp for r in model + optim), default=0),
        "dp": len(dps) if kind == "zero1" else 1, "optimizer": kind,
    }


def read_file(tag: Tag, name: str, verify: bool, trust_pickle: bool, mapped: bool = False) -> Any:
    """State ``name`` of ``tag`` (``model/...pt``, ``scheduler.pt``, ...) in the tag's encoding, every file
    checked against the manifest when there is one; ``mapped``: see :func:`.files.torch_load`."""
    encoding = _encoding_of(tag, name)

    def load_pt(relpath: str) -> Any:
        entry = _listed(tag, relpath)
        if entry is not None and verify:
            return _load_checked(tag.path / relpath, entry, trust_pickle, mapped)
        return torch_load(tag.path / relpath, trust_pickle, mapped)

    if encoding == "safetensors":
        relpath = stored_name(name, encoding)
        entry = _listed(tag, relpath)
        if entry is not None and verify:
            check_file(tag.path / relpath, entry)
    return read_state(encoding, tag.path, name, load_pt, trust_pickle, mapped)


def _encoding_of(tag: Tag, name: str) -> str:
    """How state ``name`` is stored: scheduler and user content always pt; the rest as the manifest
    says, or, for tags NxD wrote, xser when ``<file>.tensors/`` exists (NxD's own test)."""
    if not name.startswith(("model/", "optim/")):
        return "pt"
    if tag.manifest is not None:
        return tag.manifest.get("encoding", "pt")
    return "xser" if (tag.path / f"{name}.tensors").is_dir() else "pt"


def _listed(tag: Tag, relpath: str) -> dict | None:
    """The manifest entry of ``relpath`` (None without a manifest), after checking the file exists with its size."""
    path = tag.path / relpath
    if tag.manifest is None:
        if not path.is_file():
            raise FormatError(f"{path}: missing")
        return None
    entry = tag.entries.get(relpath)
    if entry is None:
        raise IntegrityError(f"{path}: not listed in the checkpoint's manifest")
    check_file(path, entry, verify=False)
    return entry


def _load_checked(path: Path, entry: dict, trust_pickle: bool, mapped: bool) -> Any:
    """``torch_load`` while another thread computes the file's CRC-32 (both read the same cached
    pages, on two cores); the CRC verdict comes first, so damage is reported as damage even when
    it also made the file unreadable. The restricted unpickler makes loading unverified bytes safe."""
    with ThreadPoolExecutor(1, thread_name_prefix="shardwise-crc") as pool:
        crc = pool.submit(file_crc32, path)
        try:
            state = torch_load(path, trust_pickle, mapped)
        except ShardwiseError:
            check_against(path, entry, entry["size"], crc.result())
            raise
        check_against(path, entry, entry["size"], crc.result())
    return state


def _apply(target: Any, state: Any, strict: bool | None) -> None:
    if isinstance(target, dict):
        target.update(state)
    elif strict is not None:
        target.load_state_dict(state, strict=strict)
    else:
        target.load_state_dict(state)


def _optimizer_state(tag: Tag, layout: dict, coords: ParallelCoords, verify: bool, trust_pickle: bool) -> Any:
    t, p = coords.tp_rank, coords.pp_rank
    kind = layout["optimizer"]
    if kind == "replicated":
        return read_file(tag, optim_file(0, t, p), verify, trust_pickle)
    if kind == "zero1" and layout["dp"] == coords.dp_size:
        return read_file(tag, optim_file(coords.dp_rank, t, p), verify, trust_pickle)
    from .zero1 import merge_zero1, split_zero1

    if kind == "zero1":
        shards = [read_file(tag, optim_file(d, t, p), verify, trust_pickle) for d in range(layout["dp"])]
        full = merge_zero1(shards, str(tag.path / "optim"))
    else:
        full = read_file(tag, full_optim_file(t, p), verify, trust_pickle)
    return split_zero1(full, coords.dp_size, str(tag.path / full_optim_file(t, p)), only=coords.dp_rank)[0]


def _check_for_resharding(tag: Tag, layout: dict, verify: bool) -> None:
    """Before the layout engine reads a tag's model files: they are torch or xser files, and (``verify``) their CRCs match."""
    encoding = _encoding_of(tag, "model/x.pt")
    if encoding == "safetensors":
        raise LayoutError(
            f"{tag.path}: model weights saved with encoding {encoding!r} load only at the saved tp {layout['tp']} x pp {layout['pp']}; "
            f"resharding on load reads encodings 'pt' and 'xser'"
        )
    if verify and tag.manifest is not None:
        for name, entry in tag.entries.items():
            if name.startswith("model/"):
                check_file(tag.path / name, entry)


def load_states(
    checkpoint_dir: str | os.PathLike, tag: str | None, coords: ParallelCoords, group: Group, *,
    model: Any, optimizer: Any, scheduler: Any, strict: bool, verify: bool, trust_pickle: bool, model_config: Any = None,
) -> Any:
    """Load this rank's part of ``tag`` into the objects given; the user content, or None.

    ``checkpoint_dir`` may be a URL: the tag is chosen from one listing and this rank's files are
    fetched to local scratch first (see :mod:`.remote`).
    """
    url = url_text(checkpoint_dir)
    if url is None:
        root = Path(checkpoint_dir)
        chosen = group.leader_decides(lambda: _choose(root, list_tags(root), tag))
        return _load_tag(chosen, saved_layout(chosen), coords, model, optimizer, scheduler, strict, verify, trust_pickle, model_config)
    from . import remote

    chosen = group.leader_decides(lambda: _choose(url, remote.list_remote_tags(remote.RemoteRoot(url)), tag))
    layout = saved_layout(chosen)
    same_grid = (layout["tp"], layout["pp"]) == (coords.tp_size, coords.pp_size)
    wanted = remote.files_for_rank(chosen.listing, layout, coords, model=model is not None, optimizer=optimizer is not None, same_grid=same_grid)
    scratch = Scratch("load")
    local = scratch.path / chosen.name
    try:
        local_tag = remote.fetch_for_rank(chosen, wanted, local)
        return _load_tag(local_tag, layout, coords, model, optimizer, scheduler, strict, verify, trust_pickle, model_config)
    except (ShardwiseError, OSError) as e:  # name the remote files, not their scratch copies
        from ..storage.entry import renamed_error

        raise renamed_error(e, {str(local): str(chosen.path)}) from None
    finally:
        scratch.remove()


def _load_tag(
    chosen: Tag, layout: dict, coords: ParallelCoords, model: Any, optimizer: Any, scheduler: Any,
    strict: bool, verify: bool, trust_pickle: bool, model_config: Any,
) -> Any:
    """Load this rank's part of the local tag ``chosen`` (saved at ``layout``); the user content, or None."""
    same_grid = (layout["tp"], layout["pp"]) == (coords.tp_size, coords.pp_size)
    if optimizer is not None and not same_grid:
        raise LayoutError(
            f"{chosen.path}: optimizer states saved at tp {layout['tp']} x pp {layout['pp']} cannot load into tp {coords.tp_size} "
            f"x pp {coords.pp_size} (they follow the parameters' TP/PP split); load the model alone, or at the saved TP/PP"
        )
    if model is not None:
        copies = hasattr(model, "load_state_dict") and not isinstance(model, dict)  # Module.load_state_dict copies into the parameters
        if same_grid:
            state = read_file(chosen, model_file(coords.tp_rank, coords.pp_rank), verify, trust_pickle, mapped=copies)
        else:
            from .reshard_load import resharded_model_state

            _check_for_resharding(chosen, layout, verify)
            state = resharded_model_state(
                chosen.path, tp_size=coords.tp_size, pp_size=coords.pp_size, tp_rank=coords.tp_rank, pp_rank=coords.pp_rank,
                config=model_config, trust_pickle=trust_pickle,
            )
        _apply(model, state, strict)
    if optimizer is not None:
        _apply(optimizer, _optimizer_state(chosen, layout, coords, verify, trust_pickle), None)
    if scheduler is not None:
        _apply(scheduler, read_file(chosen, SCHEDULER, verify, trust_pickle), None)
    has_user = (chosen.path / USER_CONTENT).is_file()
    return read_file(chosen, USER_CONTENT, verify, trust_pickle) if has_user else None
