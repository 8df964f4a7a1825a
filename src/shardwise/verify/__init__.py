"""Proving conversions: ``diff`` compares tensors bit for bit or within tolerances; ``clip_infer``
runs a CLIP archive's zero-shot classification from its own Megatron-core tensors."""

from .clip_infer import ClipScores, clip_infer
from .tensor_diff import DiffReport, Mismatch, diff

__all__ = ["diff", "DiffReport", "Mismatch", "clip_infer", "ClipScores"]
