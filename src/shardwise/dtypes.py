"""The dtype table: one row per element type, naming it in every format shardwise speaks.

Canonical names are torch's (``torch.bfloat16`` -> ``"bfloat16"``) so that users see familiar
names, but nothing here imports torch: headers are read and converted without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import OptionError

__all__ = ["DType", "DTYPES", "dtype", "name_of", "from_safetensors", "from_storage_class", "parse_cast_dtype"]


@dataclass(frozen=True)
class DType:
    """One element type.

    ``safetensors`` is the header code (None where safetensors has none); ``storage_class`` is the
    legacy typed-storage class torch pickles name (``torch.FloatStorage``), None for dtypes that
    torch saves as ``UntypedStorage`` plus an explicit dtype; ``safetensors_rank`` is the position
    of the code in the safetensors library's dtype enum, which orders tensors in the files it
    writes (largest first), and which our writer reproduces byte for byte.
    """

    name: str
    itemsize: int
    safetensors: str | None
    storage_class: str | None
    safetensors_rank: int
    castable: bool = False  # floating types that --dtype converts (float8 and complex are left alone)

    def torch(self):
        """The ``torch.dtype`` object (imports torch)."""
        import torch

        return getattr(torch, self.name)


DTYPES: tuple[DType, ...] = (
    DType("bool", 1, "BOOL", "BoolStorage", 0),
    DType("uint8", 1, "U8", "ByteStorage", 4),
    DType("int8", 1, "I8", "CharStorage", 5),
    DType("float8_e5m2", 1, "F8_E5M2", None, 6),
    DType("float8_e4m3fn", 1, "F8_E4M3", None, 7),
    DType("float8_e8m0fnu", 1, "F8_E8M0", None, 8),
    DType("float8_e4m3fnuz", 1, None, None, 90),
    DType("float8_e5m2fnuz", 1, None, None, 91),
    DType("int16", 2, "I16", "ShortStorage", 9),
    DType("uint16", 2, "U16", None, 10),
    DType("float16", 2, "F16", "HalfStorage", 11, castable=True),
    DType("bfloat16", 2, "BF16", "BFloat16Storage", 12, castable=True),
    DType("int32", 4, "I32", "IntStorage", 13),
    DType("uint32", 4, "U32", None, 14),
    DType("float32", 4, "F32", "FloatStorage", 15, castable=True),
    DType("complex64", 8, "C64", "ComplexFloatStorage", 16),
    DType("float64", 8, "F64", "DoubleStorage", 17, castable=True),
    DType("int64", 8, "I64", "LongStorage", 18),
    DType("uint64", 8, "U64", None, 19),
    DType("complex128", 16, None, "ComplexDoubleStorage", 92),
)

_BY_NAME = {d.name: d for d in DTYPES}
_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES if d.safetensors}
_BY_STORAGE = {d.storage_class: d for d in DTYPES if d.storage_class}
_CAST_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp64": "float64", "float64": "float64", "double": "float64",
}


def dtype(name: str) -> DType:
    """The row for a canonical name (``"bfloat16"``); KeyError for names not in the table."""
    return _BY_NAME[name]


def name_of(torch_dtype) -> str:
    """The canonical name of a ``torch.dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(torch_dtype).removeprefix("torch.")


def from_safetensors(code: str) -> DType | None:
    """The row for a safetensors header code (``"BF16"``), or None when shardwise does not know it."""
    return _BY_SAFETENSORS.get(code)


def from_storage_class(name: str) -> DType | None:
    """The row for a torch typed-storage class name (``"FloatStorage"``), or None."""
    return _BY_STORAGE.get(name)


def parse_cast_dtype(text: str) -> DType:
    """Parse a ``--dtype`` value (bf16, fp16, fp32, fp64 or their long names)."""
    name = _CAST_ALIASES.get(text.strip().lower())
    if name is None:
        raise OptionError(f"--dtype {text!r} is not a floating dtype shardwise casts to; use bf16, fp16, fp32 or fp64")
    return _BY_NAME[name]
