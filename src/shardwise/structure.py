"""An object's structure as JSON with its tensors left out by name: what a safetensors payload
carries in its metadata, so that loading it needs no pickle.

Nodes: ``None``, bools, ints, strings and finite floats stand for themselves; every other node is
a one-key object: ``{"T": name}`` a tensor (stored elsewhere under ``name``), ``{"S": [...]}`` a
``torch.Size``, ``{"D": [[key, value], ...]}`` a dict (keys are nodes too, so int and tuple keys
survive), ``{"L": [...]}`` a list, ``{"U": [...]}`` a tuple, ``{"F": "inf"}`` a non-finite float.

Callers with more kinds pass ``other``: :func:`encode_structure` then hands it every value whose
type is not exactly one of the plain types above (dict subclasses, named tuples, any object), and
:func:`decode_structure` every node kind it does not know. Without ``other``, subclasses of dict
and plain tuple subclasses are stored as plain dicts and tuples; named tuples and any other value are an
:class:`UnstorableError`.

>>> node = encode_structure({"lr": 0.1, "betas": (0.9, 0.99)}, lambda tensor, path: "unused")
>>> decode_structure(node, lambda name: None, "example")
{'lr': 0.1, 'betas': (0.9, 0.99)}
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .errors import FormatError, OptionError

__all__ = ["encode_structure", "decode_structure", "describe", "UnstorableError"]

KeyPath = tuple  # the keys and indexes leading from the root to a value
Encode = Callable[[Any, KeyPath], Any]
Decode = Callable[[Any], Any]


class UnstorableError(OptionError):
    """A value :func:`encode_structure` has no node for (and no ``other`` to ask): ``where`` and its type are named."""


def describe(path: KeyPath, root: str = "the state") -> str:
    """``the state['optimizer'][0]``: where a value sits, for messages."""
    return root + "".join(f"[{key!r}]" for key in path)


def encode_structure(
    obj: Any, name_of: Callable[[Any, KeyPath], str], *, other: Callable[[Any, KeyPath, Encode], Any] | None = None, root: str = "the state",
) -> Any:
    """The JSON-ready node of ``obj``; ``name_of(tensor, path)`` names each tensor (the same tensor
    must get the same name wherever it appears). ``other(value, path, encode)``: see the module."""
    import torch

    plain = (type(None), bool, int, float, str, dict, list, tuple, torch.Size)

    def encode(value: Any, path: KeyPath) -> Any:
        if isinstance(value, torch.Tensor):
            return {"T": name_of(value, path)}
        if other is not None and type(value) not in plain:
            return other(value, path, encode)
        if isinstance(value, torch.Size):
            return {"S": list(value)}
        if isinstance(value, dict):
            return {"D": [[encode(k, path), encode(v, (*path, k))] for k, v in value.items()]}
        if isinstance(value, list):
            return {"L": [encode(v, (*path, i)) for i, v in enumerate(value)]}
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {"U": [encode(v, (*path, i)) for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"F": repr(value)}
        raise UnstorableError(f"{describe(path, root)} is a {type(value).__name__}")

    return encode(obj, ())


def decode_structure(node: Any, tensor: Callable[[str], Any], where: str, *, other: Callable[[str, Any, Decode], Any] | None = None) -> Any:
    """The object ``node`` describes; ``tensor(name)`` supplies each tensor, ``other(kind, value,
    decode)`` the kinds this module does not know. FormatError naming ``where`` for anything malformed."""
    import torch

    def decode(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if len(node) != 1:
            raise FormatError(f"{where}: the structure in its metadata is not one shardwise wrote")
        (kind, value), = node.items()
        if kind == "T":
            return tensor(value)
        if kind == "S":
            return torch.Size(value)
        if kind == "D":
            return {_hashable(decode(k)): decode(v) for k, v in value}
        if kind == "L":
            return [decode(v) for v in value]
        if kind == "U":
            return tuple(decode(v) for v in value)
        if kind == "F":
            return float(value)
        if other is not None:
            return other(kind, value, decode)
        raise FormatError(f"{where}: the structure in its metadata holds an unknown kind {kind!r}")

    return decode(node)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key
