"""Small documents (configs, indexes, manifests, headers) in JSON or YAML: the one place they are parsed.

Every JSON and YAML document shardwise reads goes through :func:`parse_json` or :func:`parse_yaml`,
which turn every way a hostile or damaged document can fail into one FormatError naming the file:
not UTF-8, not JSON/YAML, nested deeper than :data:`MAX_NESTING` (checked on the bytes before the
recursive parsers run, so neither they nor any recursive walk over the result can exhaust the
stack), and for YAML, aliases that refer to themselves or expand past :data:`MAX_YAML_NODES`.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
from pathlib import Path
from typing import Any, Iterator

from .errors import FormatError

__all__ = ["MAX_NESTING", "MAX_YAML_NODES", "collector_paused", "parse_json", "parse_json_object", "parse_yaml", "read_json_object", "document_bytes"]

# Real configs, indexes, tokenizers and headers nest fewer than 10 levels. 100 is ten times that and
# still far inside Python's recursion limit (1000) for the recursive parsers and for every walk over
# the result (json.dumps, comprehensions that take two frames a level).
MAX_NESTING = 100
# Nodes of a YAML document with every alias expanded: real model configs have a few hundred; a
# "billion laughs" document of a few lines expands to billions when it is dumped or walked.
MAX_YAML_NODES = 1_000_000

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')  # what the nesting scan deletes
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_PAIR_PASSES = 8  # deeper than real documents nest, so that what is left to count one by one is small


def _text(data: bytes | str, label: str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_nesting(data: bytes) -> int:
    """At least the deepest bracket nesting the JSON parser reaches on ``data``, valid or not (exact
    for valid JSON), in C-speed passes, a small fraction of the parse's time:

    - escaped backslashes, then escaped quotes are dropped (pairing left to right as inside
      strings; outside strings a backslash is where the parser stops), then all but quotes and
      brackets, then adjacent quotes (an empty string, or nothing between two strings);
    - of what is left every other run between quotes is a string: dropped;
    - up to ``_PAIR_PASSES`` times, adjacent open-close pairs are dropped, each pass lowering the
      deepest nesting by at most one; the rest is counted.
    """
    structure = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[::2])
    steps = structure.translate(_BRACKET_STEPS)
    passes = 0
    while passes < _PAIR_PASSES and (fewer := steps.replace(b"\x01\xff", b"")) != steps:
        steps, passes = fewer, passes + 1
    return passes + max(itertools.accumulate(memoryview(steps).cast("b"), initial=0))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (restored after; not nested across
    threads in any way that matters: at worst it runs again early). For blocks that build millions
    of objects and no reference cycles (parsing a document, describing a million tensors from it),
    where collecting only re-walks them: about as long again as the work itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_NESTED_TOO_DEEPLY = f"is nested too deeply: more than {MAX_NESTING} levels, which no real one has (corrupted or hostile?)"


def _too_deep(label: str, what: str) -> FormatError:
    return FormatError(f"{label}: {what} {_NESTED_TOO_DEEPLY}")


def parse_json(data: bytes | str, label: str, what: str, **hooks: Any) -> Any:
    """The JSON document in ``data`` (the bytes or text of file ``label``, which holds ``what``).

    FormatError naming ``label`` and ``what`` when it is not UTF-8, not JSON, or nested deeper
    than :data:`MAX_NESTING`; ``hooks`` go to :func:`json.loads` (``object_pairs_hook``), and
    exceptions they raise pass through. Thread-safe; linear in the document's size.

    >>> parse_json(b'{"a": [1]}', "config.json", "config")
    {'a': [1]}
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data  # lone surrogates: json.loads reports them
    text = _text(data, label)
    if _json_nesting(raw) > MAX_NESTING:
        raise _too_deep(label, what)
    try:
        with collector_paused():
            return json.loads(text, **hooks)
    except json.JSONDecodeError as e:
        raise FormatError(f"{label}: {what} is not valid JSON ({e})") from None
    except RecursionError:  # the scan bounds the nesting; this is the last line of defence
        raise _too_deep(label, what) from None


def parse_json_object(data: bytes | str, label: str, what: str) -> dict:
    """:func:`parse_json` of a document that must be an object; FormatError naming ``label`` otherwise."""
    document = parse_json(data, label, what)
    if not isinstance(document, dict):
        raise FormatError(f"{label}: {what} is not a JSON object")
    return document


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in file ``path``; FormatError naming the file and ``what`` it should be otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: {what} cannot be read ({e.strerror or e})") from None
    return parse_json_object(data, str(path), what)


def _yaml_problem(text: str) -> str | None:
    """Why YAML ``text`` is too deep or too large to build (None when it is not), from its event
    stream (PyYAML's parser keeps explicit stacks; its composer and constructor recurse): nesting
    counts aliases expanded in place, an alias inside the collection it names is refused, and
    nodes are counted with every alias expanded. Malformed text is left to the loader to report."""
    import yaml
    from yaml import events

    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (height, expanded nodes)
    stack: list[list] = []  # open collections: [anchor, height of deepest child, nodes]
    total = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, events.CollectionStartEvent):
                stack.append([event.anchor, 0, 1])
                if len(stack) > MAX_NESTING:
                    return _NESTED_TOO_DEEPLY
                continue
            if isinstance(event, events.CollectionEndEvent):
                anchor, height, nodes = stack.pop()
                height += 1
            elif isinstance(event, events.ScalarEvent):
                anchor, height, nodes = event.anchor, 0, 1
            elif isinstance(event, events.AliasEvent):
                if any(open_anchor == event.anchor for open_anchor, _, _ in stack):
                    return f"alias *{event.anchor} refers to a collection that contains it"
                anchor, (height, nodes) = None, sizes.get(event.anchor, (0, 0))
                if len(stack) + height > MAX_NESTING:
                    return f"alias *{event.anchor} expands to more than {MAX_NESTING} levels of nesting, which no real one has (hostile?)"
                if total + sum(entry[2] for entry in stack) + nodes > MAX_YAML_NODES:  # only aliases multiply nodes
                    return f"expands (aliases followed) to more than {MAX_YAML_NODES} values, which no real one does (hostile?)"
            else:
                continue
            if anchor is not None:
                sizes[anchor] = (height, nodes)
            if stack:
                stack[-1][1] = max(stack[-1][1], height)
                stack[-1][2] += nodes
            else:
                total += nodes
    except yaml.YAMLError:
        return None
    return None


def parse_yaml(data: bytes | str, label: str, what: str) -> Any:
    """The YAML document in ``data`` (the bytes or text of file ``label``, which holds ``what``),
    built by PyYAML's safe loader: plain data, nothing imported or called.

    FormatError naming ``label`` and ``what`` when it is not UTF-8, not YAML, nested deeper than
    :data:`MAX_NESTING` (aliases expanded) or larger than :data:`MAX_YAML_NODES` values (aliases
    expanded), or has an alias inside the collection it names. Thread-safe.

    >>> parse_yaml(b"a: [1, 2]", "model_config.yaml", "model config")
    {'a': [1, 2]}
    """
    import yaml

    text = _text(data, label)
    problem = _yaml_problem(text)
    if problem:
        raise FormatError(f"{label}: {what} {problem}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FormatError(f"{label}: {what} is not readable YAML ({getattr(e, 'problem', None) or type(e).__name__}{where})") from None
    except RecursionError:  # the scan bounds the nesting; this is the last line of defence
        raise _too_deep(label, what) from None


def document_bytes(document: dict) -> bytes:
    """A manifest as written: JSON indented by one, a final newline, UTF-8."""
    return (json.dumps(document, indent=1) + "\n").encode("utf-8")
