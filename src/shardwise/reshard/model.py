"""Opening any Llama-family checkpoint, sharded or not, as one model with a known layout.

:func:`open_model` finds the shards (:mod:`.containers`), works out the style, TP/PP, pipeline
stages, Q/K/V arrangement, KV replication and vocabulary padding from file names, tensor names,
shapes and config (or reads them from a shardwise manifest), then checks that every tensor on
disk is exactly what that layout predicts. A flag that contradicts the files is refused here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..archive.layout import CONFIG_NAME
from ..archive.reader import read_model_config
from ..errors import FormatError, LayoutError
from ..formats import Checkpoint, open_checkpoint
from ..formats.hf import read_config
from ..formats.nemo2 import NEMO2_CONFIG_FILE
from ..layout.sharding import ShardedLayout, canonical_infos, shard_plan, style_of
from ..layout.tiles import TiledTensor
from ..models.llama import CANONICAL, STYLES, LlamaDims, dims_from_hf_config
from ..tensors import FileTensorSource, TensorInfo
from .containers import Shards, encoding_of, find_shards
from .integrity import archive_files
from .nemo_config import dims_from_nemo_config
from .planned import PlannedModel, check_shard, plan_with_stored_dtypes

__all__ = ["ShardedModel", "open_model", "open_shards", "detect_style"]

Shard = tuple[int, int]
_NO_TOKENIZER = {NEMO2_CONFIG_FILE: " (nor is there a context/nemo_tokenizer/tokenizer.json to count it)"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ShardedModel(PlannedModel):
    """A Llama-family checkpoint in some layout, with the plan that relates it to the canonical model.

    ``plan`` maps each shard to its stored tensors as tiles of the canonical (HF) tensors;
    ``canonical`` describes the full model; ``encoding`` says how the shards store their tensors
    (``torch``, ``safetensors`` or ``xser``). Close it to release files.
    """

    path: str
    container: str
    layout: ShardedLayout
    dims: LlamaDims
    hf_config: dict | None
    shards: dict[Shard, FileTensorSource]
    plan: dict[Shard, list[TiledTensor]]
    canonical: dict[str, TensorInfo]
    files: dict[Shard, str]
    nemo_config: dict | None = None
    generation_config: dict | None = None  # kept in a shardwise manifest (nxdt folders hold no generation_config.json)
    checkpoint: Checkpoint | None = None  # the opened unsharded checkpoint (container hf)
    archive: object = None
    warnings: list[str] = field(default_factory=list)
    has_manifest: bool = False
    encoding: str = "torch"  # how the shards store tensors: torch, safetensors or xser
    config_file: str = CONFIG_NAME  # how messages name the NeMo config that nemo_config came from
    listed: list = field(default_factory=list)  # the files the manifest lists, for their CRC-32s (.integrity.ListedFile)
    _closers: list = field(default_factory=list)

    @property
    def zero_padding(self) -> bool:
        """Padding rows are zeros where shardwise wrote the checkpoint (its manifest records the layout)."""
        return self.has_manifest



def detect_style(names: list[str]) -> tuple[str, str, str]:
    """(style, qkv option, norm option) from one shard's tensor names; LayoutError when none fits."""
    joined = "\n".join(names)
    if "language_model." in joined:
        return "megatron", "fused" if "query_key_value" in joined else "linear", "separate"
    if "model.decoder." in joined or "model.embedding." in joined:
        norms = "fused" if "linear_qkv.layer_norm_weight" in joined else "separate"
        return "mcore", "grouped", norms
    if "gate_up_proj" in joined:
        qkv = "fused" if "qkv_proj.weight_qkv" in joined else "linear" if "qkv_proj.weight_q" in joined else "separate"
        return "nxdt", qkv, "separate"
    if "model.embed_tokens." in joined or "mlp.gate_proj" in joined or "self_attn.q_proj" in joined:
        return "hf", "separate", "separate"
    raise LayoutError("tensor names match none of the styles shardwise knows (hf, nxdt, megatron, mcore) for the Llama family")


def open_model(
    path: "str | os.PathLike | Shards",
    *,
    config: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    expect: dict | None = None,
) -> ShardedModel:
    """Open ``path`` as a Llama-family model in whatever layout it has.

    ``config`` is an HF config.json giving what files cannot (head counts); it is needed for
    NxD-written folders. ``expect`` holds layout options the caller asserts (``style``, ``tp``,
    ``pp``, ``qkv``, ``kv_multiplier``); any that the files contradict is a LayoutError. ``path``
    may be :class:`Shards` already found (see :func:`open_shards`), so that nothing is parsed twice.
    """
    if isinstance(path, Shards):
        return open_shards(path, config=config, expect=expect)
    path = Path(path)
    shards = find_shards(path, trust_pickle=trust_pickle)
    if shards is None:
        return _open_unsharded(path, config, trust_pickle, expect or {})
    return open_shards(shards, config=config, expect=expect)


