"""Reading pickles without running them.

:class:`RestrictedUnpickler` resolves every global a pickle names through an allow-list of
stand-ins. Torch's tensor-rebuild functions become :class:`LazyTensor` records (storage key,
offset, shape, strides: no data is read); containers that checkpoints commonly carry
(``OrderedDict``, ``argparse.Namespace``, OmegaConf ``DictConfig``/``ListConfig``, Lightning's
``AttributeDict``, ``pathlib`` paths, numpy scalars) become inert records that :func:`to_plain`
turns into plain Python data. None of the named classes is imported, so no code from the file and
no ``__setstate__`` of a third-party class runs. Any other global raises
:class:`UnsafeCheckpointError` naming it, unless the caller passes ``trust=True``, which falls
back to importing it (the ``--trust-pickle`` opt-in).

This is stricter than ``torch.load(weights_only=True)``: the same tensors and containers load,
but nothing is imported to do so. It is also bounded: the memo is a dict (a memo index costs one
entry, however large), no tuple or frozenset may expand to more than :data:`MAX_NODES` nodes, and
nothing whose expansion exceeds :data:`MAX_KEY_NODES` is hashed, so a pickle whose keys are
self-sharing tuples (``t = (t, t)`` eighty times over, 167 bytes) is refused instead of hashed for
2**80 steps.
"""

from __future__ import annotations

import _compat_pickle
import collections
import datetime
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from . import dtypes
from .errors import FormatError, UnsafeCheckpointError

__all__ = [
    "RestrictedUnpickler",
    "LazyTensor",
    "StorageRef",
    "PickledObject",
    "to_plain",
    "iter_tensors",
    "describe",
]


# -- records produced instead of real objects --------------------------------------------------
def _refuse_setstate(self, state: Any) -> None:
    # dataclass(slots=True, frozen=True) would otherwise add a __setstate__ that BUILD could use
    raise pickle.UnpicklingError(f"a pickle tried to modify a {type(self).__name__} record")


@dataclass(frozen=True, slots=True)
class DTypeRef:
    """A torch dtype named by a pickle (``torch.float32``) or implied by a typed storage class."""

    __setstate__ = _refuse_setstate

    name: str


