"""``shardwise verify CKPT --reference HF_DIR``: a real TP x PP forward on the shards against transformers.

:func:`verify_logits` starts one process per (tp_rank, pp_rank) of the checkpoint's layout, joined
in a ``torch.distributed`` gloo job on 127.0.0.1 (:mod:`.tp_llama`); each reads only its own shard
and runs its part of a Llama forward, with the tensor-parallel all-reduces and gathers and the
pipeline's sends a real run does. The logits of the last stage are compared, in float32, with
``LlamaForCausalLM.from_pretrained(reference)`` on the same random tokens. A conversion whose tiles
round-trip but are not where a TP run reads them fails here with a large difference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import errors
from ..atomic import temporary_folder
from ..errors import FormatError, LayoutError, OptionError, ShardwiseError
from ..formats.hf import read_config
from ..layout.sharding import stored_name, style_of
from ..models.llama import dims_from_hf_config
from ..reshard.model import ShardedModel, open_model
from ..storage import accepts_urls

__all__ = ["verify_logits", "VerifyReport", "VerifyError", "FAULT_ENV"]

# Test hook: "RANK" makes that global rank raise after joining the job, "RANK:hang" makes it sleep.
FAULT_ENV = "SHARDWISE_VERIFY_FAULT"
_DIMS = ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers")


class VerifyError(ShardwiseError, RuntimeError):
    """The parallel forward did not complete: a rank failed, crashed or timed out."""


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_logits`; ``passed`` is ``max_abs_diff <= atol``."""

    checkpoint: str
    reference: str
    style: str
    tp: int
    pp: int
    shape: tuple[int, ...]  # compared logits: (batch, seq, vocab)
    max_abs_diff: float
    atol: float
    passed: bool
    container: str = ""
    qkv: str = ""
    kv_multiplier: int = 1
    seconds: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@accepts_urls(inputs=("ckpt", "reference", "config"))
