"""The ``shardwise`` command line: each subcommand parses its options and calls one library function.

Exit codes: 0 success; 1 a check that ran and found a difference (``diff``); 2 bad usage or bad
input, reported as one line on stderr (``shardwise: error: ...``) and never as a traceback.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import ShardwiseError
from .units import format_bytes

app = typer.Typer(
    name="shardwise",
    help="Inspect, convert and compare deep-learning checkpoints, streaming and safely.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

TrustPickle = typer.Option(False, "--trust-pickle", help="Allow pickled globals outside the safe allow-list (runs code from the file).")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress bar.")
Style = typer.Option(None, "--style", help="Tensor naming of sharded outputs: nxdt or megatron (nxdt folders), mcore (archives).")
TP = typer.Option(None, "--tp", help="Tensor-parallel size of the output.")
PP = typer.Option(None, "--pp", help="Pipeline-parallel size of the output.")
QkvLinear = typer.Option(False, "--qkv-linear", help="nxdt: qkv_proj.weight_q/_k/_v (GQAQKVColumnParallelLinear); megatron: query + key_value.")
FuseQkv = typer.Option(False, "--fuse-qkv", help="nxdt: one qkv_proj.weight_qkv per rank, [Q_r; K_r; V_r].")
KvMultiplier = typer.Option(None, "--kv-size-multiplier", help="nxdt: replicate each KV head K times so TP may exceed the KV head count.")
HfModelName = typer.Option(
    None, "--hf-model-name",
    help="Take the model ORG/NAME from the Hugging Face cache (HF_HOME/HF_HUB_CACHE; fetched into it unless HF_HUB_OFFLINE is set; token from HF_TOKEN).",
)
Revision = typer.Option(None, "--revision", help="Branch, tag or commit of --hf-model-name (default: main).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shardwise {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Inspect, convert and compare deep-learning checkpoints, streaming and safely."""


def _progress(quiet: bool):
    from .progress import terminal_progress

    return terminal_progress(quiet=quiet)


def _shown(path: Path) -> str:
    """A path argument as the user wrote it (typer's Path folds ``s3://b/k`` into ``s3:/b/k``)."""
    from .storage.urls import url_text

    return url_text(path) or str(path)


def _paths(hf_model_name: Optional[str], revision: Optional[str], given: tuple[Optional[Path], ...], names: tuple[str, ...]) -> list[Path]:
    """A command's checkpoint paths, the first of which ``--hf-model-name`` may replace.

    Without it every one of ``names`` must be given; with it the first is the model's folder in
    the Hugging Face cache and the paths given fill the others, in order (``convert --hf-model-name
    ORG/NAME out/``: the one path is DST).
    """
    from .errors import OptionError

    present = [p for p in given if p is not None]
    if hf_model_name is None:
        if revision is not None:
            raise OptionError("--revision applies to --hf-model-name")
        missing = [name for name, p in zip(names, given) if p is None]
        if missing:
            raise OptionError(f"missing argument {missing[0]}")
        return present
    if len(present) != len(names) - 1:
        rest = f"give only {' '.join(names[1:])}" if len(names) > 1 else f"give no {names[0]}"
        raise OptionError(f"--hf-model-name takes the place of {names[0]}; {rest}")
    from .hub import hf_model_path

    return [hf_model_path(hf_model_name, revision=revision), *present]


@app.command()
def inspect(
    path: Optional[Path] = typer.Argument(None, help="A checkpoint file or folder (omitted with --hf-model-name)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of tables."),
    show_all: bool = typer.Option(False, "--all", help="List every tensor (the table shows the first 40)."),
    hf_model_name: Optional[str] = HfModelName,
    revision: Optional[str] = Revision,
    trust_pickle: bool = TrustPickle,
) -> None:
    """Show what a checkpoint is: format, tensors, parameters, dtypes, config, training state."""
    from .report import inspect_path

    (path,) = _paths(hf_model_name, revision, (path,), ("PATH",))
    summary = inspect_path(path, trust_pickle=trust_pickle)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        from .render import render_inspect

        render_inspect(summary, show_all=show_all)