@dataclass(frozen=True, slots=True)
class StorageClassRef:
    """``torch.FloatStorage`` & co. (dtype known) or ``torch.storage.UntypedStorage`` (dtype None)."""

    __setstate__ = _refuse_setstate

    dtype: str | None


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage record in the file: ``key`` names its bytes, ``numel`` counts elements of ``dtype``
    (bytes when ``dtype`` is None, as for UntypedStorage)."""

    __setstate__ = _refuse_setstate

    key: str
    dtype: str | None
    numel: int


@dataclass(frozen=True, slots=True)
class LazyTensor:
    """A tensor described by a pickle: a view (offset, shape, strides in elements) of a storage."""

    __setstate__ = _refuse_setstate

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str


@dataclass
class PickledObject:
    """An allow-listed object rebuilt as a record: its class name, constructor args and state."""

    type_name: str
    args: tuple = ()
    state: Any = None
    items: dict = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:  # dict subclasses are pickled with SETITEMS
        self.items[key] = value


@dataclass(frozen=True, slots=True)
class TypeRef:
    """A class mentioned as a value (OmegaConf stores ``typing.Any`` and ``dict`` in its metadata)."""

    __setstate__ = _refuse_setstate

    qualname: str


def describe(value: Any, depth: int = 2) -> str:
    """A short text for an unpickled value in an error message, in bounded work whatever it holds.

    ``repr`` is not safe here: a pickle can share lists into a structure whose repr doubles with
    every level (``l = [l, l]`` eighty times over). At most 6 items per container, ``depth`` levels.

    >>> describe([1, [2, [3, [4]]], "x" * 50])
    "[1, [2, [...]], 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'...]"
    """
    if value is None or type(value) in (bool, float):
        return repr(value)
    if type(value) is int:
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if type(value) is str:
        return repr(value[:30]) + ("..." if len(value) > 30 else "")
    if type(value) in (list, tuple):
        if depth == 0:
            return "[...]" if type(value) is list else "(...)"
        items = ", ".join(describe(item, depth - 1) for item in value[:6]) + (", ..." if len(value) > 6 else "")
        return f"[{items}]" if type(value) is list else f"({items})"
    if isinstance(value, type):
        return f"<class {getattr(value, 'type_name', value.__qualname__)}>"
    return f"<{type(value).__name__}>"


# -- stand-ins for the allowed globals ---------------------------------------------------------
def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**62


_MAX_DIMS = 64  # torch refuses tensors of more dimensions; a LazyTensor's hash walks its shape


def _view(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: str) -> LazyTensor:
    """A LazyTensor after checking that offset, shape and strides are non-negative ints of one rank (at most 64)."""
    if not (
        _is_count(storage_offset)
        and isinstance(size, (tuple, list))
        and isinstance(stride, (tuple, list))
        and len(size) == len(stride) <= _MAX_DIMS
        and all(map(_is_count, size))
        and all(map(_is_count, stride))
    ):
        raise pickle.UnpicklingError(
            f"invalid tensor view: offset {describe(storage_offset)}, shape {describe(size)}, stride {describe(stride)}"
        )
    return LazyTensor(storage, storage_offset, tuple(size), tuple(stride), dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, StorageRef) or storage.dtype is None:
        raise pickle.UnpicklingError("_rebuild_tensor_v2 expects a typed storage")
    return _view(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(storage, StorageRef) or not isinstance(dtype, DTypeRef):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 expects an untyped storage and a dtype")
    return _view(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """A tensor subclass (``Parameter``) as torch pickles it: ``func(*args)`` rebuilds the tensor;
    ``func`` must be one of the tensor rebuilders above (anything else could reach a constructor
    past the unpickler's checks)."""
    if not (isinstance(func, _Guarded) and func._fn in _TENSOR_REBUILDERS and isinstance(args, tuple)):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 expects a tensor rebuild function and its arguments")
    return func(*args)


_TENSOR_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _record_class(qualname: str) -> type:
    """A stand-in for an allow-listed class: instances record constructor args and BUILD state."""

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls only __new__, so record the args here
        obj = object.__new__(cls)
        PickledObject.__init__(obj, qualname, args)
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args) as well: nothing more to do
        pass

    return type(qualname.rsplit(".", 1)[-1], (PickledObject,), {"__new__": __new__, "__init__": __init__, "type_name": qualname})


def _dict_class(qualname: str) -> type:
    """A stand-in for an allow-listed dict subclass (items arrive with SETITEMS)."""
    return type(qualname.rsplit(".", 1)[-1], (_StandinDict,), {"type_name": qualname})


class _StandinDict(dict):
    """Base for dict subclasses (AttributeDict): items arrive with SETITEMS."""

    type_name = "dict"


def _reconstructor(cls, base, state):
    """copyreg._reconstructor for protocol 0/1 pickles, limited to allow-listed classes."""
    if isinstance(cls, type) and issubclass(cls, (PickledObject, _StandinDict)):
        return cls.__new__(cls)
    if cls in _SAFE_BUILTIN_TYPES and base in _SAFE_BUILTIN_TYPES and state is None:
        # protocol 0/1 pickle a bare object() this way; a state would reach bytes.__new__(bytes, 10**12)
        # or frozenset.__new__ (hashing) past every check
        return base.__new__(cls)
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {describe(cls)} is not allowed")


def _codecs_encode(text, encoding="utf-8"):
    # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed on text")
    return text.encode(encoding)


def path_from_parts(*parts):
    """``pathlib.PurePath(*parts)`` as a string; parts must be strings (str() of a structure can grow exponentially)."""
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError("a pickled path has parts that are not strings")
    return "/".join(parts).replace("//", "/")


def torch_size(dims=()):
    """``torch.Size(dims)`` as a plain tuple."""
    return tuple(dims)


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise pickle.UnpicklingError("torch.device() is only allowed on a name and an index")
    return f"{kind}:{index}" if index is not None else kind


