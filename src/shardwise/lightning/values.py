"""Safe JSON forms for the values a Lightning checkpoint carries beyond plain containers; a pickle
side list for the rest.

:class:`ValueCodec` is the ``other`` of :func:`shardwise.structure.encode_structure` and
:func:`~shardwise.structure.decode_structure`. It is handed every value whose type is not exactly
a plain one, and writes ``{"X": [tag, payload]}``:

================  ===========================================================  ==========================
tag               values                                                       payload
================  ===========================================================  ==========================
``OrderedDict``   ``collections.OrderedDict`` and its attributes (a module     ``[items]`` or
                  state dict's ``_metadata``, which ``load_state_dict`` reads)  ``[items, attributes]``
``AttributeDict`` Lightning's ``AttributeDict`` (fabric's or pytorch's)         ``[class, items]``
``Namespace``     ``argparse.Namespace``                                       its attributes
``path``          ``pathlib`` paths                                            ``[class, text]``
``dtype``         ``torch.dtype``, ``torch.device``                            name
``device``
``set``           sets, frozensets                                             items
``frozenset``
``bytes``         bytes, bytearrays                                            base64
``bytearray``
``complex``       complex numbers                                              ``[real, imag]``
``numpy``         numpy bool, int and float scalars                            ``[dtype, value]``
``pickle``        anything else (dataclasses, enums, named tuples, ...)        index in :attr:`pickled`
================  ===========================================================  ==========================

Rebuilding a safe kind imports nothing the file names: classes come from the fixed tables here.
``pickle`` values are the writer's to store in a side file; reading them runs pickle, so the
caller decides whether that is allowed before it passes ``pickled`` to the decoder.
"""

from __future__ import annotations

import argparse
import base64
import collections
import importlib
import io
import pathlib
from typing import Any, Callable

from ..errors import FormatError, OptionError
from ..pickle_safety import ATTRIBUTE_DICTS
from ..structure import KeyPath, describe

__all__ = ["ValueCodec", "ATTRIBUTE_DICTS", "inert_classes"]

_PATHS = {cls.__name__: cls for cls in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath)}


