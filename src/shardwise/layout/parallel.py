"""Parallel-layout arithmetic: pipeline stages, head placement, vocabulary padding. Pure.

Every rule that can refuse a layout does it here, with a message that names which number does
not divide which, so the command line can print it as it is.
"""

from __future__ import annotations

from ..errors import LayoutError

__all__ = ["split_layers", "local_heads", "padded_vocab", "check_divides"]


def check_divides(what: str, total: int, by: int, by_what: str, hint: str = "") -> None:
    """LayoutError ``"<by_what> <by> does not divide <total> <what>"`` unless ``by`` divides ``total``."""
    if by <= 0:
        raise LayoutError(f"{by_what} must be at least 1, not {by}")
    if total % by:
        raise LayoutError(f"{by_what} {by} does not divide {total} {what}" + (f"; {hint}" if hint else ""))


def split_layers(num_layers: int, pp: int) -> tuple[tuple[int, int], ...]:
    """(first layer, layer count) of each pipeline stage: even, the remainder one each to the last stages.

    This is how NxD's ``create_partitions`` cuts a model, and an even split when PP divides the
    layer count (NeMo's rule).

    >>> split_layers(5, 2)
    ((0, 2), (2, 3))
    >>> split_layers(10, 4)
    ((0, 2), (2, 2), (4, 3), (7, 3))
    """
    if pp < 1:
        raise LayoutError(f"--pp must be at least 1, not {pp}")
    if num_layers < pp:
        raise LayoutError(f"--pp {pp} is more pipeline stages than the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    stages, first = [], 0
    for stage in range(pp):
        count = base + (1 if stage >= pp - extra else 0)
        stages.append((first, count))
        first += count
    return tuple(stages)


def local_heads(tp_rank: int, tp: int, q_heads: int, kv_heads: int, kv_multiplier: int = 1) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) that TP rank ``tp_rank`` holds, as indexes of the full model's heads.

    KV heads are replicated ``kv_multiplier`` times by tiling (K0 K1 K0 K1 ..., as NxD's
    GQAQKVColumnParallelLinear does on trn1) and the tiled list is cut into TP equal parts. Each
    rank's query heads are those that attend to its KV heads: a KV head's group of query heads is
    cut into ``kv_multiplier`` parts, replica k taking part k. Without replication this is simply
    the contiguous run of heads, as Megatron and NeMo place them.

    >>> local_heads(2, 4, q_heads=8, kv_heads=2, kv_multiplier=2)   # rank 2 holds K0's 2nd replica
    ([2, 3], [0])
    """
    check_divides("query heads", q_heads, tp, "tensor parallel size")
    check_divides("query heads", q_heads, kv_heads, "the KV head count")
    replicated = kv_heads * kv_multiplier
    if kv_multiplier > 1:
        if tp % kv_heads:
            raise LayoutError(f"the model's {kv_heads} KV heads do not divide tensor parallel size {tp}; kv_size_multiplier needs TP to be a multiple of the KV head count")
    check_divides(
        f"KV heads ({kv_heads} x kv_size_multiplier {kv_multiplier})" if kv_multiplier > 1 else "KV heads", replicated, tp,
        "tensor parallel size", hint="" if kv_multiplier > 1 else "replicating KV heads (--kv-size-multiplier with --qkv-linear, nxdt style) lifts this",
    )
    per_group = q_heads // kv_heads
    check_divides("query heads per KV head", per_group, kv_multiplier, "kv_size_multiplier")
    part = per_group // kv_multiplier
    per_rank = replicated // tp
    kv, q = [], []
    for slot in range(tp_rank * per_rank, (tp_rank + 1) * per_rank):
        group, replica = slot % kv_heads, slot // kv_heads
        kv.append(group)
        first = group * per_group + replica * part
        q.extend(range(first, first + part))
    return q, kv


def padded_vocab(vocab: int, multiple: int, tp: int) -> int:
    """``vocab`` rounded up to a multiple of ``multiple`` x ``tp`` (Megatron's _vocab_size_with_padding).

    >>> padded_vocab(32000, 128, 3)
    32256
    """
    step = max(multiple, 1) * tp
    return -(-vocab // step) * step
