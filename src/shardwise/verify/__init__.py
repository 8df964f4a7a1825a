"""Proving conversions: ``diff`` compares tensors bit for bit or within tolerances."""

from .tensor_diff import DiffReport, Mismatch, diff

__all__ = ["diff", "DiffReport", "Mismatch"]