@app.command()
def convert(
    src: Optional[Path] = typer.Argument(None, help="The checkpoint to read (file or folder); with --hf-model-name, leave it out."),
    dst: Optional[Path] = typer.Argument(None, help="Where to write (a file, or a folder for hf and sharded outputs)."),
    to: Optional[str] = typer.Option(None, "--to", help="safetensors, torch, hf, archive, nemo-dir, nxdt or dcp (default: from DST's suffix; .nemo is an archive)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast floating tensors: bf16, fp16 or fp32."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Shard the output, e.g. 5GB or 500MiB (--to hf: 50GB, as save_pretrained)."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json to put into an hf output."),
    weights_format: Optional[str] = typer.Option(None, "--weights-format", help="How weights are stored: archives torch (model_weights.ckpt, default) or safetensors; nxdt torch (default) or xser."),
    hparams_file: Optional[Path] = typer.Option(None, "--hparams-file", help="Archive config from this YAML instead of the checkpoint's hyper_parameters.cfg."),
    checkpoint_name: Optional[str] = typer.Option(None, "--checkpoint-name", help="Which .ckpt to take from each mp_rank_XX / tp_rank_XX_pp_rank_XXX folder."),
    style: Optional[str] = Style,
    tp: Optional[int] = TP,
    pp: Optional[int] = PP,
    qkv_linear: bool = QkvLinear,
    fuse_qkv: bool = FuseQkv,
    kv_multiplier: Optional[int] = KvMultiplier,
    arch: Optional[str] = typer.Option(None, "--arch", help="OpenCLIP architecture of a bare OpenCLIP state dict (ViT-B-32, ViT-L-14, ...); converts it as a CLIP."),
    hf_model_name: Optional[str] = HfModelName,
    revision: Optional[str] = Revision,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists (atomically)."),
    quiet: bool = Quiet,
    trust_pickle: bool = TrustPickle,
) -> None:
    """Convert between formats and parallel layouts, one tensor at a time; bit-exact unless --dtype is given."""
    from .engine import convert as run

    src, dst = _paths(hf_model_name, revision, (src, dst), ("SRC", "DST"))
    result = run(
        src, dst, to=to, dtype=dtype, max_shard_size=max_shard_size, config=config, weights_format=weights_format,
        hparams_file=hparams_file, checkpoint_name=checkpoint_name, style=style, tp=tp, pp=pp, qkv_linear=qkv_linear or None,
        fuse_qkv=fuse_qkv or None, kv_multiplier=kv_multiplier, arch=arch, overwrite=overwrite, trust_pickle=trust_pickle, progress=_progress(quiet),
    )
    _report(result)


def _report(result) -> None:
    for warning in result.warnings:
        typer.echo(f"shardwise: warning: {printable(warning)}", err=True)
    typer.echo(
        f"wrote {result.path} ({result.format}): {result.num_tensors} tensors, "
        f"{format_bytes(result.total_bytes)} in {len(result.files)} file(s), {result.seconds:.2f} s"
    )


@app.command()
def reshard(
    src: Path = typer.Argument(..., help="A sharded checkpoint: nxdt folder, archive or nemo-dir (Llama family, or CLIP archives: TP only)."),
    dst: Path = typer.Argument(..., help="Where to write the same format and style at the new layout."),
    tp: Optional[int] = TP,
    pp: Optional[int] = PP,
    kv_multiplier: Optional[int] = KvMultiplier,
    config: Optional[Path] = typer.Option(None, "--config", help="HF config.json, for checkpoints that do not carry one (NxD-written folders)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast floating tensors: bf16, fp16 or fp32."),
    weights_format: Optional[str] = typer.Option(None, "--weights-format", help="Change how weights are stored (default: as the source): torch, safetensors (archives), xser (nxdt)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists (atomically)."),
    quiet: bool = Quiet,
    trust_pickle: bool = TrustPickle,
) -> None:
    """Change the TP/PP layout of a sharded checkpoint, keeping its format and style, streaming shard to shard."""
    from .reshard.convert import convert_layout

    _report(convert_layout(
        src, dst, tp=tp, pp=pp, kv_multiplier=kv_multiplier, config=config, dtype=dtype, keep_layout=True,
        weights_format=weights_format, overwrite=overwrite, trust_pickle=trust_pickle, progress=_progress(quiet),
    ))