def _numpy_scalar(dtype, data=None):
    return PickledObject("numpy.scalar", (dtype, data))


def _typed_storage(name: str):
    return StorageClassRef(dtypes.from_storage_class(name).name)


def _untyped_storage_ref():
    return StorageClassRef(None)


_SAFE_BUILTIN_TYPES = (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool, object, slice)
# what each builtin constructor may be called with: never a size (bytes(10**12)) or a structure
# (str() of a self-sharing structure grows exponentially)
_CONSTRUCTOR_ARGS = {
    bytes: (str, bytes), bytearray: (str, bytes),
    str: (str, bytes, int, float, bool), int: (str, bytes, int, float, bool),
    float: (str, int, float, bool), complex: (str, int, float, bool),
}


class _Guarded:
    """An allow-listed callable as pickles see it: it can be called, but BUILD cannot modify it.

    Builtin constructors are limited to the argument types in ``_CONSTRUCTOR_ARGS``. A new set of
    these objects is made for every load, so no file can change how another one is read.
    """

    __slots__ = ("_fn", "_arg_types", "type_name")

    def __init__(self, fn: Callable, type_name: str) -> None:
        self._fn = fn
        self._arg_types = _CONSTRUCTOR_ARGS.get(fn)
        self.type_name = type_name

    def __call__(self, *args, **kwargs):
        if self._arg_types is not None and not all(isinstance(a, self._arg_types) for a in (*args, *kwargs.values())):
            raise pickle.UnpicklingError(f"{self.type_name}() is only allowed on {', '.join(t.__name__ for t in self._arg_types)}")
        return self._fn(*args, **kwargs)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"a pickle tried to modify the allow-listed {self.type_name}")

    def __reduce__(self):
        raise TypeError("allow-list entries are not picklable")


_STANDIN_CLASSES = [
    "argparse.Namespace",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
    "omegaconf.nodes.UnionNode",
    "numpy.ndarray",
    "numpy.dtype",
    "torch.torch_version.TorchVersion",
    "torch_xla.utils.serialization.TensorReference",  # xser reference files (resolved by formats.xser)
    "_io.BytesIO",  # Transformer Engine's _extra_state in NeMo/Megatron-core checkpoints (kept as inert bytes)
]
ATTRIBUTE_DICTS = (  # Lightning's dict with attribute access, by every name it is importable under
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)
_STANDIN_DICTS = ATTRIBUTE_DICTS
_TYPE_REFS = ["typing.Any", "typing.Dict", "typing.List", "typing.Optional", "typing.Union", "builtins.NoneType"]


