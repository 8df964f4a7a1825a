"""Converting CLIP checkpoints, streaming: HF or OpenCLIP into Megatron-core CLIP archives at any TP,
archives back to HF folders, and archives to archives at another TP (``reshard``).

The source is opened as a :class:`~.clip_model.ClipModel`; the target's tiles
(:func:`~shardwise.layout.clip_sharding.clip_shard_plan`) are composed with the source's inverse,
so each target tensor is copied from the source's stored rectangles directly (per-head Q/K/V
fusion, vocabulary padding, OpenCLIP's transposed projections included): no full model in memory,
one tensor's chunks at a time. Outputs are written by the same writers as the Llama family's
(archive tar, unpacked folder, HF folder), atomically, with ``shardwise.json`` last.

The archive carries the source's HF config.json (derived from the OpenCLIP or NeMo config when the
source has none), its tokenizer files (``tokenizer: {library: huggingface, type: nemo:<hash>_tokenizer}``;
NeMo's own CLIP configs name a Hub repository instead) and its other companion files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..dtypes import parse_cast_dtype
from ..engine import ConvertResult
from ..errors import OptionError
from ..formats.hf_conventions import config_for_dtype
from ..layout.clip_sharding import check_clip_tp, clip_shard_plan
from ..layout.parallel import padded_vocab
from ..layout.stream import TileStreamer
from ..layout.tiles import compose
from ..models.clip_configs import nemo_clip_config
from ..progress import NO_PROGRESS, Progress
from .clip_model import MODEL_KIND, ClipModel, clip_source_kind, open_clip_model
from .convert import hf_companions, plan_size, write_archive
from .integrity import checked_while_read
from .nemo_config import nemo_precision, vocab_multiple_of
from .write import write_hf

__all__ = ["convert_clip", "clip_route", "convert_if_clip", "CLIP_OUTPUTS"]

CLIP_OUTPUTS = ("archive", "nemo-dir", "hf")


def clip_route(src: str | os.PathLike, to: str | None, *, arch: str | None = None, layout_options: bool = False) -> str | None:
    """Whether converting ``src`` into ``to`` is a CLIP conversion (:func:`convert_clip`): the source's
    :func:`~.clip_model.clip_source_kind` when it is (for ``convert_clip``'s ``kind``), else None.

    It is for an OpenCLIP source (or ``arch`` given) or a Megatron-core CLIP archive going to an
    archive, nemo-dir or HF folder, and for an HF CLIP folder going to an archive or nemo-dir;
    layout options (``--tp``, ``--pp``, ``--style``) make any CLIP source one. Anything else (an
    HF CLIP copied as safetensors, say) is a plain tensor copy.
    """
    kind = clip_source_kind(src, arch)
    if kind is None:
        return None
    outputs = CLIP_OUTPUTS if kind != "hf" else ("archive", "nemo-dir")
    return kind if arch is not None or layout_options or to in outputs else None


def convert_if_clip(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None, arch: str | None = None, layout_options: bool,
                    refused: dict[str, object], refused_in: str, **options) -> ConvertResult | None:
    """:func:`convert_clip` of ``src`` when :func:`clip_route` makes it a CLIP conversion, else None (nothing opened stays open).

    ``refused`` maps option flags to their values: one that is given raises OptionError
    "<flag> does not apply to CLIP <refused_in>" first. ``options`` go to :func:`convert_clip`.
    """
    kind = clip_route(src, to, arch=arch, layout_options=layout_options)
    if kind is None:
        return None
    for name, value in refused.items():
        if value not in (None, False):
            raise OptionError(f"{name} does not apply to CLIP {refused_in}")
    return convert_clip(src, dst, to=to, arch=arch, kind=kind, **options)


def convert_clip(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    tp: int | None = None,
    pp: int | None = None,
    style: str | None = None,
    arch: str | None = None,
    dtype: str | None = None,
    weights_format: str | None = None,
    keep_layout: bool = False,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: Progress = NO_PROGRESS,
    kind: str | None = None,
) -> ConvertResult:
    """Convert the CLIP at ``src`` into ``to`` (``archive``, ``nemo-dir`` or ``hf``) at ``dst``.

    ``tp`` is the output's tensor-parallel size (archives; default 1, or the source's with
    ``keep_layout``, which is ``shardwise reshard``: same container and encoding, new TP). ``arch``
    names the OpenCLIP architecture of a bare state dict (``ViT-B-32`` ...). Bit-exact unless
    ``dtype`` casts; ``weights_format`` is ``torch`` (``model_weights.ckpt``) or ``safetensors``
    for archives. Raises LayoutError when the heads or MLP do not split over ``tp`` (or ``pp`` is
    not 1), OptionError for options that do not apply, FormatError for unreadable sources; nothing
    is written then. ``kind`` is the source's :func:`~.clip_model.clip_source_kind` when the caller
    has it (:func:`clip_route` returns it).

    >>> convert_clip("clip-vit-base-patch32/", "clip.nemo", to="archive", tp=2)  # doctest: +SKIP
    """
    started = time.perf_counter()
    dst = Path(dst)
    cast = parse_cast_dtype(dtype).name if dtype else None
    if style not in (None, "mcore"):
        raise OptionError(f"--style {style}: CLIP archives are Megatron-core (mcore) archives")
    with open_clip_model(src, arch=arch, trust_pickle=trust_pickle, kind=kind) as model, checked_while_read(model.listed) as verdict:
        if keep_layout and model.container not in ("archive", "nemo-dir"):
            raise OptionError(f"{src}: is an unsharded {model.container} CLIP; reshard works on CLIP archives, use convert --to archive --tp N")
        to = to or (model.container if keep_layout else None)
        if to not in CLIP_OUTPUTS:
            given = f"--to {to}" if to else f"{dst}: the output format is not clear from the name"
            raise OptionError(f"{given}: a CLIP converts to {', '.join(CLIP_OUTPUTS)}")
        hf_config = config_for_dtype(model.hf_config, cast) if cast else model.hf_config
        streamer = TileStreamer(model.lookup, progress, cast)
        warnings = list(model.warnings)
        if to == "hf":
            if tp not in (None, 1) or pp not in (None, 1) or weights_format not in (None, "safetensors"):
                raise OptionError("--tp, --pp and --weights-format do not apply to --to hf (HF folders are unsharded safetensors)")
            tensors = model.inverse()
            files = write_hf(dst, tensors, streamer, overwrite=overwrite,
                             add_files=lambda stage: hf_companions(model, stage, hf_config, warnings, cast, True), before_commit=verdict)
            count, total = len(tensors), sum(t.info.nbytes for t in tensors)
        else:
            tp = tp or (model.tp if keep_layout else 1)
            check_clip_tp(model.dims, tp, pp or 1)
            encoding = weights_format or (model.encoding if keep_layout and model.encoding in ("torch", "safetensors") else "torch")
            files, count, total = _write_archive(model, dst, to, tp, streamer, hf_config, encoding, overwrite, verdict)
    return ConvertResult(str(dst), to, tuple(files), count, total, time.perf_counter() - started, tuple(warnings))


def _main_dtype(model: ClipModel):
    """The dtype holding most of the model's bytes: half-precision exports keep logit_scale and norms in fp32."""
    totals: dict = {}
    for info in model.canonical.values():
        totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    return max(totals, key=totals.get)


