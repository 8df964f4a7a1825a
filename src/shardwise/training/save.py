"""One save of a training checkpoint across all ranks, in three steps (see :func:`save_checkpoint`).

1. ``begin`` (leader, broadcast): names the tag, clears staging folders of dead saves, creates
   the hidden staging folder ``.<tag>.shardwise-tmp-<pid>-<id>`` with the ``checkpoint`` marker;
2. ``write_files`` (every rank): writes the files :func:`assign.files_to_write` gives it into the
   staging folder, each fsynced, with size and CRC-32 taken on the way out;
3. ``finish`` (gather, then leader, broadcast): if every rank succeeded the leader fsyncs the
   folders, writes the manifest and ``done``, renames the folder into place and applies retention;
   otherwise it deletes the staging folder. Every rank then returns, or raises the first error.

A crash anywhere leaves at most a hidden staging folder, which the next save removes: the tags
already in place are never touched before the new one is complete.

On object storage (a URL as the root) each rank writes into its own local scratch folder and
uploads its files in step 2 and the leader uploads the manifest and ``done`` in step 3: see :mod:`.remote`.
"""

from __future__ import annotations

import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import commit_stage, discard_stage, fsync_dir, remove_stale_stages, staging_name, write_text_durably
from ..errors import IntegrityError, OptionError
from ..jsonfile import document_bytes
from ..storage.mirror import Scratch
from ..storage.urls import url_text
from . import remote as remote_tags
from .assign import FileWrite
from .encodings import fold_entries, stored_name, write_part
from .group import Group, first_failure
from .layout import DONE, MANIFEST, MARKER, manifest_document, model_file, optim_file
from .tags import Tag, default_tag, list_tags, next_sequence, tags_to_remove

__all__ = ["SavePlan", "begin", "write_files", "finish", "remove_tag"]


@dataclass(frozen=True)
class SavePlan:
    """What the leader decided for one save; the same on every rank."""

    root: Path
    tag: str
    sequence: int
    stage: Path | None
    encoding: str
    layout: dict
    num_kept_ckpts: int | None
    model_config: dict | None = None
    remote: Any = None  # a RemoteRoot when ``root`` is a URL (see :mod:`.remote`); ``stage`` is then None: each rank writes into its own scratch

    @property
    def where(self) -> str:
        """The tag's location for messages: its path or URL."""
        return f"{self.remote.url}/{self.tag}" if self.remote is not None else str(self.root / self.tag)


def _check_tag(tag: str) -> None:
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or tag.startswith("."):
        raise OptionError(f"tag {tag!r} must be a plain folder name (no '/', not starting with '.')")


def begin(group: Group, root: Path | str, tag: str | None, encoding: str, layout: dict, num_kept_ckpts: int | None, model_config: dict | None = None) -> SavePlan:
    """Step 1, collective: the tag's name and sequence and a fresh staging folder holding the marker.

    ``root`` may be a URL (``s3://...``): see :mod:`.remote`.
    """
    url = url_text(root)
    root = Path(root)

    def decide_remote() -> SavePlan:
        where = remote_tags.RemoteRoot(url)
        tags = remote_tags.list_remote_tags(where)
        sequence = next_sequence(tags)
        name = tag or default_tag(sequence)
        _check_tag(name)
        remote_tags.begin_tag(where, name, tags, manifest_document(name, sequence, encoding, layout, []))
        return SavePlan(root, name, sequence, None, encoding, layout, num_kept_ckpts, model_config, where)

    def decide() -> SavePlan:
        root.mkdir(parents=True, exist_ok=True)
        sequence = next_sequence(list_tags(root))
        name = tag or default_tag(sequence)
        _check_tag(name)
        remove_stale_stages(root)
        stage = staging_name(root / name)
        stage.mkdir()
        try:
            write_text_durably(stage / MARKER, "1")
        except BaseException:
            discard_stage(stage)
            raise
        return SavePlan(root, name, sequence, stage, encoding, layout, num_kept_ckpts, model_config)

    return group.leader_decides(decide_remote if url else decide)


def write_files(plan: SavePlan, writes: list[FileWrite]) -> list[dict]:
    """Step 2, this rank: write its states (or its parts of them) into the staging folder; entries with byte ranges."""
    if plan.remote is None:
        return _write_into(plan, plan.stage, writes)
    scratch = Scratch("save")  # this rank's own, on its own node: written, uploaded, removed
    try:
        stage = scratch.path / plan.tag
        stage.mkdir()
        entries = _write_into(plan, stage, writes)
        remote_tags.upload_files(plan.remote, plan.tag, stage, [e["name"] for e in entries])
        return entries
    finally:
        scratch.remove()


def _write_into(plan: SavePlan, stage: Path, writes: list[FileWrite]) -> list[dict]:
    def one(write: FileWrite) -> list[dict]:
        encoding = plan.encoding if write.name.startswith(("model/", "optim/")) else "pt"  # scheduler, user content: as NxD
        return write_part(encoding, write.obj, stage, write.name, write.part, write.parts)

    if len(writes) < 2:
        return [entry for write in writes for entry in one(write)]
    with ThreadPoolExecutor(2, thread_name_prefix="shardwise-write") as pool:  # checksums and copies of two files at once
        return [entry for entries in pool.map(one, writes) for entry in entries]