def _build_allowlist() -> dict[tuple[str, str], Any]:
    """A fresh allow-list (new stand-in classes and callables) for one load."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): lambda *args: {},  # the factory (resolved safely) is dropped
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): TypeRef("torch.nn.Parameter"),
        ("torch", "Tensor"): TypeRef("torch.Tensor"),
        ("torch._tensor", "Tensor"): TypeRef("torch.Tensor"),
        ("torch", "Size"): torch_size,
        ("torch", "device"): _torch_device,
        ("torch.storage", "UntypedStorage"): _untyped_storage_ref(),
        ("torch", "UntypedStorage"): _untyped_storage_ref(),
        ("copyreg", "_reconstructor"): _reconstructor,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy.core.multiarray", "_reconstruct"): lambda *args: PickledObject("numpy.ndarray", args),
        ("numpy._core.multiarray", "_reconstruct"): lambda *args: PickledObject("numpy.ndarray", args),
        ("numpy.core.numeric", "_frombuffer"): lambda *args: PickledObject("numpy.ndarray", args),
        ("numpy._core.numeric", "_frombuffer"): lambda *args: PickledObject("numpy.ndarray", args),
        ("datetime", "datetime"): datetime.datetime,
        ("datetime", "date"): datetime.date,
        ("datetime", "timedelta"): datetime.timedelta,
    }
    for d in dtypes.DTYPES:
        allowed[("torch", d.name)] = DTypeRef(d.name)
        if d.storage_class:
            allowed[("torch", d.storage_class)] = _typed_storage(d.storage_class)
    for cls in _SAFE_BUILTIN_TYPES:
        allowed[("builtins", cls.__name__)] = cls  # classes: what REDUCE calls is wrapped below
    for module in ("pathlib", "pathlib._local"):
        for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
            allowed[(module, name)] = path_from_parts
    for qualname in _STANDIN_CLASSES:
        module, name = qualname.rsplit(".", 1)
        allowed[(module, name)] = _record_class(qualname)
    for qualname in _STANDIN_DICTS:
        module, name = qualname.rsplit(".", 1)
        allowed[(module, name)] = _dict_class(qualname)
    for qualname in _TYPE_REFS:
        module, name = qualname.rsplit(".", 1)
        allowed[(module, name)] = TypeRef(qualname)
    return {key: _guard(key, value) for key, value in allowed.items()}


def _guard(key: tuple[str, str], value: Any) -> Any:
    """Wrap plain functions and builtin constructors; records and fresh stand-in classes stay as they are."""
    if isinstance(value, (DTypeRef, StorageClassRef, TypeRef)):
        return value
    if isinstance(value, type) and issubclass(value, (PickledObject, _StandinDict)):
        return value  # made for this load only
    if key[0] == "builtins":
        # NEWOBJ needs real classes for containers; scalar constructors are guarded
        return _Guarded(value, type_name=key[1]) if value in _CONSTRUCTOR_ARGS else value
    return _Guarded(value, type_name=".".join(key))


MAX_NODES = 1_000_000  # far above any real checkpoint's object count (~10 per tensor), far below a bomb
# What one hash may cost, in nodes with shared references expanded (a tuple's items, an int's 64-bit
# words). Real keys and set items are strings, numbers and tuples of a few of them; this bound keeps
# the hashing a pickle can cause within a few microseconds per opcode, the cost of reading the opcode.
MAX_KEY_NODES = 1_000
# Python's int hashes are not randomised: ints that differ by a multiple of this modulus hash alike,
# so a pickle of n such keys makes a dict take n**2 steps (20,000 keys, 260 KB: 10 s). Ints inside
# (-modulus, modulus) never collide beyond -1/-2; real keys (indices, ids) are well inside.
_HASH_MODULUS = sys.hash_info.modulus
_HASHING_CONSTRUCTORS = {dict: "pairs", collections.OrderedDict: "pairs", set: "items", frozenset: "items"}
# Work the calls of a pickle (REDUCE, NEWOBJ, OBJ, INST, BUILD) may do, counted as the items and
# characters of the containers and strings handed to them, per byte of input. A real pickle hands
# over what it has just spelled out, at least a byte per item; one that hands a large object over
# again and again through the memo (list(big), _codecs.encode(big), 2 bytes a copy) copies
# quadratically and fills memory. The floor covers tiny pickles.
CALL_WORK_PER_BYTE = 8
CALL_WORK_FLOOR = 1 << 20
_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)


def _has_colliding_int(key: Any) -> bool:
    """Whether ``key`` (at most MAX_KEY_NODES nodes: checked first) holds an int at or beyond the hash modulus."""
    if type(key) is int:
        return not -_HASH_MODULUS < key < _HASH_MODULUS
    return type(key) in (tuple, frozenset) and any(map(_has_colliding_int, key))


def _remaining_bytes(file) -> int:
    """Bytes from ``file``'s position to its end (0 when it cannot seek)."""
    try:
        here = file.tell()
        end = file.seek(0, 2)
        file.seek(here)
    except (AttributeError, OSError, ValueError):
        return 0
    return max(0, end - here)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that only resolves allow-listed globals, each to an inert stand-in.

    ``persistent_load`` receives torch's storage records; the caller maps them to
    :class:`StorageRef`. ``path`` is named in every error; ``seen``, when given, collects the
    qualified name of every global the pickle names. With ``trust=True`` unknown globals are
    imported as the standard unpickler would (executing whatever they do); torch tensors still load
    lazily.

    Built on the pure-Python unpickler so that every opcode can be checked: the memo is a dict, a
    tuple or frozenset expanding to more than :data:`MAX_NODES` nodes is refused as it is built,
    a key or set item expanding to more than :data:`MAX_KEY_NODES` nodes is refused before it is
    hashed, and calls may do :data:`CALL_WORK_PER_BYTE` units of work per byte from ``file``'s
    position to its end (FormatError naming ``path``). Not thread-safe; one instance per load.
    """

    dispatch = pickle._Unpickler.dispatch.copy()

    def __init__(
        self, file, *, path: str, persistent_load: Callable[[Any], Any] | None = None, trust: bool = False, seen: set[str] | None = None,
        allowed: dict[tuple[str, str], Any] | None = None,
    ):
        super().__init__(file)
        self._seen = seen
        self._allowed = _build_allowlist() if allowed is None else allowed  # ``allowed``: a narrower list (DCP metadata)
        self._path = path
        self._trust = trust
        self._persistent = persistent_load
        self._sizes: dict[int, tuple[Any, int]] = {}  # id -> (tuple or frozenset, kept alive so ids stay unique; its size)
        self._work_left = CALL_WORK_PER_BYTE * _remaining_bytes(file) + CALL_WORK_FLOOR

    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles name Python 2 globals (__builtin__.long, copy_reg); map them as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if self._seen is not None:
            self._seen.add(f"{module}.{name}")
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if self._trust:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._path}: refused to load: the pickle asks for the global '{module}.{name}', which is not on "
            "shardwise's allow-list of safe types, and nothing in the file was executed; pass --trust-pickle "
            "(trust_pickle=True) only if you trust where this file came from"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("unexpected persistent id in a plain pickle")
        return self._persistent(pid)

    # -- sizes: what hashing (or printing) a value walks, shared references counted each time -----
    def _size(self, obj: Any) -> int:
        """Nodes in ``obj`` with shared references expanded: tuples and frozensets 1 + their items'
        sizes (remembered per object, so each is summed once), ints one per 64-bit word, others 1."""
        kind = type(obj)
        if kind is int:
            return 1 + obj.bit_length() // 64
        if kind is not tuple and kind is not frozenset:
            return 1
        known = self._sizes.get(id(obj))
        if known is not None:
            return known[1]
        size = 1 + sum(map(self._size, obj))
        if size > MAX_NODES:
            raise FormatError(
                f"{self._path}: refused to load: the pickle builds a {kind.__name__} of more than {MAX_NODES:,} nodes "
                "out of shared references (a hashing bomb); no real checkpoint holds one"
            )
        self._sizes[id(obj)] = (obj, size)
        return size

    def _check_keys(self, keys) -> None:
        """Refuse, before hashing, any of ``keys`` that would cost more than MAX_KEY_NODES steps or
        holds an int whose hash can be made to collide with others (outside ±_HASH_MODULUS)."""
        for key in keys:
            if self._size(key) > MAX_KEY_NODES:
                raise FormatError(
                    f"{self._path}: refused to load: a dict key or set item of the pickle is a structure of more than "
                    f"{MAX_KEY_NODES:,} nodes (a hashing bomb); real keys are names, numbers and short tuples"
                )
            if _has_colliding_int(key):
                raise FormatError(
                    f"{self._path}: refused to load: a dict key or set item of the pickle holds an integer beyond "
                    f"±{_HASH_MODULUS:,}, whose hash can be chosen to collide with others (a hash-flooding bomb)"
                )

    def _charge(self, values: Any) -> None:
        """Count what a call or BUILD is handed (``values``: its arguments) against the work budget."""
        if not isinstance(values, (tuple, list, dict)):
            return
        values = values.values() if isinstance(values, dict) else values
        self._work_left -= len(values) + sum(len(v) for v in values if isinstance(v, _SIZED))
        if self._work_left < 0:
            raise FormatError(
                f"{self._path}: refused to load: the pickle's calls copy more than {CALL_WORK_PER_BYTE} items per byte "
                "of the file (a large object handed over again and again through the memo: a copying bomb)"
            )

    def _check_call(self, func: Any, args: Any, kwargs: Any = None) -> None:
        """Before ``func(*args, **kwargs)``: charge the work, and the keys a dict/set constructor
        would hash pass :meth:`_check_keys`."""
        self._charge(args)
        self._charge(kwargs)
        target = func._fn if isinstance(func, _Guarded) else func
        how = next((v for k, v in _HASHING_CONSTRUCTORS.items() if target is k), None)
        if how is None or not isinstance(args, (tuple, list)):
            return
        for arg in args:
            if isinstance(arg, (dict, str, bytes)):
                continue  # a dict's keys were checked as they went in; strings iterate into characters
            items = list(arg) if isinstance(arg, (tuple, list, set, frozenset)) else ()
            if how == "pairs":
                items = [pair[0] for pair in items if isinstance(pair, (tuple, list)) and pair]
            self._check_keys(items)

    def _check_top(self) -> None:
        """Size what an opcode or call just pushed, if it is a tuple or frozenset."""
        self._size(self.stack[-1])

    def _load_tuple_checked(self, load: Callable) -> None:
        load(self)
        self._check_top()

    def _load_frozenset(self) -> None:
        self._check_keys(self.stack)  # the items after the mark
        pickle._Unpickler.load_frozenset(self)
        self._check_top()

    def _load_dict(self) -> None:
        self._check_keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)

    def _load_setitem(self) -> None:
        self._check_keys(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)

    def _load_setitems(self) -> None:
        self._check_keys(self.stack[0::2])
        pickle._Unpickler.load_setitems(self)

    def _load_additems(self) -> None:
        self._check_keys(self.stack)
        pickle._Unpickler.load_additems(self)

    def _load_reduce(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_reduce(self)
        self._check_top()

    def _load_newobj(self) -> None:
        cls, args = self.stack[-2], self.stack[-1]
        if not isinstance(cls, type):
            raise pickle.UnpicklingError("NEWOBJ class argument isn't a type object")
        self._check_call(cls, args)
        pickle._Unpickler.load_newobj(self)
        self._check_top()

    def _load_newobj_ex(self) -> None:
        cls, args, kwargs = self.stack[-3:]
        if not isinstance(cls, type):
            raise pickle.UnpicklingError("NEWOBJ_EX class argument isn't a type object")
        self._check_call(cls, args, kwargs)
        pickle._Unpickler.load_newobj_ex(self)
        self._check_top()

    def _load_build(self) -> None:
        self._charge(self.stack[-1:])  # the state: an inst's __dict__ is updated item by item
        pickle._Unpickler.load_build(self)

    def _instantiate(self, klass, args):  # OBJ and INST
        self._check_call(klass, args)
        super()._instantiate(klass, args)
        self._check_top()

    for _op, _load in [
        (pickle.TUPLE, pickle._Unpickler.load_tuple), (pickle.TUPLE1, pickle._Unpickler.load_tuple1),
        (pickle.TUPLE2, pickle._Unpickler.load_tuple2), (pickle.TUPLE3, pickle._Unpickler.load_tuple3),
    ]:
        dispatch[_op[0]] = lambda self, load=_load: self._load_tuple_checked(load)
    dispatch[pickle.FROZENSET[0]] = _load_frozenset
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build
    del _op, _load


def storage_ref(pid: Any, path: str) -> StorageRef:
    """Turn torch's persistent id ``('storage', storage_class, key, location, numel[, view])`` into a StorageRef."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise FormatError(f"{path}: unexpected persistent id (a {type(pid).__name__}) in torch pickle")
    storage_class, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_class, StorageClassRef):
        raise FormatError(f"{path}: storage of unsupported type {type(storage_class).__name__}")
    if not isinstance(key, str) or not _is_count(numel):
        raise FormatError(f"{path}: storage record with a key of type {type(key).__name__} and a size of type {type(numel).__name__}")
    return StorageRef(key, storage_class.dtype, numel)


