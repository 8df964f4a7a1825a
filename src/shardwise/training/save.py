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
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import commit_stage, discard_stage, fsync_dir, remove_stale_stages, staging_name, write_text_durably
from ..errors import OptionError
from .assign import FileWrite
from .encodings import fold_entries, write_part
from .group import Group, first_failure
from .layout import DONE, MANIFEST, MARKER, manifest_document
from .tags import Tag, list_tags, next_sequence, tags_to_remove

__all__ = ["SavePlan", "begin", "write_files", "finish", "remove_tag"]


@dataclass(frozen=True)
class SavePlan:
    """What the leader decided for one save; the same on every rank."""

    root: Path
    tag: str
    sequence: int
    stage: Path
    encoding: str
    layout: dict
    num_kept_ckpts: int | None
    model_config: dict | None = None


def _check_tag(tag: str) -> None:
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or tag.startswith("."):
        raise OptionError(f"tag {tag!r} must be a plain folder name (no '/', not starting with '.')")


def begin(group: Group, root: Path, tag: str | None, encoding: str, layout: dict, num_kept_ckpts: int | None, model_config: dict | None = None) -> SavePlan:
    """Step 1, collective: the tag's name and sequence and a fresh staging folder holding the marker."""

    def decide() -> SavePlan:
        root.mkdir(parents=True, exist_ok=True)
        sequence = next_sequence(list_tags(root))
        name = tag or f"checkpoint_{sequence}"
        _check_tag(name)
        remove_stale_stages(root)
        stage = staging_name(root / name)
        stage.mkdir()
        write_text_durably(stage / MARKER, "1")
        return SavePlan(root, name, sequence, stage, encoding, layout, num_kept_ckpts, model_config)

    return group.leader_decides(decide)


def write_files(plan: SavePlan, writes: list[FileWrite]) -> list[dict]:
    """Step 2, this rank: write its states (or its parts of them) into the staging folder; entries with byte ranges."""
    entries = []
    for write in writes:
        encoding = plan.encoding if write.name.startswith(("model/", "optim/")) else "pt"  # scheduler, user content: as NxD
        entries += write_part(encoding, write.obj, plan.stage, write.name, write.part, write.parts)
    return entries


def finish(group: Group, plan: SavePlan, outcome: list[dict] | BaseException) -> None:
    """Step 3, collective: commit when every rank's ``outcome`` is its entries, else discard; raise the first error."""
    outcomes = group.gather_outcomes(outcome)
    failure = first_failure(outcomes)

    def commit() -> None:
        if failure is not None:
            discard_stage(plan.stage)
            return
        files = fold_entries([entry for entries in outcomes for entry in entries])
        for folder in sorted({(plan.stage / f["name"]).parent for f in files}):
            fsync_dir(folder)
        document = manifest_document(plan.tag, plan.sequence, plan.encoding, plan.layout, files)
        if plan.model_config is not None:
            document["model_config"] = plan.model_config
        write_text_durably(plan.stage / MANIFEST, json.dumps(document, indent=1) + "\n")
        write_text_durably(plan.stage / DONE, "1")
        try:
            commit_stage(plan.stage, plan.root / plan.tag, overwrite=True)
        except BaseException:
            discard_stage(plan.stage)
            raise
        for old in tags_to_remove(list_tags(plan.root), plan.num_kept_ckpts, plan.tag):
            remove_tag(old)

    group.leader_decides(commit)
    if isinstance(outcome, BaseException):
        raise outcome
    if failure is not None:
        raise OSError(f"{plan.root / plan.tag}: not saved: {failure}; earlier checkpoints are untouched")


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
        except Exception as e:
            outcome = e
        finish(group, plan, outcome)
    finally:
        if after is not None:
            after()