def finish(group: Group, plan: SavePlan, outcome: list[dict] | BaseException) -> None:
    """Step 3, collective: commit when every rank's ``outcome`` is its entries, else discard; raise the first error."""
    outcomes = group.gather_outcomes(outcome)
    failure = first_failure(outcomes)

    def commit() -> None:
        if plan.remote is not None:
            return _commit_remote(plan, outcomes, failure)
        if failure is not None:
            discard_stage(plan.stage)
            return
        try:
            files = _checked_files(plan, outcomes)
            for folder in sorted({(plan.stage / f["name"]).parent for f in files}):
                fsync_dir(folder)
            document = _manifest(plan, files)
            write_text_durably(plan.stage / MANIFEST, document_bytes(document))
            write_text_durably(plan.stage / DONE, "1")
            commit_stage(plan.stage, plan.root / plan.tag, overwrite=True)
        except BaseException as e:
            discard_stage(plan.stage)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"{plan.where}: committing the checkpoint failed: {e.strerror or e}; earlier checkpoints are untouched") from None
            raise
        _apply_retention(plan)

    group.leader_decides(commit)
    if isinstance(outcome, BaseException):
        raise outcome
    if failure is not None:
        raise OSError(f"{plan.where}: not saved: {failure}; earlier checkpoints are untouched")


def _checked_files(plan: SavePlan, outcomes: list) -> list[dict]:
    """The manifest's file entries from every rank's outcome; IntegrityError when the layout's files are not all there."""
    files = fold_entries([entry for entries in outcomes for entry in entries])
    missing = _missing(plan, {f["name"] for f in files})
    if missing:
        raise IntegrityError(
            f"{plan.where}: no rank wrote {', '.join(sorted(missing)[:3])}{' ...' if len(missing) > 3 else ''} "
            f"(do the DP replicas hold the same states? a per-rank optimizer state needs zero1=True)"
        )
    return files


def _manifest(plan: SavePlan, files: list[dict]) -> dict:
    document = manifest_document(plan.tag, plan.sequence, plan.encoding, plan.layout, files)
    if plan.model_config is not None:
        document["model_config"] = plan.model_config
    return document


def _commit_remote(plan: SavePlan, outcomes: list, failure) -> None:
    """Step 3 on object storage (leader): manifest and ``done`` after every rank's uploads, then retention; or discard."""
    if failure is not None:
        remote_tags.discard_tag(plan.remote, plan.tag)
        return
    try:
        remote_tags.commit_tag(plan.remote, plan.tag, _manifest(plan, _checked_files(plan, outcomes)))
    except BaseException as e:
        remote_tags.discard_tag(plan.remote, plan.tag)
        if isinstance(e, OSError):
            raise OSError(f"{plan.where}: committing the checkpoint failed: {e}; earlier checkpoints are untouched") from None
        raise
    _apply_retention(plan)


def _missing(plan: SavePlan, written: set[str]) -> set[str]:
    """Model and optimizer files the layout calls for that no rank wrote (for the kinds that were saved at all)."""
    grid = [(t, p) for t in range(plan.layout["tp"]) for p in range(plan.layout["pp"])]
    expected = set()
    if any(name.startswith("model/") for name in written):
        expected |= {stored_name(model_file(t, p), plan.encoding) for t, p in grid}
    if any(name.startswith("optim/") for name in written):
        dps = range(plan.layout["dp"]) if plan.layout["optimizer"] == "zero1" else [0]
        expected |= {stored_name(optim_file(d, t, p), plan.encoding) for d in dps for t, p in grid}
    return expected - written


def _apply_retention(plan: SavePlan) -> None:
    """Remove what ``num_kept_ckpts`` no longer keeps; a failure here is a warning, the new checkpoint is complete."""
    if plan.num_kept_ckpts is None or plan.num_kept_ckpts < 0:
        return
    local = plan.remote is None
    remove = remove_tag if local else remote_tags.remove_tag
    try:
        tags = list_tags(plan.root) if local else remote_tags.list_remote_tags(plan.remote)
        for old in tags_to_remove(tags, plan.num_kept_ckpts, plan.tag):
            remove(old)
    except OSError as e:
        warnings.warn(f"{plan.where} is saved, but removing older checkpoints failed: {e}", stacklevel=2)


def remove_tag(tag: Tag) -> None:
    """Remove a checkpoint: ``done`` first (made durable), so an interruption leaves it incomplete, never half-valid."""
    done = tag.path / DONE
    if done.exists():
        done.unlink()
        fsync_dir(tag.path)
    shutil.rmtree(tag.path, ignore_errors=True)
    fsync_dir(tag.path.parent)


def run_save(group: Group, plan: SavePlan, writes: list[FileWrite], after: Any = None) -> None:
    """Steps 2 and 3 for this rank (what an async save runs in its writer thread); ``after()`` runs last, always."""
    try:
        try:
            outcome: Any = write_files(plan, writes)
        except BaseException as e:  # KeyboardInterrupt too: the other ranks are waiting in finish
            outcome = e
        finish(group, plan, outcome)
    finally:
        if after is not None:
            after()