@app.command(
    "nxdt-convert",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def nxdt_convert(ctx: typer.Context) -> None:
    """NxD's checkpoint_converter.py flags (--input_dir --output_dir --tp_size ... --convert_from_full_state); see --help."""
    from .reshard.nxdt_cli import run_nxdt_convert

    _report(run_nxdt_convert(list(ctx.args), progress=_progress(False)))


@app.command()
def diff(
    a: Optional[Path] = typer.Argument(None, help="First checkpoint (with --hf-model-name, leave it out)."),
    b: Optional[Path] = typer.Argument(None, help="Second checkpoint."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance (default: bit-exact)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (default: bit-exact)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
    config: Optional[Path] = typer.Option(None, "--config", help="HF config.json for sharded checkpoints that do not carry one."),
    hf_model_name: Optional[str] = HfModelName,
    revision: Optional[str] = Revision,
    quiet: bool = Quiet,
    trust_pickle: bool = TrustPickle,
) -> None:
    """Compare tensors by name (sharded checkpoints by their merged tensors); exit 0 when equal, 1 when not."""
    from .verify.tensor_diff import diff as run

    a, b = _paths(hf_model_name, revision, (a, b), ("A", "B"))
    report = run(a, b, atol=atol, rtol=rtol, trust_pickle=trust_pickle, config=config, progress=_progress(quiet))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        from .render import render_diff

        render_diff(report)
    raise typer.Exit(0 if report.equal else 1)


@app.command()
def verify(
    ckpt: Path = typer.Argument(..., help="A Llama-family checkpoint in any layout (nxdt folder, archive, nemo-dir, HF)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="The HF folder whose LlamaForCausalLM logits are the reference (or --hf-model-name)."),
    config: Optional[Path] = typer.Option(None, "--config", help="HF config.json for checkpoints that do not carry one (default: the reference's)."),
    atol: float = typer.Option(1e-4, "--atol", help="Largest accepted absolute logit difference (fp32)."),
    seq_len: int = typer.Option(16, "--seq-len", help="Tokens per sequence."),
    batch: int = typer.Option(2, "--batch", help="Sequences."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random tokens."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds before the ranks are stopped."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
    hf_model_name: Optional[str] = HfModelName,
    revision: Optional[str] = Revision,
    trust_pickle: bool = TrustPickle,
) -> None:
    """Run the checkpoint under its own TP x PP layout (gloo processes) and compare logits with transformers; exit 0 when within --atol, 1 when not."""
    from .verify.logits import verify_logits

    (reference,) = _paths(hf_model_name, revision, (reference,), ("--reference",))

    report = verify_logits(ckpt, reference, config=config, atol=atol, seq_len=seq_len, batch=batch, seed=seed, timeout=timeout, trust_pickle=trust_pickle)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        verdict = "match" if report.passed else "DIFFER"
        typer.echo(
            f"logits {verdict}: max abs difference {report.max_abs_diff:.3g} (atol {report.atol:g}) over {'x'.join(map(str, report.shape))} logits; "
            f"{report.style} TP={report.tp} PP={report.pp}, {report.tp * report.pp} processes, {report.seconds:.1f} s"
        )
    raise typer.Exit(0 if report.passed else 1)


@app.command("clip-infer")
def clip_infer(
    archive: Path = typer.Argument(..., help="A Megatron-core CLIP archive (.nemo, any TP) or its unpacked folder."),
    more_texts: Optional[list[str]] = typer.Argument(None, hidden=True),
    image: Path = typer.Option(..., "--image", help="The image to classify (any format Pillow reads)."),
    texts: Optional[list[str]] = typer.Option(None, "--texts", help="The candidate texts: --texts 'a dog' 'a cat' ... (or --texts repeated)."),
    fixed_scale: bool = typer.Option(False, "--fixed-scale", help="Multiply cosines by 100, as NeMo's megatron_clip_infer.py does, not by the model's exp(logit_scale)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="A folder of HF tokenizer files, for archives that carry none."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
    trust_pickle: bool = TrustPickle,
) -> None:
    """Zero-shot CLIP: each text's probability for the image, computed from the archive's own Megatron-core tensors, highest first."""
    from .verify.clip_infer import clip_infer as run

    scores = run(archive, image, [*(texts or []), *(more_texts or [])], fixed_scale=fixed_scale, tokenizer=tokenizer, trust_pickle=trust_pickle)
    if as_json:
        typer.echo(json.dumps(scores.as_dict(), indent=2))
        return
    for text, probability in scores.ranked():
        typer.echo(f"{probability:.4f}  {text}")


@app.command()
def pack(
    folder: Path = typer.Argument(..., help="The folder to pack (e.g. an unpacked archive)."),
    archive: Path = typer.Argument(..., help="The tar archive to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace ARCHIVE if it exists (atomically)."),
) -> None:
    """Pack a folder into an uncompressed tar with ./ member names (with a manifest for model folders)."""
    from .archive.unpack import pack as run

    names = run(folder, archive, overwrite=overwrite)
    typer.echo(f"wrote {_shown(archive)}: {len(names)} files")


@app.command()
def unpack(
    archive: Path = typer.Argument(..., help="The archive (.nemo or any tar, gzip too)."),
    folder: Path = typer.Argument(..., help="The folder to create."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace FOLDER if it exists (atomically)."),
) -> None:
    """Unpack an archive safely: absolute paths, '..', links and devices are refused; checksums are checked."""
    from .archive.unpack import unpack as run

    names = run(archive, folder, overwrite=overwrite)
    typer.echo(f"wrote {_shown(folder)}: {len(names)} files")


@app.command("zero-convert")
def zero_convert(
    src: Path = typer.Argument(..., help="A checkpoint tag folder (checkpoint, model/, optim/, ...)."),
    dst: Path = typer.Argument(..., help="The checkpoint tag folder to write (a complete copy with the converted optim/)."),
    to_full: bool = typer.Option(False, "--to-full", help="Merge each TP/PP rank's ZeRO-1 shards into optim/full_tp_rank_TT_pp_rank_PP.pt."),
    to_sharded: bool = typer.Option(False, "--to-sharded", help="Split the optimizer state over --dp N ranks (input sharded or full)."),
    dp: Optional[int] = typer.Option(None, "--dp", help="DP size of the output (with --to-sharded)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists (atomically)."),
    quiet: bool = Quiet,
    trust_pickle: bool = TrustPickle,
) -> None:
    """Merge or re-shard a checkpoint's ZeRO-1 optimizer state over DP (NxD's nxd_convert_zero_checkpoints), writing a complete checkpoint."""
    from .errors import OptionError
    from .training.zero_convert import zero_convert as run

    if to_full == to_sharded:
        raise OptionError("give exactly one of --to-full and --to-sharded")
    result = run(src, dst, to_full=to_full, dp=dp, overwrite=overwrite, trust_pickle=trust_pickle)  # no progress bar: --quiet changes nothing yet
    typer.echo(
        f"wrote {result.path}: {result.optimizer} optimizer state at DP={result.dp}, {len(result.written)} optimizer file(s) "
        f"written, {len(result.copied)} file(s) copied, {result.seconds:.2f} s"
    )


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (controls, escape sequences, line and
    paragraph separators) written as a Python escape, so that a message quoting a hostile file's
    bytes stays one line and cannot drive the terminal.

    >>> printable("bad\\x1b[2Jname\\n")
    'bad\\\\x1b[2Jname\\\\n'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _Terminated(BaseException):
    """SIGTERM, raised so that every ``finally`` runs (staging paths, temporary copies); a
    BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""


@contextlib.contextmanager
def _sigterm_cleans_up():
    """While the block runs, SIGTERM raises :class:`_Terminated` in the main thread instead of ending
    the process on the spot, which would skip every ``finally`` and leave temporary files (a gzip
    archive's decompressed copy, staging folders). Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning deliberate errors into one stderr line and exit code 2
    (Ctrl-C: 130, SIGTERM: 143, both after removing partial output and temporary copies)."""
    from .archive.tar_index import shared_decompression

    try:
        with _sigterm_cleans_up(), shared_decompression():  # a command that opens a gzip archive twice decompresses it once
            code = app(args=argv, prog_name="shardwise", standalone_mode=False)
    except ShardwiseError as e:
        print(f"shardwise: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, full disks: name the file, not a traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(printable(f"shardwise: error: {where}{e.strerror or e}"), file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as e:
        how = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"shardwise: {how}; no partial output was left behind (an s3:// output being replaced is gone or incomplete)", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 130
    except Exception as e:
        # usage errors (unknown option, missing argument) come from the click that typer bundles
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return 2
        raise
    return code if isinstance(code, int) else 0


def entry() -> None:
    sys.exit(run())

