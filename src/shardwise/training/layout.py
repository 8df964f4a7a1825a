"""Where a training checkpoint keeps what: NxD's layout of one tag, plus shardwise's manifest.

    <root>/<tag>/checkpoint                              marker, written first ("1")
    <root>/<tag>/model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt
    <root>/<tag>/optim/dp_rank_DD_tp_rank_TT_pp_rank_PP.pt   (one per DP rank with ZeRO-1)
    <root>/<tag>/scheduler.pt
    <root>/<tag>/user_content.pt
    <root>/<tag>/shardwise.json                          manifest: order, sizes, CRC-32s
    <root>/<tag>/done                                    written last ("1")

Names follow NxD's ``_get_path`` (dp, then tp, then pp, two digits), so NxD loads our checkpoints
and we load NxD's.
"""

from __future__ import annotations

__all__ = ["MARKER", "DONE", "MANIFEST", "SCHEDULER", "USER_CONTENT", "model_file", "optim_file", "MANIFEST_FORMAT", "MANIFEST_VERSION"]

MARKER = "checkpoint"
DONE = "done"
MANIFEST = "shardwise.json"
SCHEDULER = "scheduler.pt"
USER_CONTENT = "user_content.pt"
MANIFEST_FORMAT = "shardwise-training-checkpoint"
MANIFEST_VERSION = 1


def _ranks(dp: int, tp: int, pp: int) -> str:
    return f"dp_rank_{dp:02d}_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


def model_file(tp_rank: int = 0, pp_rank: int = 0) -> str:
    """A model shard's path inside the tag; always named for DP rank 0, as NxD names it."""
    return f"model/{_ranks(0, tp_rank, pp_rank)}"


def optim_file(dp_rank: int = 0, tp_rank: int = 0, pp_rank: int = 0) -> str:
    """An optimizer shard's path inside the tag (``dp_rank`` > 0 only with ZeRO-1)."""
    return f"optim/{_ranks(dp_rank, tp_rank, pp_rank)}"
