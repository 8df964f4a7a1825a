"""``@accepts_urls``: a public function whose path parameters also take ``s3://`` (any fsspec) URLs.

The decorated function runs on local paths, unchanged: each URL given for one of its ``inputs`` is
fetched first (:func:`.mirror.fetch`), each URL given for one of its ``outputs`` is written
locally and published when the function returns (:func:`.mirror.published`, honouring the call's
``overwrite`` argument). Local paths pass straight through, at the cost of one signature bind.

What the caller sees names the URLs, not the scratch copies: in an error's message (and an
OSError's ``filename``) and in the fields of a returned dataclass (``path``, ``files``), scratch
paths are replaced by the URLs they stand for. Scratch copies are removed when the call returns,
or, with ``keep_inputs`` (lazy readers such as ``shardwise.open``), when the returned object is
garbage-collected.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import os
import weakref
from pathlib import Path
from typing import Any, Callable

from ..errors import ShardwiseError
from .mirror import fetch, published
from .urls import file_url_path, url_text

__all__ = ["accepts_urls", "renamed_error"]


def accepts_urls(
    *, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = (), keep_inputs: bool = False, headers_only: bool = False,
) -> Callable:
    """Decorate a function so that the parameters ``inputs`` and ``outputs`` accept URLs (see module
    docstring). ``headers_only``: the function reads safetensors headers, never tensor data, so
    remote safetensors files are fetched as their headers (see :func:`.mirror.fetch`)."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            for name in (*inputs, *outputs):  # file:// URLs are local paths
                local = file_url_path(bound.arguments.get(name))
                if local is not None:
                    bound.arguments[name] = local
            urls = {name: url_text(bound.arguments.get(name)) for name in (*inputs, *outputs)}
            if not any(urls.values()):
                return fn(*bound.args, **bound.kwargs)
            bound.apply_defaults()
            names: dict[str, str] = {}  # scratch path -> URL
            scratches = []
            try:
                with contextlib.ExitStack() as stack:
                    for name in inputs:
                        if urls[name]:
                            local, scratch = fetch(urls[name], headers_only=headers_only)
                            scratches.append(scratch)
                            names[str(local)] = urls[name]
                            bound.arguments[name] = _like(bound.arguments[name], local)
                    for name in outputs:
                        if urls[name]:
                            local = stack.enter_context(published(urls[name], overwrite=bool(bound.arguments.get("overwrite"))))
                            names[str(local)] = urls[name]
                            bound.arguments[name] = _like(bound.arguments[name], local)
                    result = fn(*bound.args, **bound.kwargs)
            except (ShardwiseError, OSError) as e:
                for scratch in scratches:
                    scratch.remove()
                raise renamed_error(e, names) from e.__cause__
            except BaseException:
                for scratch in scratches:
                    scratch.remove()
                raise
            result = _relabel(result, names)
            if keep_inputs and scratches and result is not None:
                owner = getattr(result, "tensors", result)  # what reads the files outlives the object that holds it
                for scratch in scratches:
                    weakref.finalize(owner, scratch.remove)
            else:
                for scratch in scratches:
                    scratch.remove()
            return result

        return call

    return decorate


def _like(original: Any, local: Path) -> Any:
    return str(local) if isinstance(original, str) else local


def _swap(text: str, names: dict[str, str]) -> str:
    for local, url in names.items():
        text = text.replace(local, url)
    return text


def renamed_error(e: BaseException, names: dict[str, str]) -> BaseException:
    """``e`` with scratch paths replaced by their URLs in its message and file names (a copy of the
    same class; ``e`` itself when it cannot be copied)."""
    try:
        renamed = copy.copy(e)
        renamed.args = tuple(_swap(a, names) if isinstance(a, str) else a for a in e.args)
        if isinstance(e, OSError):
            for attribute in ("strerror", "filename", "filename2"):
                value = getattr(e, attribute, None)
                if isinstance(value, (str, os.PathLike)):
                    setattr(renamed, attribute, _swap(os.fspath(value), names))
        renamed.__traceback__ = e.__traceback__
        return renamed
    except Exception:  # noqa: BLE001 - an exception class that cannot be copied: report it as it is
        return e


def _relabel(result: Any, names: dict[str, str]) -> Any:
    """``result`` with scratch paths replaced by URLs: in strings and paths, inside dicts, lists and
    tuples, and in the fields of a dataclass (other objects are returned as they are)."""
    if isinstance(result, str):
        return _swap(result, names)
    if isinstance(result, Path):
        swapped = _swap(str(result), names)
        return result if swapped == str(result) else swapped
    if isinstance(result, dict):
        return {k: _relabel(v, names) for k, v in result.items()}
    if isinstance(result, (list, tuple)) and type(result) in (list, tuple):
        return type(result)(_relabel(v, names) for v in result)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        changes = {}
        for field in dataclasses.fields(result):
            value = getattr(result, field.name)
            new = _relabel(value, names)
            if new is not value and new != value:
                changes[field.name] = new
        if changes:
            try:
                return dataclasses.replace(result, **changes)
            except (TypeError, ValueError):
                return result
    return result
