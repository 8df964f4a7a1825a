"""How a Llama-family model is cut into TP x PP shards in each style. Pure: tiles, no I/O.

:func:`shard_plan` gives, for every (tp_rank, pp_rank), the tensors that rank stores and the tiles
of the canonical (HuggingFace) tensors they are made of. The rules, one per role:

- embedding and lm_head: rows (vocabulary) split evenly over TP, after padding the vocabulary
  with zero rows where the style pads (``mcore``); embedding on the first stage, lm_head and the
  final norm on the last (a tied model stores a copy of the embedding as lm_head on the last
  stage when PP > 1, as Megatron does);
- norms and rotary ``inv_freq``: whole, on every TP rank;
- q, k, v: each rank takes the heads :func:`~shardwise.layout.parallel.local_heads` gives it,
  arranged as the style fuses them; o_proj takes the matching columns (row-parallel);
- gate and up: rows split, stored fused as [gate_r; up_r] where the style fuses them; down:
  columns split (row-parallel).

The inverse direction (shards to full tensors) and shard-to-shard resharding are derived from
these same tiles by :func:`~shardwise.layout.tiles.invert` and :func:`~shardwise.layout.tiles.compose`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import LayoutError
from ..models.llama import CANONICAL, LAYER_ROLES, STYLES, LlamaDims, Style
from ..tensors import TensorInfo
from .parallel import check_divides, local_heads, padded_vocab, split_layers
from .build import Piece, replicated, side_by_side, stacked_rows, vocab_pieces
from .tiles import TiledTensor

__all__ = ["ShardedLayout", "shard_plan", "canonical_infos", "stored_name"]

Shard = tuple[int, int]  # (tp_rank, pp_rank)


@dataclass(frozen=True)
class ShardedLayout:
    """A parallel layout: style, TP, PP and the options that change how tensors are stored.

    ``qkv`` and ``norms`` are keys of the style's tables (empty means the style's default);
    ``stages`` is (first layer, layer count) per pipeline stage (None: NxD's even split);
    ``vocab_multiple`` overrides the style's vocabulary padding multiple (None: the style's).
    """

    style: str
    tp: int = 1
    pp: int = 1
    qkv: str = ""
    norms: str = ""
    kv_multiplier: int = 1
    vocab_multiple: int | None = None
    stages: tuple[tuple[int, int], ...] | None = None

    def resolved(self, num_layers: int) -> "ShardedLayout":
        """This layout with every default filled in and checked against the style."""
        style = style_of(self.style)
        qkv = self.qkv or style.default_qkv
        norms = self.norms or style.default_norms
        if qkv not in style.qkv:
            raise LayoutError(f"style {style.name} has no Q/K/V option {qkv!r}; choose {', '.join(style.qkv)}")
        if norms not in style.norms:
            raise LayoutError(f"style {style.name} has no norm option {norms!r}; choose {', '.join(style.norms)}")
        if not style.tp_allowed and (self.tp, self.pp) != (1, 1):
            raise LayoutError(f"style {style.name} is unsharded; it cannot have TP={self.tp}, PP={self.pp}")
        if self.kv_multiplier < 1:
            raise LayoutError(f"kv_size_multiplier must be at least 1, not {self.kv_multiplier}")
        if self.kv_multiplier > 1 and not (style.name == "nxdt" and qkv in ("linear", "fused")):
            raise LayoutError("kv_size_multiplier replicates KV heads only in the nxdt style with --qkv-linear or --fuse-qkv")
        stages = self.stages or split_layers(num_layers, self.pp)
        if len(stages) != self.pp or sum(c for _, c in stages) != num_layers or any(c < 1 for _, c in stages):
            raise LayoutError(f"pipeline stages {list(stages)} do not hold the model's {num_layers} layers in PP={self.pp} stages")
        multiple = style.vocab_multiple if self.vocab_multiple is None else self.vocab_multiple
        return replace(self, qkv=qkv, norms=norms, stages=tuple(tuple(s) for s in stages), vocab_multiple=multiple)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["stages"] = [list(s) for s in self.stages] if self.stages else None
        return out

    @staticmethod
    def from_dict(data: dict) -> "ShardedLayout":
        known = {k: data[k] for k in ShardedLayout.__dataclass_fields__ if k in data}
        if known.get("stages"):
            known["stages"] = tuple(tuple(s) for s in known["stages"])
        return ShardedLayout(**known)


def style_of(name: str) -> Style:
    try:
        return STYLES[name]
    except KeyError:
        raise LayoutError(f"unknown style {name!r}; choose {', '.join(STYLES)}") from None


def canonical_infos(dims: LlamaDims, dtype: str, *, lm_head: bool, inv_freq: bool = False) -> dict[str, TensorInfo]:
    """The HuggingFace tensors of a model of ``dims`` (shapes from the dims, one dtype)."""
    h, d, i_size = dims.hidden, dims.head_dim, dims.intermediate
    shapes = {
        "input_norm": (h,), "post_norm": (h,), "q": (dims.heads * d, h), "k": (dims.kv_heads * d, h), "v": (dims.kv_heads * d, h),
        "o": (h, dims.heads * d), "gate": (i_size, h), "up": (i_size, h), "down": (h, i_size), "inv_freq": (d // 2,),
    }
    out = {CANONICAL["embed"]: TensorInfo(CANONICAL["embed"], (dims.vocab, h), dtype)}
    for layer in range(dims.layers):
        for role in LAYER_ROLES:
            if role == "inv_freq" and not inv_freq:
                continue
            name = CANONICAL[role].format(i=layer)
            out[name] = TensorInfo(name, shapes[role], "float32" if role == "inv_freq" else dtype)
    out[CANONICAL["final_norm"]] = TensorInfo(CANONICAL["final_norm"], (h,), dtype)
    if lm_head:
        out[CANONICAL["lm_head"]] = TensorInfo(CANONICAL["lm_head"], (dims.vocab, h), dtype)
    return out


def stored_name(style: Style, layout: ShardedLayout, role: str, layer: int | None = None) -> str:
    """The name ``role`` is stored under (``layer`` as written in the file: global or stage-local)."""
    template = style.names.get(role) or style.qkv[layout.qkv][1].get(role) or style.norms[layout.norms].get(role)
    if template is None:
        raise LayoutError(f"style {style.name} stores no {role} tensor")
    return template.format(i=layer) if layer is not None else template


@dataclass
class _Builder:
    dims: LlamaDims
    canonical: dict[str, TensorInfo]
    layout: ShardedLayout
    style: Style
    out: list[TiledTensor] = field(default_factory=list)

    def src(self, role: str, layer: int | None = None) -> TensorInfo:
        name = CANONICAL[role].format(i=layer) if layer is not None else CANONICAL[role]
        try:
            return self.canonical[name]
        except KeyError:
            raise LayoutError(f"the model has no tensor {name}") from None

    def rows(self, name: str, pieces: list[Piece], cols: int, dtype: str | None = None) -> None:
        """Stack row ranges (source or None for zeros, first row, row count) into one tensor of ``cols`` columns."""
        self.out.append(stacked_rows(name, pieces, cols, dtype))

    def columns(self, name: str, info: TensorInfo, pieces: list[tuple[int, int]]) -> None:
        """Columns ranges (first column, count) of ``info``, side by side."""
        self.out.append(side_by_side(name, info, pieces))

    def replicate(self, name: str, info: TensorInfo) -> None:
        self.out.append(replicated(name, info))


def shard_plan(dims: LlamaDims, canonical: dict[str, TensorInfo], layout: ShardedLayout) -> dict[Shard, list[TiledTensor]]:
    """Every shard's tensors, as tiles of the canonical tensors. LayoutError when the layout cannot hold the model.

    ``layout`` must be :meth:`ShardedLayout.resolved`. Tensors come in file order: embedding,
    then per layer its norms, attention, MLP, then the final norm and lm_head.
    """
    style = style_of(layout.style)
    tp = layout.tp
    check_divides("query heads", dims.heads, tp, "tensor parallel size")
    check_divides("intermediate size (MLP rows)", dims.intermediate, tp, "tensor parallel size")
    embed_rows = _vocab_rows(dims, canonical, layout)
    arrangement, _ = style.qkv[layout.qkv]
    has_lm_head = CANONICAL["lm_head"] in canonical
    if not has_lm_head and not dims.tied:
        raise LayoutError(f"the model has no {CANONICAL['lm_head']} and its config does not tie it to the embedding")
    plan: dict[Shard, list[TiledTensor]] = {}
    for pp_rank, (first, count) in enumerate(layout.stages):
        for tp_rank in range(tp):
            b = _Builder(dims, canonical, layout, style)
            q_heads, kv_heads = local_heads(tp_rank, tp, dims.heads, dims.kv_heads, layout.kv_multiplier)
            if pp_rank == 0:
                embed = b.src("embed")
                b.rows(stored_name(style, layout, "embed"), embed_rows(embed, tp_rank), dims.hidden, embed.dtype)
            for layer in range(first, first + count):
                _layer(b, layer, layer - first if style.local_layers else layer, q_heads, kv_heads, arrangement, tp_rank)
            if pp_rank == layout.pp - 1:
                b.replicate(stored_name(style, layout, "final_norm"), b.src("final_norm"))
                if has_lm_head or layout.pp > 1:
                    head = b.src("lm_head" if has_lm_head else "embed")
                    b.rows(stored_name(style, layout, "lm_head"), embed_rows(head, tp_rank), dims.hidden, head.dtype)
            plan[(tp_rank, pp_rank)] = b.out
    return plan


def _vocab_rows(dims: LlamaDims, canonical: dict[str, TensorInfo], layout: ShardedLayout):
    vocab = canonical[CANONICAL["embed"]].shape[0] if CANONICAL["embed"] in canonical else dims.vocab
    if layout.vocab_multiple:
        padded = padded_vocab(vocab, layout.vocab_multiple, layout.tp)
    else:
        check_divides("vocabulary rows", vocab, layout.tp, "tensor parallel size", hint=f"the {layout.style} style does not pad the vocabulary")
        padded = vocab
    return lambda info, tp_rank: vocab_pieces(info, vocab, padded, layout.tp, tp_rank)


def _layer(b: _Builder, layer: int, index: int, q_heads: list[int], kv_heads: list[int], arrangement: str, tp_rank: int) -> None:
    style, layout, dims, d = b.style, b.layout, b.dims, b.dims.head_dim
    name = lambda role: stored_name(style, layout, role, index)  # noqa: E731
    q, k, v = b.src("q", layer), b.src("k", layer), b.src("v", layer)
    heads = lambda info, hs: [(info, h * d, d) for h in hs]  # noqa: E731
    b.replicate(name("input_norm"), b.src("input_norm", layer))
    if arrangement == "separate":
        b.rows(name("q"), heads(q, q_heads), dims.hidden)
        b.rows(name("k"), heads(k, kv_heads), dims.hidden)
        b.rows(name("v"), heads(v, kv_heads), dims.hidden)
    elif arrangement == "blocked":
        b.rows(name("qkv"), heads(q, q_heads) + heads(k, kv_heads) + heads(v, kv_heads), dims.hidden)
    elif arrangement == "q_kv":
        b.rows(name("q"), heads(q, q_heads), dims.hidden)
        b.rows(name("kv"), heads(k, kv_heads) + heads(v, kv_heads), dims.hidden)
    else:  # grouped: per query group, its query heads then its K and V head
        per_group = dims.heads // dims.kv_heads
        pieces = []
        for group in kv_heads:
            pieces += heads(q, range(group * per_group, (group + 1) * per_group)) + heads(k, [group]) + heads(v, [group])
        b.rows(name("qkv"), pieces, dims.hidden)
    b.columns(name("o"), b.src("o", layer), [(h * d, d) for h in q_heads])
    b.replicate(name("post_norm"), b.src("post_norm", layer))
    rows = dims.intermediate // layout.tp
    gate, up = b.src("gate", layer), b.src("up", layer)
    if style.fused_gate_up:
        b.rows(name("gate_up"), [(gate, tp_rank * rows, rows), (up, tp_rank * rows, rows)], dims.hidden)
    else:
        b.rows(name("gate"), [(gate, tp_rank * rows, rows)], dims.hidden)
        b.rows(name("up"), [(up, tp_rank * rows, rows)], dims.hidden)
    b.columns(name("down"), b.src("down", layer), [(tp_rank * rows, rows)])
    inv_freq = CANONICAL["inv_freq"].format(i=layer)
    if style.keeps_inv_freq and inv_freq in b.canonical:
        b.replicate(name("inv_freq"), b.canonical[inv_freq])