class StructureError(ValueError):
    """An unpickled structure is cyclic or too large to walk (a "billion laughs" pickle)."""


class _Walk:
    """Guards a recursive walk: cycles are errors, and the total number of visits is bounded."""

    def __init__(self) -> None:
        self.visits = 0
        self.path: set[int] = set()

    def enter(self, obj: Any) -> None:
        self.visits += 1
        if self.visits > MAX_NODES:
            raise StructureError(f"the pickled structure has more than {MAX_NODES:,} nodes (shared references?)")
        if id(obj) in self.path:
            raise StructureError("the pickled structure contains a reference cycle")
        self.path.add(id(obj))

    def leave(self, obj: Any) -> None:
        self.path.discard(id(obj))


def iter_tensors(obj: Any, prefix: str = "") -> list[tuple[str, LazyTensor]]:
    """All LazyTensors inside nested dicts/lists/tuples, with dotted names (``a.b.0.c``), in order.

    Raises StructureError for cyclic structures or ones too large to walk.
    """
    found: list[tuple[str, LazyTensor]] = []
    walk = _Walk()

    def visit(value: Any, name: str) -> None:
        if isinstance(value, LazyTensor):
            found.append((name, value))
            return
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        else:
            return
        walk.enter(value)
        for key, item in items:
            visit(item, f"{name}.{key}" if name else str(key))
        walk.leave(value)

    visit(obj, prefix)
    return found