def _write_archive(model: ClipModel, dst: Path, to: str, tp: int, streamer: TileStreamer, hf_config: dict, encoding: str, overwrite: bool,
                   before_commit):
    """The Megatron-core archive (or unpacked folder) of ``model`` at ``tp``: (files, tensor count, bytes);
    ``before_commit()`` runs once it is written (the source's CRC verdict)."""
    multiple = vocab_multiple_of(model.nemo_config, model.dims.vocab)
    padded = padded_vocab(model.dims.vocab, multiple, tp)
    plan = compose(clip_shard_plan(model.dims, model.canonical, tp, padded), model.inverse())
    precision = nemo_precision(streamer.out_dtype(_main_dtype(model)))
    config = nemo_clip_config(model.dims, tp=tp, vocab_multiple=multiple, precision=precision)
    parallel = {
        "container": to, "encoding": encoding, "model": MODEL_KIND,
        "layout": {"style": "mcore", "tp": tp, "pp": 1, "vocab_multiple": multiple, "padded_vocab": padded},
        "dims": model.dims.as_dict(), "config": hf_config,
    }
    files = write_archive(model, dst, to, plan, streamer, hf_config, config, tp=tp, pp=1, parallel=parallel, weights_format=encoding,
                          overwrite=overwrite, before_commit=before_commit)
    return (files, *plan_size(plan))