def inert_classes() -> tuple[type, ...]:
    """The classes of the safe kinds that ``torch.load(weights_only=True)`` may rebuild too: creating
    them and setting their attributes runs no code a file chooses (the AttributeDicts that import)."""
    classes: list[type] = [argparse.Namespace, *_PATHS.values()]
    for name in ATTRIBUTE_DICTS:
        try:
            classes.append(_attribute_dict(name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def _attribute_dict(name: str) -> type:
    """The AttributeDict class ``name`` (one of :data:`ATTRIBUTE_DICTS`: nothing else is imported)."""
    if name not in ATTRIBUTE_DICTS:
        raise ValueError(f"{name!r} is not one of Lightning's AttributeDict classes")
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


def _is_numpy_number(value: Any) -> bool:
    """A numpy bool, int or float scalar (not a 0-d array, not a string or datetime scalar)."""
    import numpy

    return isinstance(value, numpy.generic) and value.dtype.kind in ("b", "i", "u", "f")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _node(tag: str, payload: Any) -> dict:
    return {"X": [tag, payload]}


class ValueCodec:
    """Encoder (writer side) and decoder (reader side) of the extra kinds; one instance per checkpoint.

    Writer: pass :meth:`encode` as ``other``; afterwards :attr:`pickled` holds the values that had
    no safe form (each once, however often it appears) and :attr:`pickled_index` where each was
    first found and its type. Reader: ``ValueCodec(where, pickled=load)`` and :meth:`decode`;
    ``load()`` returns the unpickled list and is called only if a ``pickle`` node is met.
    """

    def __init__(self, where: str = "", pickled: Callable[[], list] | None = None) -> None:
        self.where = where
        self.root = "the checkpoint"
        self.pickled: list[Any] = []
        self.pickled_index: list[dict] = []
        self._pickled_ids: dict[int, int] = {}
        self._load_pickled = pickled

    # -- writing ------------------------------------------------------------------------------
    def encode(self, value: Any, path: KeyPath, encode: Callable[[Any, KeyPath], Any]) -> Any:
        import torch

        kind = type(value)
        if kind is collections.OrderedDict:
            attributes = vars(value)
            return _node("OrderedDict", [encode(dict(value), path)] + ([encode(dict(attributes), path)] if attributes else []))
        if _qualname(kind) in ATTRIBUTE_DICTS:
            return _node("AttributeDict", [_qualname(kind), encode(dict(value), path)])
        if kind is argparse.Namespace:
            return _node("Namespace", encode(dict(vars(value)), path))
        if _PATHS.get(kind.__name__) is kind:
            return _node("path", [kind.__name__, str(value)])
        if kind is torch.dtype:
            return _node("dtype", str(value).removeprefix("torch."))
        if kind is torch.device:
            return _node("device", str(value))
        if kind in (set, frozenset):
            return _node(kind.__name__, encode(list(value), path))
        if kind in (bytes, bytearray):
            return _node(kind.__name__, base64.b64encode(value).decode("ascii"))
        if kind is complex:
            return _node("complex", [encode(value.real, path), encode(value.imag, path)])
        if kind.__module__ == "numpy" and _is_numpy_number(value):
            return _node("numpy", [value.dtype.str, encode(value.item(), path)])
        return _node("pickle", self._pickle(value, path))

    def _pickle(self, value: Any, path: KeyPath) -> int:
        if id(value) not in self._pickled_ids:
            self._pickled_ids[id(value)] = len(self.pickled)
            self.pickled.append(value)
            self.pickled_index.append({"at": describe(path, self.root), "type": _qualname(type(value))})
        return self._pickled_ids[id(value)]

    def pickled_bytes(self) -> bytes | None:
        """:attr:`pickled` as one ``torch.save`` file (None when empty); OptionError naming the first
        value that cannot be pickled either."""
        import pickle

        import torch

        if not self.pickled:
            return None
        buffer = io.BytesIO()
        try:
            torch.save(self.pickled, buffer)
        except Exception as e:  # noqa: BLE001 - any failure of pickling is reported as the value's
            for value, entry in zip(self.pickled, self.pickled_index):
                try:
                    pickle.dumps(value)
                except Exception as each:  # noqa: BLE001
                    e = each
                    break
            else:
                entry = {"at": self.root, "type": "value"}
            raise OptionError(
                f"{entry['at']} is a {entry['type']}, which has no safe form and cannot be pickled either ({type(e).__name__}: {e})"
            ) from None
        return buffer.getvalue()

    # -- reading ------------------------------------------------------------------------------
    def decode(self, kind: str, value: Any, decode: Callable[[Any], Any]) -> Any:
        if kind != "X" or not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
            raise FormatError(f"{self.where}: the structure in its metadata holds an unknown kind {kind!r}")
        tag, payload = value
        rebuild = getattr(self, f"_decode_{tag}", None)
        if rebuild is None:
            raise FormatError(f"{self.where}: the structure in its metadata holds an unknown value kind {tag!r}")
        try:
            return rebuild(payload, decode)
        except FormatError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ImportError, NotImplementedError) as e:  # WindowsPath on Linux
            raise FormatError(f"{self.where}: a {tag!r} value in its structure is not one shardwise wrote ({type(e).__name__}: {e})") from None

    def _decode_OrderedDict(self, payload: list, decode: Callable) -> Any:  # noqa: N802 - named for the tag
        out = collections.OrderedDict(decode(payload[0]))
        if len(payload) > 1:
            out.__dict__.update(_str_keys(decode(payload[1])))
        return out

    def _decode_AttributeDict(self, payload: list, decode: Callable) -> Any:  # noqa: N802
        name, items = payload
        return _attribute_dict(name)(decode(items))

    def _decode_Namespace(self, payload: Any, decode: Callable) -> Any:  # noqa: N802
        return argparse.Namespace(**_str_keys(decode(payload)))

    def _decode_path(self, payload: list, decode: Callable) -> Any:
        name, text = payload
        return _PATHS[name](text)

    def _decode_dtype(self, payload: str, decode: Callable) -> Any:
        import torch

        dtype = getattr(torch, payload, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{payload!r} is not a torch dtype")
        return dtype

    def _decode_device(self, payload: str, decode: Callable) -> Any:
        import torch

        return torch.device(payload)

    def _decode_set(self, payload: Any, decode: Callable) -> Any:
        return set(decode(payload))

    def _decode_frozenset(self, payload: Any, decode: Callable) -> Any:
        return frozenset(decode(payload))

    def _decode_bytes(self, payload: str, decode: Callable) -> Any:
        return base64.b64decode(payload, validate=True)

    def _decode_bytearray(self, payload: str, decode: Callable) -> Any:
        return bytearray(base64.b64decode(payload, validate=True))

    def _decode_complex(self, payload: list, decode: Callable) -> Any:
        real, imag = payload
        return complex(decode(real), decode(imag))

    def _decode_numpy(self, payload: list, decode: Callable) -> Any:
        import numpy

        dtype, value = payload
        dtype = numpy.dtype(dtype)
        if dtype.kind not in ("b", "i", "u", "f"):
            raise ValueError(f"numpy dtype {dtype} is not a bool, int or float")
        return dtype.type(decode(value))

    def _decode_pickle(self, payload: int, decode: Callable) -> Any:
        if self._load_pickled is None:
            raise ValueError("the structure refers to pickled values but the checkpoint lists none")
        values = self._load_pickled()
        if not (type(payload) is int and 0 <= payload < len(values)):
            raise IndexError(f"pickled value {payload!r} of {len(values)}")
        return values[payload]


def _str_keys(attributes: Any) -> dict:
    if not (isinstance(attributes, dict) and all(isinstance(k, str) for k in attributes)):
        raise TypeError("attributes must be a dict with string keys")
    return attributes