def _omegaconf_value(obj: PickledObject, walk: _Walk) -> Any:
    state = obj.state if isinstance(obj.state, dict) else {}
    if "_content" in state:
        return to_plain(state["_content"], walk)
    if "_val" in state:
        return to_plain(state["_val"], walk)
    return None


def to_plain(obj: Any, _walk: _Walk | None = None) -> Any:
    """Turn unpickled records into JSON-friendly Python: dicts, lists, strings, numbers, None.

    Tensors become ``{"tensor": {"shape": [...], "dtype": "..."}}``; OmegaConf containers their
    content; Namespaces and other records their attribute dicts; classes their qualified names.
    Raises StructureError for cyclic structures or ones too large to walk.
    """
    walk = _walk or _Walk()
    if isinstance(obj, (dict, list, tuple, set, frozenset, PickledObject)):
        walk.enter(obj)
        try:
            return _plain_container(obj, walk)
        finally:
            walk.leave(obj)
    return _plain_container(obj, walk)


def _plain_container(obj: Any, walk: _Walk) -> Any:
    to_plain_ = lambda value: to_plain(value, walk)  # noqa: E731 - one walk for the whole tree
    if isinstance(obj, LazyTensor):
        return {"tensor": {"shape": list(obj.shape), "dtype": obj.dtype}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, _StandinDict):
        return {str(k): to_plain_(v) for k, v in obj.items()}
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): to_plain_(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain_(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, (DTypeRef,)):
        return f"torch.{obj.name}"
    if isinstance(obj, TypeRef):
        return obj.qualname
    if isinstance(obj, type):
        return getattr(obj, "type_name", f"{obj.__module__}.{obj.__qualname__}")
    if isinstance(obj, (datetime.date, datetime.timedelta)):
        return str(obj)
    if isinstance(obj, PickledObject):
        kind = obj.type_name
        if kind.startswith("omegaconf."):
            return _omegaconf_value(obj, walk)
        if kind == "torch.torch_version.TorchVersion":
            return obj.args[0] if obj.args and isinstance(obj.args[0], str) else None
        if kind == "numpy.scalar":
            return _numpy_scalar_value(obj)
        if isinstance(obj.state, dict):
            return {str(k): to_plain_(v) for k, v in obj.state.items()}
        return f"<{kind}>"
    if isinstance(obj, complex):
        return str(obj)
    return repr(obj)


def _numpy_scalar_value(obj: PickledObject) -> Any:
    """Decode a pickled numpy scalar of a plain numeric dtype; anything else stays a description."""
    try:
        import numpy as np

        dtype_rec, data = obj.args
        code = dtype_rec.args[0] if isinstance(dtype_rec, PickledObject) and dtype_rec.args else None
        if isinstance(code, str) and np.dtype(code).kind in "biuf" and isinstance(data, bytes):
            return np.frombuffer(data, dtype=np.dtype(code))[0].item()
    except Exception:
        pass
    return "<numpy scalar>"
