"""How a CLIP is cut into Megatron-core tensor-parallel shards (NeMo's ``mp_rank_XX``). Pure: tiles, no I/O.

:func:`clip_shard_plan` gives, for every TP rank, the tensors that rank stores (mcore names) as
tiles of the canonical (HF) tensors. Pipeline parallelism is not used (PP = 1, as NeMo's CLIP).
The rules, per layer of either tower (H heads of ``d`` = width / H rows each, TP ranks ``r``):

- ``linear_qkv`` weight and bias: column-parallel; rank ``r`` holds heads ``r*H/TP .. (r+1)*H/TP-1``,
  each as its ``[q_h; k_h; v_h]`` rows (Megatron-core's interleave per query group; CLIP has one
  K/V head per query head), which is what NeMo's converter writes at TP = 1;
- ``linear_proj`` weight: row-parallel, the columns of the same heads; its bias is whole on every rank;
- ``linear_fc1`` weight and bias: rows split evenly; ``linear_fc2`` weight: columns split, bias whole;
- layer norms (fused into ``linear_qkv``/``linear_fc1``), position embeddings, the patch
  convolution, ``ln_pre``, the final layer norms, both heads and the logit scale: whole on every rank;
- the class token: whole, stored ``(1, 1, width)`` from HF's ``(width,)`` (same bytes);
- the word embedding: vocabulary-parallel, padded with zero rows to ``padded_vocab`` (a multiple of
  ``make_vocab_size_divisible_by`` x TP), ``padded_vocab / TP`` rows per rank.

The inverse (shards to HF tensors) and resharding follow from the same tiles
(:func:`~shardwise.layout.tiles.invert`, :func:`~shardwise.layout.tiles.compose`).
"""

from __future__ import annotations

from ..errors import LayoutError
from ..models.clip import HF, MCORE, ClipDims, name_of
from ..tensors import TensorInfo
from .build import replicated, side_by_side, stacked_rows, vocab_pieces
from .parallel import check_divides
from .tiles import TiledTensor

__all__ = ["clip_shard_plan", "check_clip_tp"]

Shard = tuple[int, int]


def check_clip_tp(dims: ClipDims, tp: int, pp: int = 1) -> None:
    """LayoutError unless both towers' heads and MLP widths split evenly over ``tp`` and ``pp`` is 1."""
    if pp != 1:
        raise LayoutError(f"--pp {pp}: CLIP archives are tensor-parallel only (pipeline size 1, as NeMo's CLIP)")
    for where, tower in (("vision", dims.vision), ("text", dims.text)):
        check_divides(f"{where} attention heads", tower.heads, tp, "tensor parallel size")
        check_divides(f"{where} MLP rows", tower.mlp, tp, "tensor parallel size")


def clip_shard_plan(dims: ClipDims, canonical: dict[str, TensorInfo], tp: int, padded_vocab: int) -> dict[Shard, list[TiledTensor]]:
    """Every TP rank's mcore tensors as tiles of ``canonical`` (HF names; see module docstring).

    ``padded_vocab`` must be a multiple of ``tp`` and at least the vocabulary. LayoutError when the
    model cannot be cut that way, or a canonical tensor is missing.

    >>> plan = clip_shard_plan(dims, canonical_infos(dims, "float32"), 2, 512)  # doctest: +SKIP
    >>> [t.info.name for t in plan[(1, 0)]][:2]  # doctest: +SKIP
    ['model.logit_scale', 'model.vision_encoder.class_token']
    """
    check_clip_tp(dims, tp)
    if padded_vocab % tp or padded_vocab < dims.vocab:
        raise LayoutError(f"a padded vocabulary of {padded_vocab} rows cannot hold {dims.vocab} tokens over tensor parallel size {tp}")

    def src(tower: str, role: str, layer: int | None = None) -> TensorInfo:
        name = name_of(HF, tower, role, layer)
        try:
            return canonical[name]
        except KeyError:
            raise LayoutError(f"the model has no tensor {name}") from None

    def same(tower: str, role: str) -> TiledTensor:
        return replicated(name_of(MCORE, tower, role), src(tower, role))

    plan: dict[Shard, list[TiledTensor]] = {}
    for rank in range(tp):
        out = [same("", "logit_scale")]
        cls = src("vision", "class")
        out.append(stacked_rows(name_of(MCORE, "vision", "class"), [(cls, 0, cls.shape[0])], 1, shape=(1, 1, cls.shape[0])))
        out += [same("vision", role) for role in ("patch", "pos", "ln_pre.weight", "ln_pre.bias")]
        out += _tower_layers("vision", dims, rank, tp, src)
        out += [same("vision", role) for role in ("ln_post.weight", "ln_post.bias", "proj")]
        token = src("text", "token")
        out.append(stacked_rows(name_of(MCORE, "text", "token"), vocab_pieces(token, dims.vocab, padded_vocab, tp, rank), token.shape[1], token.dtype))
        out.append(same("text", "pos"))
        out += _tower_layers("text", dims, rank, tp, src)
        out += [same("text", role) for role in ("ln_post.weight", "ln_post.bias", "proj")]
        plan[(rank, 0)] = out
    return plan


def _tower_layers(tower: str, dims: ClipDims, rank: int, tp: int, src) -> list[TiledTensor]:
    t = dims.tower(tower)
    d, per_rank, mlp = t.head_dim, t.heads // tp, t.mlp // tp
    heads = range(rank * per_rank, (rank + 1) * per_rank)
    out: list[TiledTensor] = []
    for layer in range(t.layers):
        name = lambda role: name_of(MCORE, tower, role, layer)  # noqa: E731
        whole_tensor = lambda role: replicated(name(role), src(tower, role, layer))  # noqa: E731
        out += [whole_tensor("ln1.weight"), whole_tensor("ln1.bias")]
        for p in ("weight", "bias"):
            q, k, v = (src(tower, f"{r}.{p}", layer) for r in "qkv")
            pieces = [piece for h in heads for piece in ((q, h * d, d), (k, h * d, d), (v, h * d, d))]
            out.append(stacked_rows(name(f"qkv.{p}"), pieces, t.width if p == "weight" else 1, shape=None if p == "weight" else (3 * d * per_rank,)))
        out.append(side_by_side(name("o.weight"), src(tower, "o.weight", layer), [(h * d, d) for h in heads]))
        out += [whole_tensor("o.bias"), whole_tensor("ln2.weight"), whole_tensor("ln2.bias")]
        fc1_w, fc1_b = src(tower, "fc1.weight", layer), src(tower, "fc1.bias", layer)
        out.append(stacked_rows(name("fc1.weight"), [(fc1_w, rank * mlp, mlp)], t.width))
        out.append(stacked_rows(name("fc1.bias"), [(fc1_b, rank * mlp, mlp)], 1, shape=(mlp,)))
        out.append(side_by_side(name("fc2.weight"), src(tower, "fc2.weight", layer), [(rank * mlp, mlp)]))
        out.append(whole_tensor("fc2.bias"))
    return out