def verify_logits(
    ckpt: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    tokens=None,
    seq_len: int = 16,
    batch: int = 2,
    seed: int = 0,
    atol: float = 1e-4,
    trust_pickle: bool = False,
    timeout: float = 300.0,
) -> VerifyReport:
    """Run the sharded checkpoint ``ckpt`` as TP x PP processes and compare its logits with ``reference``.

    ``reference`` is an HF model folder; ``config`` an HF config.json for checkpoints that do not
    carry one (without it, the reference's config.json is used when the checkpoint has none).
    ``tokens`` (batch x seq ids) replaces the ``batch`` x ``seq_len`` random ids drawn with ``seed``.
    LayoutError/FormatError when the checkpoint cannot be run or does not match the reference;
    VerifyError when a rank fails or the job exceeds ``timeout`` seconds.
    """
    import torch

    started = time.perf_counter()
    reference = Path(reference)
    ref_config = _reference_config(reference)
    ref_dims = dims_from_hf_config(ref_config, str(reference))
    ids = _tokens(tokens, batch, seq_len, seed, ref_dims.vocab)
    if not atol >= 0:
        raise OptionError(f"--atol must be a number >= 0, not {atol!r}")
    if not timeout > 0:
        raise OptionError(f"timeout must be positive, not {timeout!r}")
    model, config = _open(Path(ckpt), config, reference, trust_pickle)
    try:
        _check_matches(model, ref_dims, reference)
        from .tp_llama import runtime_constants  # torch, only when verifying

        constants = runtime_constants(model.layout.style, model.hf_config, model.nemo_config)
        layout, container = model.layout, model.container
    finally:
        model.close()
    with temporary_folder("shardwise-verify-") as work:
        torch.save(ids, work / "tokens.pt")
        spec = {
            "checkpoint": str(Path(ckpt).resolve()),
            "config": str(Path(config).resolve()) if config is not None else None,
            "trust_pickle": trust_pickle,
            "tp": layout.tp,
            "pp": layout.pp,
            "tokens": str(work / "tokens.pt"),
            "work": str(work),
            "timeout": timeout,
            "constants": constants,
            "fault": os.environ.get(FAULT_ENV, ""),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        deadline = time.monotonic() + timeout
        launcher = _launch(work, layout.tp * layout.pp)
        try:
            expected = _reference_logits(reference, ids)  # while the ranks run
            _wait(launcher, work, layout.tp, layout.tp * layout.pp, deadline, timeout)
        finally:
            _kill(launcher)
        logits_file = work / "logits.pt"
        if not logits_file.exists():
            raise VerifyError(f"{ckpt}: the last pipeline stage wrote no logits")
        got = torch.load(logits_file, weights_only=True)
    if got.shape[:2] != expected.shape[:2] or got.shape[-1] < expected.shape[-1]:
        raise VerifyError(f"{ckpt}: the parallel run gave logits of shape {list(got.shape)}, the reference {list(expected.shape)}")
    got = got[..., : expected.shape[-1]].float()
    diff = (got - expected.float()).abs()
    max_abs = float(diff.max()) if bool(torch.isfinite(diff).all()) else float("inf")
    return VerifyReport(
        checkpoint=str(ckpt), reference=str(reference), style=layout.style, tp=layout.tp, pp=layout.pp,
        shape=tuple(expected.shape), max_abs_diff=max_abs, atol=float(atol), passed=max_abs <= atol,
        container=container, qkv=layout.qkv, kv_multiplier=layout.kv_multiplier,
        seconds=round(time.perf_counter() - started, 3),
    )


# -- inputs -----------------------------------------------------------------------------------------
def _reference_config(reference: Path) -> dict:
    if not reference.is_dir():
        raise FormatError(f"{reference}: --reference must be an HF model folder (config.json and weights)")
    if not (reference / "config.json").is_file():
        raise FormatError(f"{reference}: has no config.json; --reference must be an HF model folder")
    return read_config(reference / "config.json")


def _tokens(tokens, batch: int, seq_len: int, seed: int, vocab: int):
    import torch

    if tokens is None:
        for name, value in (("batch", batch), ("seq_len", seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (batch, seq_len), generator=generator, dtype=torch.long)
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as e:
        raise OptionError(f"tokens must be a batch x sequence array of token ids: {e}") from None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise OptionError(f"tokens must be a non-empty batch x sequence array of integer ids, not {ids.dtype} of shape {list(ids.shape)}")
    ids = ids.to(torch.long)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise OptionError(f"token ids must lie in [0, {vocab}) (the reference's vocabulary), not [{int(ids.min())}, {int(ids.max())}]")
    return ids.contiguous()


def _open(ckpt: Path, config, reference: Path, trust_pickle: bool) -> tuple[ShardedModel, object]:
    """The checkpoint, with the config it was opened with (its own, ``config``, or the reference's)."""
    try:
        return open_model(ckpt, config=config, trust_pickle=trust_pickle), config
    except LayoutError as e:
        if config is not None or "--config" not in str(e):
            raise
        first = e
    fallback = reference / "config.json"
    try:
        return open_model(ckpt, config=fallback, trust_pickle=trust_pickle), fallback
    except ShardwiseError:
        raise first from None


def _check_matches(model: ShardedModel, ref, reference: Path) -> None:
    """LayoutError unless the checkpoint is the reference's architecture with a vocabulary that covers it."""
    dims = model.dims
    for key in _DIMS:
        mine, theirs = getattr(dims, key), getattr(ref, key)
        if mine != theirs:
            raise LayoutError(f"{model.path}: has {key.replace('_', ' ')} {mine}, the reference {reference} has {theirs}")
    style, layout = style_of(model.layout.style), model.layout
    embed = stored_name(style, layout, "embed")
    first = model.shards[(0, 0)]
    rows = first.info(embed).shape[0] * layout.tp if embed in first else dims.vocab
    padded_only = model.hf_config is None  # an mcore checkpoint without config knows only its padded vocabulary
    if (not padded_only and dims.vocab != ref.vocab) or rows < ref.vocab:
        raise LayoutError(
            f"{model.path}: has a vocabulary of {dims.vocab} ({rows} stored rows), the reference {reference} has {ref.vocab}; "
            "they are not the same model"
        )


# -- the job --------------------------------------------------------------------------------------------
# One launcher process imports torch and the runtime once and forks the ranks from a clean,
# single-threaded state (:func:`.tp_llama.launch_ranks`); it leads its own session, so stopping the
# job is one killpg of that session's id.
def _child_env() -> dict:
    import shardwise

    env = dict(os.environ)
    src = str(Path(shardwise.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _launch(work: Path, world: int) -> subprocess.Popen:
    code = "from shardwise.verify.tp_llama import main; main()"
    with open(work / "launcher.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(work / "spec.json"), str(world)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=work, start_new_session=True,
        )


def _kill(launcher: subprocess.Popen) -> None:
    """Kill the launcher's session (the launcher and every rank it forked), then reap the launcher.

    A launcher that has exited has reaped its ranks already (and they die with it: PDEATHSIG).
    """
    if launcher.poll() is None:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        launcher.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _wait(launcher: subprocess.Popen, work: Path, tp: int, world: int, deadline: float, timeout: float) -> None:
    while True:
        code = launcher.poll()
        if code == 0:
            return
        if code is not None:
            raise _rank_failure(code, work, tp)
        if time.monotonic() > deadline:
            raise VerifyError(f"the parallel forward did not finish within {timeout:g} s; stopped its {world} processes")
        time.sleep(0.02)


def _rank_failure(code: int, work: Path, tp: int) -> ShardwiseError:
    """The error of the rank that failed first, as the same shardwise error when it was one."""
    reports = []
    for path in work.glob("error-*.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if reports:
        cause = min(reports, key=lambda r: (not r["shardwise"], r["time"]))
        cls = getattr(errors, cause["type"], None)
        if cause["shardwise"] and isinstance(cls, type) and issubclass(cls, ShardwiseError):
            return cls(cause["message"])
        rank = cause["rank"]
        return VerifyError(f"rank {rank} (TP rank {rank % tp}, PP rank {rank // tp}) failed: {cause['type']}: {cause['message']}")
    try:
        lines = (work / "launcher.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return VerifyError(f"the parallel forward failed (launcher exit code {code}){': ' + lines[-1] if lines else ''}")


def _reference_logits(reference: Path, ids):
    import torch

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a loading bar per verify is noise on the command line
    try:
        model = LlamaForCausalLM.from_pretrained(reference, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, TypeError) as e:
        lines = str(e).strip().splitlines()
        raise FormatError(f"{reference}: transformers cannot load it as LlamaForCausalLM: {lines[0] if lines else type(e).__name__}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model = model.float().eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