def open_shards(shards: Shards, *, config: dict | str | os.PathLike | None = None, expect: dict | None = None) -> ShardedModel:
    """Open shards already found by :func:`~.containers.find_shards` as a model, as :func:`open_model` does.

    ``config`` is the HF config, as a dict or the path of a config.json (or of a NeMo
    ``model_config.yaml``: ``.yaml``/``.yml``); when given it wins over any the container carries. The model takes over ``shards`` (closing the model closes them;
    they are closed here when opening fails).

    >>> model = open_shards(find_shards(Path("tag/model")), config={"hidden_size": 64, ...})  # doctest: +SKIP
    """
    try:
        return _open_sharded(shards, config, expect or {})
    except BaseException:
        shards.close()
        raise


def _open_unsharded(path: Path, config, trust_pickle: bool, expect: dict) -> ShardedModel:
    ckpt = open_checkpoint(path, trust_pickle=trust_pickle)
    try:
        hf_config = read_config(Path(config)) if config is not None else ckpt.config if ckpt.format == "hf" else None
        if hf_config is None:
            raise LayoutError(f"{path}: has no config.json; pass --config with the model's HF config.json (head counts cannot be read from shapes)")
        names = ckpt.tensors.keys()
        style, qkv, norms = detect_style(names)
        if style != "hf":
            raise LayoutError(f"{path}: holds {style}-style tensor names in a single unsharded file; shardwise reads those from their sharded containers")
        dims = dims_from_hf_config(hf_config, str(path))
        layout = ShardedLayout("hf", 1, 1, qkv, norms)
        shards = {(0, 0): ckpt.tensors}
        encoding = encoding_of(str(path), shards)
        _check_expected(str(path), layout, expect, encoding)
        warnings = []
        if dims.tied and CANONICAL["lm_head"] in names:
            warnings.append(f"{path}: ties lm_head to the embedding but also stores {CANONICAL['lm_head']}; the stored copy is ignored")
        model = _finish(str(path), "hf", layout, dims, hf_config, shards, {(0, 0): str(path)}, warnings, encoding, tolerate={CANONICAL["lm_head"]} if dims.tied else set())
    except BaseException:
        ckpt.close()
        raise
    model.checkpoint = ckpt
    model.listed = archive_files(ckpt.archive) if ckpt.archive is not None else []
    return model


def _open_sharded(shards: Shards, config, expect: dict) -> ShardedModel:
    label = str(shards.path)
    parallel = (shards.manifest or {}).get("parallel")
    warnings: list[str] = []
    nemo_config = shards.nemo_config
    if config is not None and not isinstance(config, dict) and Path(config).suffix in (".yaml", ".yml"):
        nemo_config, config = read_model_config(Path(config)), None  # --config model_config.yaml: NeMo's, not HF's
    hf_config = dict(config) if isinstance(config, dict) else read_config(Path(config)) if config is not None else None
    if hf_config is None and isinstance(parallel, dict):
        hf_config = parallel.get("config")
    hf_config = hf_config or shards.hf_config
    names0 = shards.sources[(0, 0)].keys()
    style, qkv, norms = detect_style(names0)
    if isinstance(parallel, dict) and isinstance(parallel.get("layout"), dict):
        layout = ShardedLayout.from_dict(parallel["layout"])
    else:
        layout = ShardedLayout(style, shards.tp, shards.pp, qkv, norms, stages=_stages(shards, style))
    if (layout.style, layout.tp, layout.pp) != (style, shards.tp, shards.pp):
        raise LayoutError(f"{label}: the manifest says {layout.style} TP={layout.tp} PP={layout.pp}, the files are {style} TP={shards.tp} PP={shards.pp}")
    if hf_config is not None:
        dims = dims_from_hf_config(hf_config, label)
    elif style == "mcore" and nemo_config:
        dims = dims_from_nemo_config(nemo_config, label, padded_vocab=_embed_rows(shards, layout))
        warnings.append(
            f"{label}: has no HF config.json, and {shards.config_file} does not record the vocabulary size{_NO_TOKENIZER.get(shards.config_file, '')}: "
            f"all {dims.vocab} stored rows are kept, padding included (pass --config with the HF config.json to trim it)"
        )
    else:
        also = " or NeMo model_config.yaml" if style == "mcore" else ""
        raise LayoutError(f"{label}: the {style} layout does not record head counts; pass --config with the model's HF config.json{also}")
    layout = _infer_options(label, layout, dims, shards)
    encoding = encoding_of(label, shards.sources)
    _check_expected(label, layout, expect, encoding)
    model = _finish(
        label, shards.container, layout, dims, hf_config, shards.sources, shards.files, warnings, encoding,
        nemo_config=nemo_config, archive=shards.archive, closers=shards.closers,
    )
    model.has_manifest = isinstance(parallel, dict)
    model.config_file = shards.config_file
    model.listed = shards.listed
    if model.has_manifest and isinstance(parallel.get("generation_config"), dict):
        model.generation_config = parallel["generation_config"]
    return model


