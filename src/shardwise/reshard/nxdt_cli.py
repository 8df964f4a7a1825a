"""``shardwise nxdt-convert``: NxD/NxDT's ``checkpoint_converter.py`` flags, so existing scripts keep working.

Differences from the original, on purpose:

- booleans are real: ``--qkv_linear False`` (or 0/no/off) means false, a bare ``--qkv_linear`` true;
- from-full accepts any checkpoint shardwise reads (HF folders with sharded safetensors too),
  streams instead of loading the model, and writes a ``shardwise.json`` manifest next to
  ``model/`` so converting back needs no flags;
- to-full splits ``weight_qkv`` by head counts, merges plain q/k/v shards, and writes
  ``checkpoint.pt`` (HF names, as the original) plus ``config.json``;
- xser inputs are recognised by the tensor references in their pickles whether or not
  ``--load_xser`` is given; ``--load_xser`` on files that are not xser is refused. ``--save_xser`` writes NxD's
  xser files (reference file, ``.pt.tensors/tensor_<i>.pt``, ``.pt.info.pt``);
- ``--hf_model_name ORG/NAME`` (from-full, without ``--input_dir``, which wins when both are
  given, as in NxD) reads the model from the Hugging Face cache (:mod:`shardwise.hub`: offline
  with ``HF_HUB_OFFLINE``, token from ``HF_TOKEN``, never a prompt); ``--revision`` picks a branch,
  tag or commit;
- ``--hw_backend trn2`` with ``--kv_size_multiplier`` > 1 is refused: the original pairs some
  ranks' query heads with the other group's KV head there (a model that computes something else).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OptionError

__all__ = ["run_nxdt_convert", "parse_bool"]

_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off"}


def parse_bool(value: str | bool) -> bool:
    """``True``/``False``/``1``/``0``/``yes``/``no``/``on``/``off`` (any case) as a bool; OptionError otherwise."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise OptionError(f"{value!r} is not a boolean; use True or False")


def _bool_argument(value: str) -> bool:
    try:
        return parse_bool(value)
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, through the CLI's error path
        raise OptionError(f"nxdt-convert: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shardwise nxdt-convert", description="Convert between HF and NxD/NxDT sharded checkpoints (NxD's flags).")
    flag = dict(type=_bool_argument, nargs="?", const=True, default=False)
    p.add_argument("--input_dir", required=False)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--hf_model_name")
    p.add_argument("--revision", help="branch, tag or commit of --hf_model_name")
    p.add_argument("--config", help="HF config.json (head counts)")
    p.add_argument("--model_style", choices=("hf", "megatron"), default="hf")
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--n_layers", type=int)
    p.add_argument("--kv_size_multiplier", type=int, default=1)
    p.add_argument("--hw_backend", choices=("trn1", "trn2"), default="trn1")
    for name in ("qkv_linear", "fuse_qkv", "convert_from_full_state", "convert_to_full_state", "save_xser", "load_xser"):
        p.add_argument(f"--{name}", **flag)
    return p


def run_nxdt_convert(argv: list[str], progress=None) -> object:
    """Parse NxD's flags and run the conversion; returns the ConvertResult."""
    from ..progress import NO_PROGRESS
    from .convert import convert_layout

    args = _parser().parse_args(argv)
    if args.convert_from_full_state == args.convert_to_full_state:
        raise OptionError("nxdt-convert: give exactly one of --convert_from_full_state and --convert_to_full_state")
    input_dir = args.input_dir
    if args.revision and not args.hf_model_name:
        raise OptionError("nxdt-convert: --revision applies to --hf_model_name")
    if args.hf_model_name and not input_dir:
        if args.convert_to_full_state:
            raise OptionError("nxdt-convert: --hf_model_name names the HF model to convert from (--convert_from_full_state); --convert_to_full_state reads --input_dir")
        from ..hub import hf_model_path

        input_dir = hf_model_path(args.hf_model_name, revision=args.revision)
    if not input_dir:
        raise OptionError("nxdt-convert: --input_dir (or --hf_model_name) is required")
    if args.hw_backend == "trn2" and args.kv_size_multiplier > 1:
        raise OptionError(
            "nxdt-convert: --hw_backend trn2 with --kv_size_multiplier > 1 makes NxD's converter pair query heads with the wrong KV heads; "
            "shardwise writes the trn1 layout, which both backends' GQAQKVColumnParallelLinear reads when loaded through it"
        )
    output = Path(args.output_dir)
    overwrite = output.is_dir() and not any(output.iterdir())  # NxD's users often create the folder first
    progress = progress or NO_PROGRESS
    if args.convert_from_full_state:
        return convert_layout(
            input_dir, output, to="nxdt", style="nxdt" if args.model_style == "hf" else "megatron", tp=args.tp_size, pp=args.pp_size,
            qkv_linear=args.qkv_linear or None, fuse_qkv=args.fuse_qkv or None,
            kv_multiplier=args.kv_size_multiplier if args.qkv_linear or args.fuse_qkv else None,
            config=args.config, expect_layers=args.n_layers, expect={"encoding": "xser" if args.load_xser else None},
            weights_format="xser" if args.save_xser else None, overwrite=overwrite, progress=progress,
        )
    expect = {
        "style": "nxdt" if args.model_style == "hf" else "megatron", "tp": args.tp_size, "pp": args.pp_size,
        "qkv": "fused" if args.fuse_qkv else "linear" if args.qkv_linear else "", "kv_multiplier": args.kv_size_multiplier,
        "encoding": "xser" if args.load_xser else None,
    }
    return convert_layout(
        input_dir, output, to="hf", config=args.config, full_state_file="checkpoint.pt", expect_layers=args.n_layers,
        expect=expect, weights_format="xser" if args.save_xser else "torch", overwrite=overwrite, progress=progress,
    )
