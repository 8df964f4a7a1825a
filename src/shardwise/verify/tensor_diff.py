"""Comparing two checkpoints tensor by tensor, in any formats, in bounded memory.

Exact mode (no tolerance given) is bit-exact: two tensors are equal when their names, shapes,
dtypes and bytes match (so ``-0.0`` differs from ``0.0``, and NaN payloads count). Tolerance mode
(``atol`` or ``rtol`` given) compares values as ``|a - b| <= atol + rtol * |b|`` in float64, with
NaNs equal to NaNs and infinities equal to themselves, and accepts different dtypes (so a bf16
copy can be checked against its fp32 original). Bytes are compared chunk by chunk; a value
comparison runs only where bytes differ or dtypes differ, also chunk by chunk.

A sharded checkpoint is also checked on its own, since its canonical tensors read one copy of
each stored rectangle: every replica (norms on every TP rank, repeated KV heads, a tied copy) must
equal the copy read, vocabulary padding rows must be zeros where shardwise wrote them, and every
file its manifest lists must have the manifest's CRC-32 (computed on a background thread while
the comparison reads the same files). Such damage is an IntegrityError naming the file (``diff``
exits 2): the checkpoint is bad input, not a difference between two sound checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..formats import open_checkpoint
from ..reshard.integrity import checked_while_read, files_of
from ..progress import NO_PROGRESS, Progress
from ..tensors import FileTensorSource, TensorInfo, tensor_bytes, tensor_from_bytes
from ..units import CHUNK_BYTES
from ..storage import accepts_urls

__all__ = ["diff", "DiffReport", "Mismatch"]

_CHUNK_ELEMENTS = 4 * 1024 * 1024


@dataclass
class Mismatch:
    """One tensor that differs: ``reason`` is ``shape``, ``dtype`` or ``values``."""

    name: str
    reason: str
    a: dict
    b: dict
    max_abs_diff: float | None = None
    mismatched_elements: int | None = None


@dataclass
class DiffReport:
    """The outcome of :func:`diff`. ``equal`` is the verdict; the lists say why not."""

    a: str
    b: str
    compared: int = 0
    compared_bytes: int = 0
    missing: list[str] = field(default_factory=list)  # in A, not in B
    extra: list[str] = field(default_factory=list)  # in B, not in A
    mismatches: list[Mismatch] = field(default_factory=list)
    atol: float | None = None
    rtol: float | None = None

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.mismatches)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["equal"] = self.equal
        return out


@accepts_urls(inputs=("a", "b", "config"))
def diff(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    trust_pickle: bool = False,
    config: str | os.PathLike | None = None,
    progress: Progress = NO_PROGRESS,
) -> DiffReport:
    """Compare the tensors of checkpoints ``a`` and ``b`` by name (see module docstring).

    Sharded and Megatron-style checkpoints (nxdt folders, sharded archives, nemo-dir) are compared
    through their canonical HuggingFace-named tensors, merged lazily one at a time, so checkpoints
    of different layouts compare equal when they hold the same model. ``config`` is the HF
    config.json for sharded checkpoints that do not carry one. IntegrityError naming the file when
    either side is damaged (see module docstring): a replica or padding row that disagrees, or a
    file whose CRC-32 is not its manifest's.

    >>> shardwise.diff("model.safetensors", "model.pt").equal  # doctest: +SKIP
    True
    """
    report = DiffReport(os.fspath(a), os.fspath(b), atol=atol, rtol=rtol)
    tolerant = atol is not None or rtol is not None
    with _open_side(a, trust_pickle, config) as ca, _open_side(b, trust_pickle, config) as cb, \
            checked_while_read([*files_of(ca), *files_of(cb)]) as verdict:
        _check_copies(ca)
        _check_copies(cb)
        names_a, names_b = ca.tensors.keys(), set(cb.tensors.keys())
        report.missing = [n for n in names_a if n not in names_b]
        report.extra = sorted(names_b.difference(names_a))
        common = [n for n in names_a if n in names_b]
        progress.start(sum(ca.tensors.info(n).nbytes for n in common), "diff")
        try:
            for name in common:
                mismatch = _compare(ca.tensors, cb.tensors, name, tolerant, atol or 0.0, rtol or 0.0)
                info = ca.tensors.info(name)
                report.compared += 1
                report.compared_bytes += info.nbytes
                progress.advance(info.nbytes)
                if mismatch is not None:
                    report.mismatches.append(mismatch)
        finally:
            progress.finish()
        verdict()
    return report


def _open_side(path, trust_pickle: bool, config):
    from ..reshard.canonical import open_layout_checkpoint

    view = open_layout_checkpoint(path, config=config, trust_pickle=trust_pickle)
    return view if view is not None else open_checkpoint(path, trust_pickle=trust_pickle)


def _check_copies(side) -> None:
    """A sharded side's replicas and padding rows, which its canonical tensors do not read (IntegrityError if they disagree)."""
    model = getattr(side.tensors, "model", None)
    if model is not None:
        model.check_copies()


