"""Megatron-core distributed checkpoints (``torch_dist`` backend), read lazily and in place.

NeMo keeps a Megatron-core model's weights as a ``model_weights/`` folder written by
``megatron.core.dist_checkpointing.save`` (a NeMo 2 ``weights/`` folder is the same format):

- ``metadata.json``: the backends that wrote it, ``{"sharded_backend": "torch_dist",
  "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}``;
- ``.metadata`` and ``__R_K.distcp``: a PyTorch DCP checkpoint (:mod:`.dcp`) of one flat dict
  whose keys are Megatron's global, parallelism-independent keys (``model.embedding...``);
- ``common.pt``: the state that is not sharded, a ``torch.save`` pickle. It is not read here:
  every parameter of a Megatron-core model is a sharded tensor in the DCP part.

Megatron's ``TransformerBlock`` saves each layer tensor under one key for all layers, stacked on
a leading axis: ``model.decoder.layers.self_attention.linear_qkv.weight`` has shape
``[num_layers, ...]``, and each layer (each tensor-parallel piece of it) is a chunk of its own at
offset ``[layer, ...]`` (``ShardedTensor.prepend_axis_num``). :class:`TorchDistSource` shows the
tensors a plain state dict of the model has instead (``model.decoder.layers.3.self_attention...``):
layer ``i`` is tiled by the layer-``i`` slices of the chunks that hold it, and such a slice is one
contiguous byte range of its chunk, so a layer is read without touching any other.

Rules: a key is stacked when a ``layers`` component is followed by a component that is not a
number; every stacked key under the same prefix must have the same number of layers.
TransformerEngine's ``_extra_state`` entries (fp8 scaling metadata, saved as byte objects) are
not weights and are skipped, and so are ``_extra_state`` tensors should a writer store any.

NeMo 2 saves the same keys under ``module.`` instead of ``model.`` (``MegatronParallel`` adds a
``module.`` prefix per model chunk), next to optimizer states under other keys
(``optimizer.state.exp_avg.module.decoder...``). With a ``prefix`` (``NEMO2_PREFIX``, chosen
automatically when model keys start with ``module.`` and none with ``model.``) only the keys under
the stored prefix are weights, shown under the NeMo 1 names; the rest are counted as skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Hashable

from ..errors import FormatError
from ..jsonfile import parse_json_object
from ..layout.stream import TiledSource
from ..layout.tiles import TiledTensor
from ..tensors import FileTensorSource, StoredTensor, TensorInfo, contiguous_strides
from .dcp import METADATA, DcpChunk, DcpFiles, DcpSource, as_files, chunk_tiles

__all__ = ["BACKEND_FILE", "COMMON_FILE", "NEMO2_PREFIX", "looks_like_torch_dist", "read_backend", "unstacked_name", "TorchDistSource"]

BACKEND_FILE = "metadata.json"
COMMON_FILE = "common.pt"
_BACKEND = "torch_dist"
_VERSIONS = (1,)
_EXTRA_STATE = "_extra_state"
_MAX_BACKEND_BYTES = 1 << 20
# Layers of one stacked key: the deepest models have a few hundred. Each layer becomes tensors of its
# own, and a stack without elements (shape (2**40, 0)) has no bytes that would bound their count.
_MAX_LAYERS = 1 << 14
NEMO2_PREFIX = ("module.", "model.")  # (stored, shown): NeMo 2's weights/ keys as the mcore names of NeMo 1's model_weights/


def looks_like_torch_dist(files: "str | os.PathLike | DcpFiles") -> bool:
    """Whether ``files`` hold a Megatron ``metadata.json`` (any backend: a zarr one is then refused by name)."""
    try:  # _read_json refuses a missing or oversized file as FormatError
        return "sharded_backend" in _read_json(as_files(files))
    except FormatError:
        return False


def _read_json(files: DcpFiles) -> dict:
    from .region import open_region

    path, region = files.path(BACKEND_FILE), files.region(BACKEND_FILE)
    if region is None:
        raise FormatError(f"{path}: missing; a Megatron distributed checkpoint names its backend there")
    if region.size > _MAX_BACKEND_BYTES:
        raise FormatError(f"{path}: {region.size} bytes is too large for a backend description")
    with open_region(region) as f:
        raw = f.read()
    return parse_json_object(raw, path, "the backend description")


def read_backend(files: "str | os.PathLike | DcpFiles") -> dict:
    """``metadata.json``, checked to name the torch_dist backend shardwise reads; FormatError naming the file."""
    files = as_files(files)
    path = files.path(BACKEND_FILE)
    backend = _read_json(files)
    name, version = backend.get("sharded_backend"), backend.get("sharded_backend_version", 1)
    if name != _BACKEND:
        hint = " (convert it with NeMo's scripts/checkpoint_converters/convert_zarr_to_torch_dist.py first)" if name == "zarr" else ""
        raise FormatError(f"{path}: sharded backend {name!r}: shardwise reads {_BACKEND} checkpoints only{hint}")
    if version not in _VERSIONS:
        raise FormatError(f"{path}: {_BACKEND} version {version!r}; shardwise reads version {', '.join(map(str, _VERSIONS))}")
    if files.region(METADATA) is None:
        raise FormatError(f"{files.path(METADATA)}: missing; {path} names {_BACKEND}, whose tensors are listed there")
    return backend


def unstacked_name(key: str) -> tuple[str, str] | None:
    """(prefix, rest) of a stacked key, its per-layer names being ``f"{prefix}layers.{i}.{rest}"``; None when not stacked.

    >>> unstacked_name("model.decoder.layers.mlp.linear_fc1.weight")
    ('model.decoder.', 'mlp.linear_fc1.weight')
    >>> unstacked_name("model.decoder.layers.0.mlp.linear_fc1.weight") is None
    True
    """
    parts = key.split(".")
    for at, part in enumerate(parts[:-1]):
        if part == "layers" and not parts[at + 1].isdigit():
            return "".join(p + "." for p in parts[:at]), ".".join(parts[at + 1:])
    return None


def _auto_prefix(keys: list[str]) -> tuple[str, str] | None:
    """NEMO2_PREFIX when the model keys are NeMo 2's (``module.``) and none are NeMo 1's (``model.``)."""
    stored, shown = NEMO2_PREFIX
    if any(k.startswith(stored) for k in keys) and not any(k.startswith(shown) for k in keys):
        return NEMO2_PREFIX
    return None


@dataclass(frozen=True)
class _LayerSlice:
    """Index ``index`` along the leading axis of the DCP chunk ``chunk_ref`` (a ref of :class:`DcpSource`)."""

    chunk_ref: tuple[str, str, DcpChunk]
    index: int


class _Slices(FileTensorSource):
    """Layer slices of stored chunks, registered as stored tensors of their own (so rows can be read by name)."""

    def entry(self, ref: _LayerSlice, chunk: StoredTensor) -> StoredTensor:
        fqn, _, dcp_chunk = ref.chunk_ref
        name = f"{fqn}@{list(dcp_chunk.offsets)}[{ref.index}]"
        found = self._tensors.get(name)
        if found is None:
            info = chunk.info
            strides = chunk.strides or contiguous_strides(info.shape)
            found = self._tensors[name] = StoredTensor.make(
                TensorInfo(name, info.shape[1:], info.dtype), chunk.path, chunk.offset + ref.index * strides[0] * info.itemsize, strides[1:],
            )
        return found


class TorchDistSource(TiledSource):
    """The tensors of a ``torch_dist`` checkpoint with its layers unstacked (see the module docstring).

    ``where`` is the folder, or :class:`~.dcp.DcpFiles` regions (``model_weights/`` inside an
    archive). ``backend`` is ``metadata.json``; ``stacked`` maps each stacked prefix to its layer
    count. Raises FormatError naming the file for another backend, a truncated or inconsistent
    DCP part, or stacked keys that disagree on the layer count. Not thread-safe.

    >>> with TorchDistSource("nemo/model_weights") as source:  # doctest: +SKIP
    ...     source.info("model.decoder.layers.0.self_attention.linear_qkv.weight").shape
    (192, 64)
    """

    format_name = "torch_dist"

    def __init__(self, where: "str | os.PathLike | DcpFiles", *, trust: bool = False) -> None:
        super().__init__()
        files = as_files(where)
        self.backend = read_backend(files)
        self.dcp = DcpSource(files, trust=trust, all_tensors=True)
        self._slices = _Slices()
        self.stacked: dict[str, int] = {}
        self.skipped = sorted(k for k in [*self.dcp.metadata.objects, *self.dcp.metadata.tensors] if _EXTRA_STATE in k)
        self.prefix = _auto_prefix(self.dcp.keys())
        self.other: list[str] = []
        groups: dict[str, list[tuple[str, str]]] = {}
        order: list[str | tuple[str]] = []  # plain keys, and (prefix,) where a stack of layers begins
        for fqn in self.dcp.keys():
            if _EXTRA_STATE in fqn:
                continue
            if self.prefix and not fqn.startswith(self.prefix[0]):
                self.other.append(fqn)
                continue
            split = unstacked_name(fqn)
            if split is None:
                order.append(fqn)
                continue
            if split[0] not in groups:
                order.append((split[0],))
            group = groups.setdefault(split[0], [])
            group.append((fqn, split[1]))
            self._count_layers(fqn, split[0], group[0][0])
        for item in order:
            if isinstance(item, str):
                tiled = self.dcp.tiled(item)
                name = self._shown(item)
                self._tiled[name] = tiled if name == item else replace(tiled, info=replace(tiled.info, name=name))
                continue
            by_layer = {fqn: self._chunks_by_layer(fqn) for fqn, _ in groups[item[0]]}
            for layer in range(self.stacked[item[0]]):
                for fqn, rest in groups[item[0]]:
                    self._add_layer(fqn, self._shown(f"{item[0]}layers.{layer}.{rest}"), layer, by_layer[fqn][layer])
        self.stacked = {self._shown(k): v for k, v in self.stacked.items()}
        self.training_state = {"backend": self.backend, "skipped": self.skipped, "other_keys": len(self.other), "dcp_version": self.dcp.metadata.version}

    def _shown(self, fqn: str) -> str:
        if not self.prefix:
            return fqn
        return self.prefix[1] + fqn[len(self.prefix[0]):]

    def _count_layers(self, fqn: str, prefix: str, first: str) -> None:
        """Record the layer count of stacked key ``fqn``; ``first`` is the first key of its stack, which set the count."""
        shape = self.dcp.info(fqn).shape
        where = self.dcp.metadata.files.path(METADATA)
        if not shape:
            raise FormatError(f"{where}: '{fqn}' is a stacked layer key but holds a 0-d tensor, not one tensor per layer")
        if shape[0] > _MAX_LAYERS:
            raise FormatError(f"{where}: stacked key '{fqn}' holds {shape[0]} layers; no model has more than {_MAX_LAYERS} (corrupted or hostile?)")
        known = self.stacked.setdefault(prefix, shape[0])
        if known != shape[0]:
            raise FormatError(f"{where}: stacked keys disagree on the layer count: '{first}' has {known} layers, '{fqn}' has {shape[0]}")

    def _chunks_by_layer(self, fqn: str) -> list[list[DcpChunk]]:
        """The chunks holding each layer of stacked tensor ``fqn``."""
        tensor = self.dcp.metadata.tensors[fqn]
        found: list[list[DcpChunk]] = [[] for _ in range(tensor.shape[0])]
        for chunk in tensor.chunks:
            for layer in range(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]):
                found[layer].append(chunk)
        return found

    def _add_layer(self, fqn: str, name: str, layer: int, chunks: list[DcpChunk]) -> None:
        """Layer ``layer`` of ``fqn`` as tensor ``name``: tiled by the layer's slice of each chunk holding it."""
        tensor = self.dcp.metadata.tensors[fqn]
        rest = tensor.shape[1:]
        tiles = []
        for chunk in chunks:
            tiles += chunk_tiles(rest, chunk.offsets[1:], chunk.sizes[1:], _LayerSlice((fqn, tensor.dtype, chunk), layer - chunk.offsets[0]))
        self._tiled[name] = TiledTensor(TensorInfo(name, rest, tensor.dtype), tuple(tiles))

    def layout(self) -> dict:
        """What ``inspect`` shows: the backend, the DCP part's files and chunks, the stacked layers, what was skipped."""
        common = self.dcp.metadata.files.region(COMMON_FILE)
        return {
            **self.dcp.layout(),
            "kind": "torch_dist",
            "backend": self.backend,
            "stacked_layers": dict(self.stacked),
            "skipped_extra_state": len(self.skipped),
            "key_prefix": self.prefix[0] if self.prefix else None,
            "skipped_other_keys": len(self.other),  # optimizer states and anything else outside the model prefix
            "common_pt_bytes": None if common is None else common.size,  # not read: no weights live there
        }

    def lookup(self, ref: Hashable) -> tuple[FileTensorSource, StoredTensor]:
        if isinstance(ref, _LayerSlice):
            _, chunk = self.dcp.lookup(ref.chunk_ref)
            return self._slices, self._slices.entry(ref, chunk)
        return self.dcp.lookup(ref)

    def close(self) -> None:
        super().close()
        self._slices.close()
        self.dcp.close()