def _check_expected(label: str, layout: ShardedLayout, expect: dict, encoding: str) -> None:
    """Every option the caller asserts (layout fields, or ``encoding``) must match the files."""
    for key, wanted in expect.items():
        if wanted is None:
            continue
        actual = encoding if key == "encoding" else getattr(layout, key)
        if actual != wanted and not (key == "qkv" and not wanted):
            raise LayoutError(f"{label}: holds {key.replace('_', ' ')} {actual!r}, not the {wanted!r} the options say")


def _layer_indexes(names: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))})


def _stages(shards: Shards, style: str) -> tuple[tuple[int, int], ...]:
    """(first layer, count) per pipeline stage, from the layer indexes each stage's files hold."""
    stages, first = [], 0
    for pp_rank in range(shards.pp):
        layers = _layer_indexes(shards.sources[(0, pp_rank)].keys())
        if not layers:
            raise FormatError(f"{shards.files[(0, pp_rank)]}: holds no transformer layers")
        if STYLES[style].local_layers:
            if layers != list(range(len(layers))):
                raise FormatError(f"{shards.files[(0, pp_rank)]}: stage-local layer indexes {layers[:8]} do not start at 0 or have gaps")
            stages.append((first, len(layers)))
            first += len(layers)
        else:
            if layers != list(range(layers[0], layers[0] + len(layers))) or layers[0] != first:
                raise FormatError(f"{shards.files[(0, pp_rank)]}: holds layers {layers[0]}..{layers[-1]} with gaps or out of order (expected to start at {first})")
            stages.append((first, len(layers)))
            first += len(layers)
    return tuple(stages)


def _embed_rows(shards: Shards, layout: ShardedLayout) -> int:
    name = STYLES[layout.style].names["embed"]
    source = shards.sources[(0, 0)]
    if name not in source:
        raise FormatError(f"{shards.files[(0, 0)]}: has no {name}")
    return source.info(name).shape[0] * shards.tp


def _infer_options(label: str, layout: ShardedLayout, dims: LlamaDims, shards: Shards) -> ShardedLayout:
    """Fill in KV replication and vocabulary padding from the stored shapes."""
    style = style_of(layout.style)
    source = shards.sources[(0, 0)]
    d, tp = dims.head_dim, layout.tp
    layer = layout.stages[0][0] if layout.stages and not style.local_layers else 0
    arrangement, names = style.qkv[layout.qkv or style.default_qkv]
    q_rows = dims.heads * d // tp
    if arrangement in ("separate", "q_kv"):
        key = names["k" if arrangement == "separate" else "kv"].format(i=layer)
        rows = source.info(key).shape[0] if key in source else None
        kv_rows = rows if arrangement == "separate" else (rows // 2 if rows else None)
    else:
        key = names["qkv"].format(i=layer)
        rows = source.info(key).shape[0] if key in source else None
        kv_rows = (rows - q_rows) // 2 if rows else None
    multiplier = layout.kv_multiplier
    if kv_rows:
        replicated = kv_rows * tp // d
        if replicated % dims.kv_heads or replicated < dims.kv_heads:
            raise LayoutError(f"{label}: {key} holds {kv_rows // d} KV heads per rank, which does not fit the config's {dims.kv_heads} KV heads at TP={tp}")
        multiplier = replicated // dims.kv_heads
    vocab_multiple = layout.vocab_multiple
    if vocab_multiple is None:
        embed = style.names["embed"]
        per_rank = source.info(embed).shape[0] if embed in source else dims.vocab // tp
        vocab_multiple = per_rank if per_rank * tp != dims.vocab else 0
        if per_rank * tp < dims.vocab:
            raise LayoutError(f"{label}: {embed} holds {per_rank} rows per rank, {per_rank * tp} in all, fewer than the config's vocabulary of {dims.vocab}")
    return replace(layout, kv_multiplier=multiplier, vocab_multiple=vocab_multiple)


def _finish(label, container, layout, dims, hf_config, sources, files, warnings, encoding, *, tolerate=frozenset(), nemo_config=None, archive=None, closers=()) -> ShardedModel:
    """Resolve the layout, plan it, take the dtypes from disk, and check every stored tensor against the plan."""
    layout = layout.resolved(dims.layers)
    style = style_of(layout.style)
    stored = {shard: {n: source.info(n) for n in source.keys()} for shard, source in sources.items()}
    last = stored[(0, layout.pp - 1)]
    lm_name = style.names["lm_head"]
    has_lm_head = lm_name in last and not (dims.tied and (layout.pp > 1 or layout.style == "hf"))
    inv_freq = style.keeps_inv_freq and any(n.endswith("inv_freq") for n in stored[(0, 0)])
    canonical = canonical_infos(dims, "float32", lm_head=has_lm_head, inv_freq=inv_freq)
    canonical, plan = plan_with_stored_dtypes(lambda c: shard_plan(dims, c, layout), canonical, stored)
    for shard, tensors in plan.items():
        check_shard(files[shard], tensors, stored[shard], model="a Llama model in this layout", hint="check --config and the TP/Q-K-V options", tolerate=tolerate)
    return ShardedModel(
        label, container, layout, dims, hf_config, dict(sources), plan, canonical, dict(files), nemo_config,
        archive=archive, warnings=warnings, encoding=encoding, _closers=list(closers),
    )

