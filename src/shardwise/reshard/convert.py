"""Converting a Llama-family model between layouts (HF, nxdt, megatron, mcore) and TP/PP sizes, streaming.

The source is opened in whatever layout it has (:func:`~.model.open_model`); the target layout's
tiles are composed with the source's inverse, so each target tensor is copied from the source
shards' rectangles directly: no full tensor, no whole model, one pass.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..archive.artifacts import HASHED_PREFIX, NEMO_PREFIX, PlannedArtifact, make_artifact
from ..archive.layout import CONFIG_NAME, DISTRIBUTED_FOLDER, MANIFEST_NAME, parse_rank_folder
from ..atomic import check_output_free, fsync_file, temporary_folder, write_text_durably
from ..dtypes import parse_cast_dtype
from ..engine import ConvertResult
from ..errors import IntegrityError, LayoutError, OptionError, ShardwiseError, UnsafeCheckpointError
from ..formats.hf_conventions import GENERATION_CONFIG, config_for_dtype, finish_hf_folder, hf_json
from ..jsonfile import read_json_object
from ..layout.sharding import ShardedLayout, shard_plan
from ..layout.stream import TileStreamer
from ..layout.tiles import compose
from ..models.llama import STYLES
from ..progress import NO_PROGRESS, Progress
from ..units import parse_size
from .containers import CONTAINERS, Shards, find_shards
from .integrity import checked_while_read
from .model import ShardedModel, open_model
from .nemo_config import hf_config_from_nemo, nemo_llama_config, nemo_precision, vocab_multiple_of
from .write import parallel_manifest, write_hf, write_nemo, write_nxdt
from ..storage import accepts_urls

__all__ = ["convert_layout", "target_layout", "layout_route", "shards_need_engine", "archive_artifacts", "hf_companions", "write_archive", "plan_size"]

_STYLES_OF = {"nxdt": ("nxdt", "megatron"), "archive": ("mcore",), "nemo-dir": ("mcore",), "hf": ("hf",)}


def layout_route(src: str | os.PathLike, to: str | None, options: dict, *, trust_pickle: bool = False) -> "Shards | Path | None":
    """Whether a conversion goes through the parallel-layout engine, and what it has opened for it.

    It does when the output is sharded (nxdt, nemo-dir), a layout option is given, the source is a
    sharded or Megatron-style checkpoint, or a Llama-family HF model becomes an archive (as mcore);
    a bare torch_dist folder goes through it only into a model container (hf, nxdt, archive,
    nemo-dir), and is otherwise copied as its own (unstacked) tensors. Returns None for the plain tensor copy, else the source for :func:`.model.open_model`: the
    :class:`Shards` it found (opened once; the caller owns them) or the path of an unsharded model.
    """
    from ..formats.hf import read_config
    from ..formats.torch_dist import looks_like_torch_dist
    from ..models.llama import MODEL_TYPES

    forced = to in ("nxdt", "nemo-dir") or any(v not in (None, False) for v in options.values())
    path = Path(src)
    if path.is_dir() and (path / "config.json").is_file() and not (path / MANIFEST_NAME).is_file():
        if forced:
            return path
        config = read_config(path / "config.json")
        return path if to == "archive" and config.get("model_type") in MODEL_TYPES else None
    try:
        shards = find_shards(path, trust_pickle=trust_pickle)
    except (UnsafeCheckpointError, IntegrityError):
        raise  # sharded after all: the refusal (and its --trust-pickle hint), or the damage its manifest shows, is the message to give
    except (OSError, ShardwiseError):
        if forced or (path.is_dir() and not (to not in CONTAINERS and looks_like_torch_dist(path))):
            raise  # a container folder (find_shards returns None for others) that the plain conversion cannot read
        return None  # an archive file, or a bare torch_dist folder copied as its own tensors: the plain conversion reports what is wrong
    if shards is None:
        return path if forced else None
    raw = shards.container == "torch_dist" and to not in CONTAINERS  # a bare torch_dist folder into a tensor file: its own tensors, unstacked
    if forced or (shards_need_engine(shards) and not raw):
        return shards
    shards.close()
    return None


def shards_need_engine(shards: Shards) -> bool:
    """Whether found shards are read through the layout engine: all but an unsharded archive in HF naming
    (a plain archive) and non-Llama models outside nxdt folders."""
    from .model import detect_style

    try:
        style = detect_style(shards.sources[(0, 0)].keys())[0]
    except LayoutError:  # not a Llama-family model: only nxdt folders have nothing else to be
        return shards.container == "nxdt"
    return shards.container != "archive" or (shards.tp, shards.pp) != (1, 1) or style != "hf"


def target_layout(
    source: ShardedModel, to: str, *, style: str | None, tp: int | None, pp: int | None, qkv_linear: bool | None,
    fuse_qkv: bool | None, kv_multiplier: int | None, keep: bool,
) -> ShardedLayout:
    """The layout to write: options given win; ``keep`` (reshard) takes the rest from the source."""
    allowed = _STYLES_OF[to]
    style = style or (source.layout.style if keep else allowed[0])
    if style not in allowed:
        raise OptionError(f"--style {style} cannot be written as {to}; {to} holds {' or '.join(allowed)}")
    tp = tp or (source.layout.tp if keep else 1)
    pp = pp or (source.layout.pp if keep else 1)
    if keep and not (qkv_linear or fuse_qkv):
        qkv, norms = source.layout.qkv, source.layout.norms
    else:
        qkv, norms = _qkv_option(style, source, qkv_linear, fuse_qkv), ""
    if kv_multiplier is None:
        replicating = style == "nxdt" and qkv in ("linear", "fused") and source.dims.kv_heads < tp
        kv_multiplier = tp // source.dims.kv_heads if replicating and keep and tp % source.dims.kv_heads == 0 else 1
        if replicating and not keep:
            raise LayoutError(
                f"tensor parallel size {tp} is more than the model's {source.dims.kv_heads} KV heads; "
                f"pass --kv-size-multiplier {max(1, tp // source.dims.kv_heads)} to replicate them"
            )
    vocab_multiple = None
    if STYLES[style].vocab_multiple:
        vocab_multiple = vocab_multiple_of(source.nemo_config, source.dims.vocab)
    return ShardedLayout(style, tp, pp, qkv, norms, kv_multiplier, vocab_multiple).resolved(source.dims.layers)


def _qkv_option(style: str, source: ShardedModel, qkv_linear: bool | None, fuse_qkv: bool | None) -> str:
    if style == "nxdt":
        return "fused" if fuse_qkv else "linear" if qkv_linear else "separate"
    if fuse_qkv:
        raise OptionError(f"--fuse-qkv applies to the nxdt style; {style} has its own Q/K/V layout")
    if style == "megatron":
        gqa = source.dims.kv_heads != source.dims.heads
        if qkv_linear is False and gqa:
            raise LayoutError("the megatron style stores a GQA model as query + key_value (--qkv-linear); it has no fused form for GQA")
        return "linear" if (qkv_linear or gqa) else "fused"
    if qkv_linear:
        raise OptionError(f"--qkv-linear applies to the nxdt and megatron styles, not {style}")
    return STYLES[style].default_qkv


@accepts_urls(inputs=("src", "config"), outputs=("dst",))
def convert_layout(
    src: "str | os.PathLike | Shards",
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    style: str | None = None,
    tp: int | None = None,
    pp: int | None = None,
    qkv_linear: bool | None = None,
    fuse_qkv: bool | None = None,
    kv_multiplier: int | None = None,
    config: str | os.PathLike | None = None,
    dtype: str | None = None,
    weights_format: str | None = None,
    max_shard_size: str | int | None = None,
    keep_layout: bool = False,
    full_state_file: str | None = None,
    expect_layers: int | None = None,
    expect: dict | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ConvertResult:
    """Convert the Llama-family model at ``src`` into ``to`` (nxdt, archive, nemo-dir or hf) at ``dst``.

    ``keep_layout`` (``shardwise reshard``) keeps the source's container, style and options and
    changes only what is given (TP, PP). ``config`` supplies the HF config.json when the source
    does not carry one. Bit-exact unless ``dtype`` casts. Raises LayoutError for layouts the model
    cannot take, OptionError for options that do not apply. ``full_state_file`` makes an ``hf``
    output one torch file of that name (NxD's ``checkpoint.pt``) plus config.json;
    ``expect_layers`` and ``expect`` (layout fields such as ``tp``, ``qkv``, or ``encoding``) are
    checked against the source before anything is written. ``weights_format`` is how the output
    stores tensors: ``torch`` or ``xser`` for nxdt (and for ``full_state_file``), ``torch`` or
    ``safetensors`` for archives; resharding keeps the source's unless it is given. A CLIP ``src``
    is handed to :func:`~.clip_convert.convert_clip` (archives and HF folders, TP only).
    """
    from .clip_convert import convert_if_clip

    if not isinstance(src, Shards) and full_state_file is None:
        refused = {"--qkv-linear": qkv_linear, "--fuse-qkv": fuse_qkv, "--kv-size-multiplier": kv_multiplier, "--config": config, "--max-shard-size": max_shard_size}
        clip = convert_if_clip(src, dst, to=to, layout_options=True, refused=refused, refused_in="checkpoints", tp=tp, pp=pp, style=style, dtype=dtype,
                               weights_format=weights_format, keep_layout=keep_layout, overwrite=overwrite, trust_pickle=trust_pickle, progress=progress)
        if clip is not None:
            return clip
    started = time.perf_counter()
    dst = Path(dst)
    cast = parse_cast_dtype(dtype).name if dtype else None
    label = src.path if isinstance(src, Shards) else src
    try:
        check_output_free(dst, overwrite, is_dir=True)
    except BaseException:
        if isinstance(src, Shards):
            src.close()
        raise
    with open_model(src, config=config, trust_pickle=trust_pickle, expect=expect) as source, checked_while_read(source.listed) as verdict:
        if keep_layout and source.encoding == "dcp":
            raise OptionError(
                f"{label}: is a distributed checkpoint of global tensors, which loads at any TP/PP as it is (Megatron reshards it when loading); "
                f"to write per-rank files, use convert --to archive, nemo-dir or nxdt with --tp/--pp"
            )
        to = to or (source.container if keep_layout else None)
        if to not in CONTAINERS:
            given = f"--to {to}" if to else f"{dst}: the output format is not clear from the name"
            raise OptionError(f"{given}: choose --to {', '.join(CONTAINERS)} for a Llama-family model")
        if keep_layout and to == "hf":
            raise OptionError(f"{label}: is an unsharded HF model; reshard works on sharded checkpoints, use convert --to nxdt|archive|nemo-dir")
        if expect_layers is not None and expect_layers != source.dims.layers:
            raise OptionError(f"{label}: the model has {source.dims.layers} layers, not the {expect_layers} the options say")
        hf_config = source.hf_config or hf_config_from_nemo(source.dims, source.nemo_config or {})
        if cast is not None:  # one place: the manifest, archive artifacts and HF outputs all name the dtype written
            hf_config = config_for_dtype(hf_config, cast)
        streamer = TileStreamer(source.lookup, progress, cast)
        warnings = list(source.warnings)
        encoding = _output_encoding(to, weights_format, source.encoding if keep_layout else None, full_state_file)
        if to == "hf":
            _no_layout_options(tp, pp, style, qkv_linear, fuse_qkv, kv_multiplier)
            tensors = source.inverse()
            complete = full_state_file is None  # NxD's checkpoint.pt + config.json stays as NxD writes it
            files = write_hf(dst, tensors, streamer, add_files=lambda stage: hf_companions(source, stage, hf_config, warnings, cast, complete),
                             overwrite=overwrite, max_shard_size=parse_size(max_shard_size) if max_shard_size else None, single_file=full_state_file,
                             xser=encoding == "xser", before_commit=verdict)
            count, total = len(tensors), sum(t.info.nbytes for t in tensors)
            layout = source.layout
        else:
            layout = target_layout(source, to, style=style, tp=tp, pp=pp, qkv_linear=qkv_linear, fuse_qkv=fuse_qkv, kv_multiplier=kv_multiplier, keep=keep_layout)
            plan = compose(shard_plan(source.dims, source.canonical, layout), source.inverse())
            parallel = parallel_manifest(to, layout, source.dims, hf_config, encoding, _generation_config(source) if to == "nxdt" else None)
            if to == "nxdt":
                files = write_nxdt(dst, plan, streamer, parallel, overwrite=overwrite, encoding=encoding, before_commit=verdict)
                if source.container != "nxdt" and (source.checkpoint is None or source.checkpoint.tokenizer_files):
                    warnings.append(f"{dst}: nxdt folders hold weights only; tokenizer files were not copied")
            else:
                files = _write_nemo(source, dst, to, plan, streamer, layout, parallel, hf_config, encoding, overwrite, verdict)
            count, total = plan_size(plan)
    return ConvertResult(str(dst), to, tuple(files), count, total, time.perf_counter() - started, tuple(warnings))


_ENCODINGS = {"nxdt": ("torch", "xser"), "archive": ("torch", "safetensors"), "nemo-dir": ("torch", "safetensors"), "hf": ("safetensors",)}


def _output_encoding(to: str, asked: str | None, kept: str | None, full_state_file: str | None) -> str:
    """How the output stores tensors: ``asked`` (--weights-format), else the source's when resharding, else the container's default."""
    allowed = ("torch", "xser") if to == "hf" and full_state_file else _ENCODINGS[to]
    if asked is None:
        return kept if kept in allowed else allowed[0]
    if asked not in allowed:
        if to == "hf":
            raise OptionError(f"--weights-format {asked} does not apply to --to hf (HF folders hold safetensors shards)")
        raise OptionError(f"--weights-format {asked} cannot be written as {to}; choose {' or '.join(allowed)}")
    return asked


def _no_layout_options(*values) -> None:
    if any(v not in (None, False, 1) for v in values[:2]) or any(v not in (None, False) for v in values[2:]):
        raise OptionError("--tp, --pp, --style, --qkv-linear, --fuse-qkv and --kv-size-multiplier do not apply to --to hf (HF folders are unsharded)")


def _write_nemo(source, dst, to, plan, streamer, layout, parallel, hf_config, weights_format, overwrite, before_commit) -> list[str]:
    precision = nemo_precision(streamer.out_dtype(next(iter(source.canonical.values())).dtype))
    config = nemo_llama_config(source.dims, hf_config, tp=layout.tp, pp=layout.pp, vocab_multiple=layout.vocab_multiple or 1, precision=precision)
    return write_archive(source, dst, to, plan, streamer, hf_config, config, tp=layout.tp, pp=layout.pp, parallel=parallel,
                         weights_format=weights_format, overwrite=overwrite, before_commit=before_commit)


def write_archive(source, dst: Path, to: str, plan: dict, streamer: TileStreamer, hf_config: dict, config: dict, *, tp: int, pp: int,
                  parallel: dict, weights_format: str, overwrite: bool, before_commit: Callable[[], None] | None = None) -> list[str]:
    """The archive (``to`` = ``archive``) or unpacked folder (``nemo-dir``) of ``plan``, with ``config`` as its
    model_config.yaml and the source's companion files as artifacts (:func:`archive_artifacts`): the files written.
    ``before_commit()`` runs once everything is written and may raise to discard it (the source's CRC verdict)."""
    with temporary_folder("shardwise-artifacts-") as tmp:
        artifacts = archive_artifacts(source, Path(tmp), hf_config, config)
        return write_nemo(
            dst, plan, streamer, config=config, artifacts=artifacts, tp=tp, pp=pp, parallel=parallel,
            weights_format=weights_format, unpacked=(to == "nemo-dir"), overwrite=overwrite, before_commit=before_commit,
        )


def plan_size(plan: dict) -> tuple[int, int]:
    """(tensor count, bytes) of the tensors a plan writes."""
    return sum(len(t) for t in plan.values()), sum(t.info.nbytes for tensors in plan.values() for t in tensors)


def archive_artifacts(source: ShardedModel, tmp: Path, hf_config: dict, config: dict) -> list[PlannedArtifact]:
    """The source's config.json, tokenizer and other files as archive artifacts, named in ``config``.

    ``source`` is a :class:`ShardedModel` or anything with its ``path``, ``container``,
    ``checkpoint``, ``archive`` and ``generation_config`` (a CLIP ``ClipModel``).
    """
    from ..archive.artifacts import set_config_value
    from ..archive.convert import HF_CONFIG_KEY, HF_EXTRA_KEY

    entries = _companion_entries(source, tmp)
    config_path = tmp / "config.json"
    config_path.write_text(hf_json(hf_config), encoding="utf-8")
    artifacts = [make_artifact(HF_CONFIG_KEY, "config.json", (("", config_path),), False)]
    tokenizer = tuple((n, p) for n, p in entries if _is_tokenizer(n))
    if tokenizer:
        config["tokenizer"] = {"library": "huggingface"}
        artifacts.append(make_artifact("tokenizer.type", "tokenizer", tokenizer, True))
    extra = tuple((n, p) for n, p in entries if not _is_tokenizer(n))
    if extra:
        artifacts.append(make_artifact(HF_EXTRA_KEY, "hf_extra", extra, True))
    for artifact in artifacts:
        set_config_value(config, artifact.config_key, NEMO_PREFIX + artifact.member)
    return artifacts


def _is_tokenizer(name: str) -> bool:
    from ..formats.hf import TOKENIZER_FILES

    return name in TOKENIZER_FILES


def _companion_entries(source: ShardedModel, tmp: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of the non-weight files that travel with the model, config.json excluded.

    A generation config kept in the source's manifest is written into ``tmp`` and listed too.
    """
    entries = _stored_companions(source, tmp)
    if source.generation_config is not None and GENERATION_CONFIG not in dict(entries):
        path = tmp / GENERATION_CONFIG
        write_text_durably(path, hf_json(source.generation_config))
        entries.append((GENERATION_CONFIG, path))
    return entries


def _stored_companions(source: ShardedModel, tmp: Path) -> list[tuple[str, Path]]:
    """The companion files the source holds (see :func:`_companion_entries`)."""
    if source.checkpoint is not None and Path(source.checkpoint.path).is_dir():
        folder = Path(source.checkpoint.path)
        return [(n, folder / n) for n in source.checkpoint.companion_files if n != "config.json"]
    if source.archive is not None:
        from ..archive.convert import export_hf_files

        out = tmp / "exported"
        out.mkdir()
        export_hf_files(source.archive, out)
        return [(p.relative_to(out).as_posix(), p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != "config.json"]
    if source.container == "nemo2":
        from ..formats.nemo2 import companion_files

        return companion_files(Path(source.path))
    if source.container == "nemo-dir":
        folder = Path(source.path)
        found = []
        for child in sorted(folder.iterdir()):
            if child.name in (CONFIG_NAME, MANIFEST_NAME, DISTRIBUTED_FOLDER) or parse_rank_folder(child.name) or child.name.endswith("config.json"):
                continue
            if child.is_dir():
                found += [(p.relative_to(child).as_posix(), p) for p in sorted(child.rglob("*")) if p.is_file()]
            elif child.is_file() and not child.name.startswith("model_weights"):
                found.append((HASHED_PREFIX.sub("", child.name), child))
        return found
    return []


def _generation_config(source: ShardedModel) -> dict | None:
    """The source's generation_config.json (among its companion files, or from its manifest), or None."""
    with temporary_folder("shardwise-companions-") as tmp:
        found = dict(_companion_entries(source, Path(tmp))).get(GENERATION_CONFIG)
        return read_json_object(found, "generation config") if found is not None else None


def hf_companions(source: ShardedModel, stage: Path, hf_config: dict, warnings: list[str], cast: str | None, complete: bool) -> list[str]:
    """config.json and the tokenizer/extra files next to HF weights; returns the names written.

    ``complete`` also makes the folder what save_pretrained writes (see
    :func:`~shardwise.formats.hf_conventions.finish_hf_folder`): config.json names ``cast``, and a
    generation_config.json is derived when the source had none (not even in its manifest).
    """
    written = []
    with temporary_folder("shardwise-companions-") as tmp:
        for name, path in _companion_entries(source, Path(tmp)):
            target = stage / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            fsync_file(target)
            written.append(name)
    write_text_durably(stage / "config.json", hf_json(hf_config))
    written.append("config.json")
    if complete:
        written += [n for n in finish_hf_folder(stage, cast=cast) if n not in written]
    if not source.hf_config:
        warnings.append(f"{source.path}: carries no HF config.json; config.json was built from its {source.config_file}")
    return written