def _describe(info: TensorInfo) -> dict:
    return {"shape": list(info.shape), "dtype": info.dtype}


def _compare(sa: FileTensorSource, sb: FileTensorSource, name: str, tolerant: bool, atol: float, rtol: float) -> Mismatch | None:
    ia, ib = sa.info(name), sb.info(name)
    if ia.shape != ib.shape:
        return Mismatch(name, "shape", _describe(ia), _describe(ib))
    if ia.dtype != ib.dtype and not tolerant:
        return Mismatch(name, "dtype", _describe(ia), _describe(ib))
    if ia.dtype == ib.dtype and _bytes_equal(sa, sb, name):
        return None
    max_diff, bad = _value_difference(sa, sb, name, tolerant, atol, rtol)
    if tolerant and bad == 0:
        return None
    return Mismatch(name, "values", _describe(ia), _describe(ib), max_diff, bad)


def _chunks(source: FileTensorSource, name: str):
    """The tensor's elements as flat torch tensors of at most _CHUNK_ELEMENTS each."""
    info = source.info(name)
    entry = source.stored(name)
    if entry is None or not entry.contiguous:
        flat = source.read(name).reshape(-1)
        for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
            yield flat[start : start + _CHUNK_ELEMENTS]
        return
    for start in range(0, info.numel, _CHUNK_ELEMENTS):
        count = min(_CHUNK_ELEMENTS, info.numel - start)
        buf = bytearray(count * info.itemsize)
        source.read_into(entry, entry.offset + start * info.itemsize, memoryview(buf))
        yield tensor_from_bytes(buf, TensorInfo(name, (count,), info.dtype))


def _raw(chunk) -> memoryview:
    return tensor_bytes(chunk.contiguous())


_COMPARE_BYTES = CHUNK_BYTES


def _bytes_equal(sa: FileTensorSource, sb: FileTensorSource, name: str) -> bool:
    """Bit-exact comparison; for contiguous tensors it reads into two reused buffers, without torch."""
    ea, eb = sa.stored(name), sb.stored(name)
    if ea is None or eb is None or not (ea.contiguous and eb.contiguous):
        return all(bytes(_raw(x)) == bytes(_raw(y)) for x, y in zip(_chunks(sa, name), _chunks(sb, name)))
    total = ea.info.nbytes
    buf_a, buf_b = bytearray(min(total, _COMPARE_BYTES)), bytearray(min(total, _COMPARE_BYTES))
    done = 0
    while done < total:
        n = min(len(buf_a), total - done)
        if n < len(buf_a):
            buf_a, buf_b = bytearray(n), bytearray(n)
        sa.read_into(ea, ea.offset + done, memoryview(buf_a))
        sb.read_into(eb, eb.offset + done, memoryview(buf_b))
        if buf_a != buf_b:  # bytearray comparison is a memcmp; memoryview comparison is not
            return False
        done += n
    return True


def _value_difference(sa, sb, name: str, tolerant: bool, atol: float, rtol: float) -> tuple[float, int]:
    """Max |a-b| over finite differences, and how many elements fail the comparison.

    Tolerant: ``|a-b| <= atol + rtol*|b|`` for finite pairs, NaN equal to NaN, an infinity equal only
    to the same infinity; integers are compared exactly in int64. Exact (same dtype, since exact mode
    rejects dtype mismatches earlier): elements whose bits differ. A NaN or infinity against a
    number makes the reported max difference infinite.
    """
    import torch

    max_diff, bad = 0.0, 0
    for x, y in zip(_chunks(sa, name), _chunks(sb, name)):
        xw, yw = _widen(x, y)
        delta = (xw - yw).abs()
        if tolerant:
            both_finite = torch.isfinite(xw) & torch.isfinite(yw)
            ok = (xw == yw) | (torch.isnan(xw) & torch.isnan(yw)) | (both_finite & (delta <= atol + rtol * yw.abs()))
        else:
            ok = (_bits(x) == _bits(y)).all(dim=1)
        bad += int((~ok).sum())
        finite = torch.isfinite(delta)
        if finite.any():
            max_diff = max(max_diff, float(delta[finite].max()))
        if (~ok & ~finite).any():
            max_diff = float("inf")
    return max_diff, bad


def _widen(x, y):
    """Both chunks in one exact common type: int64 for integers and bools, complex128 or float64 otherwise."""
    import torch

    exact_ints = not (x.is_floating_point() or x.is_complex() or y.is_floating_point() or y.is_complex())
    if exact_ints and torch.uint64 not in (x.dtype, y.dtype):
        return x.to(torch.int64), y.to(torch.int64)
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    return x.to(wide), y.to(wide)


def _bits(flat):
    """One row of raw bytes per element."""
    import torch

    return flat.contiguous().view(torch.uint8).reshape(flat.numel(), flat.element_size())
