"""The errors shardwise raises on purpose.

Every message names the file (or option), the value that is wrong and, where there is one, the
fix. The command line prints ``str(error)`` as its one line on stderr and exits with code 2, so
messages are written as a single sentence-like line.
"""

from __future__ import annotations

__all__ = [
    "ShardwiseError",
    "FormatError",
    "UnsafeCheckpointError",
    "OutputExistsError",
    "IntegrityError",
    "LayoutError",
    "OptionError",
    "HubError",
]


class ShardwiseError(Exception):
    """Base class of every error shardwise raises deliberately (bad input, bad options, unsafe files)."""


class FormatError(ShardwiseError, ValueError):
    """A file or folder is not in a format shardwise reads, or is truncated or corrupted."""


class UnsafeCheckpointError(ShardwiseError):
    """A pickle asked for a global outside the allow-list; nothing in it was executed."""


class OutputExistsError(ShardwiseError, FileExistsError):
    """The output path exists and replacing it was not asked for (``overwrite=True``)."""


class IntegrityError(ShardwiseError):
    """Bytes on disk do not match what their header, index or manifest promises."""


class LayoutError(ShardwiseError, ValueError):
    """A parallel layout (TP/PP/DP) does not fit the model or contradicts what is on disk."""


class OptionError(ShardwiseError, ValueError):
    """An option value is not one shardwise understands (unknown dtype, bad size, wrong format name)."""


class HubError(ShardwiseError):
    """A model named on the Hugging Face Hub is neither in the local cache nor reachable (or access is refused)."""
