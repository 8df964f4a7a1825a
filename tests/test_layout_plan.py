"""Which slice of which tensor goes where: the layout plans, tested without any I/O."""

from __future__ import annotations

import pytest
import torch

from shardwise.errors import LayoutError
from shardwise.layout.parallel import local_heads, padded_vocab, split_layers
from shardwise.layout.sharding import ShardedLayout, canonical_infos, shard_plan
from shardwise.layout.tiles import Tile, assemble, check_cover, coalesce, compose, invert
from shardwise.models.llama import LlamaDims

D = 8  # head_dim: 8 query heads of 8 rows, as in the reference runs of NxD's converter
GQA = LlamaDims(hidden=64, heads=8, kv_heads=2, head_dim=D, intermediate=96, vocab=128, layers=4)
MHA = LlamaDims(hidden=64, heads=8, kv_heads=8, head_dim=D, intermediate=96, vocab=128, layers=5)


def plan_for(dims, style, tp=1, pp=1, **options):
    infos = canonical_infos(dims, "float32", lm_head=not dims.tied)
    layout = ShardedLayout(style, tp, pp, **options).resolved(dims.layers)
    return infos, shard_plan(dims, infos, layout)


def rows_of(plan, shard, suffix):
    """(source tensor suffix, first head, head count) of each tile of the first stored tensor ending with ``suffix``."""
    tensor = next(t for t in plan[shard] if t.info.name.endswith(suffix))
    return [(t.src.rsplit(".", 2)[-2], t.src_row // D, t.rows // D) for t in tensor.tiles]


def test_layers_are_split_as_nxd_splits_them_remainder_to_the_last_stages():
    assert [c for _, c in split_layers(5, 2)] == [2, 3]
    assert [c for _, c in split_layers(7, 3)] == [2, 2, 3]
    assert split_layers(10, 4) == ((0, 2), (2, 2), (4, 3), (7, 3))
    with pytest.raises(LayoutError, match="more pipeline stages"):
        split_layers(2, 3)


def test_kv_size_multiplier_pairs_each_rank_query_heads_with_its_kv_head_as_nxd_trn1_does():
    # NxD's converter on CPU, tp=4, 8 Q heads, 2 KV heads, multiplier 2:
    # rank0 Q0,Q1 + K0; rank1 Q4,Q5 + K1; rank2 Q2,Q3 + K0; rank3 Q6,Q7 + K1
    expected = {0: ([0, 1], [0]), 1: ([4, 5], [1]), 2: ([2, 3], [0]), 3: ([6, 7], [1])}
    for rank, heads in expected.items():
        assert local_heads(rank, 4, 8, 2, 2) == heads
    assert local_heads(1, 2, 8, 2) == ([4, 5, 6, 7], [1])


def test_heads_that_do_not_divide_are_refused_with_the_numbers():
    with pytest.raises(LayoutError, match="tensor parallel size 3 does not divide 8 query heads"):
        local_heads(0, 3, 8, 2)
    with pytest.raises(LayoutError, match="tensor parallel size 4 does not divide 2 KV heads"):
        local_heads(0, 4, 8, 2)
    with pytest.raises(LayoutError, match="3 KV heads do not divide tensor parallel size 4"):
        local_heads(0, 4, 12, 3, 2)


def test_vocab_padding_rounds_up_to_multiple_times_tp():
    assert padded_vocab(32000, 128, 3) == 32256
    assert padded_vocab(128, 128, 1) == 128


def test_fused_qkv_per_rank_is_q_then_k_then_v_blocks_by_head_count():
    _, plan = plan_for(GQA, "nxdt", tp=2, qkv="fused")
    assert rows_of(plan, (1, 0), "layers.0.self_attn.qkv_proj.weight_qkv") == [("q_proj", 4, 4), ("k_proj", 1, 1), ("v_proj", 1, 1)]
    fused = next(t for t in plan[(0, 0)] if t.info.name.endswith("weight_qkv"))
    assert fused.info.shape == (32 + 8 + 8, 64)  # not thirds: 4 Q heads, 1 K head, 1 V head


def test_mcore_linear_qkv_interleaves_q_k_v_per_query_group():
    _, plan = plan_for(GQA, "mcore", tp=1)
    assert rows_of(plan, (0, 0), "layers.0.self_attention.linear_qkv.weight") == [
        ("q_proj", 0, 4), ("k_proj", 0, 1), ("v_proj", 0, 1), ("q_proj", 4, 4), ("k_proj", 1, 1), ("v_proj", 1, 1),
    ]


def test_megatron_mha_query_key_value_is_blocked_per_rank_and_gqa_uses_query_and_key_value():
    _, plan = plan_for(MHA, "megatron", tp=2, qkv="fused")
    assert rows_of(plan, (1, 0), "layers.0.self_attention.query_key_value.weight") == [("q_proj", 4, 4), ("k_proj", 4, 4), ("v_proj", 4, 4)]
    _, plan = plan_for(GQA, "megatron", tp=2, qkv="linear")
    assert rows_of(plan, (1, 0), "layers.0.self_attention.key_value.weight") == [("k_proj", 1, 1), ("v_proj", 1, 1)]


def test_o_proj_columns_follow_the_reordered_query_heads():
    _, plan = plan_for(GQA, "nxdt", tp=4, qkv="linear", kv_multiplier=2)
    o = next(t for t in plan[(1, 0)] if t.info.name.endswith("layers.0.self_attn.o_proj.weight"))
    assert [(t.src_col // D, t.cols // D) for t in o.tiles] == [(4, 2)]
    k = next(t for t in plan[(2, 0)] if t.info.name.endswith("layers.0.self_attn.qkv_proj.weight_k"))
    assert [(t.src_row // D, t.rows // D) for t in k.tiles] == [(0, 1)]  # K0 replicated on rank 2


def test_gate_up_is_gate_rows_then_up_rows_of_each_rank():
    _, plan = plan_for(GQA, "nxdt", tp=2)
    gate_up = next(t for t in plan[(1, 0)] if t.info.name.endswith("layers.0.mlp.gate_up_proj.weight"))
    assert [(t.src.rsplit(".", 2)[-2], t.src_row, t.rows) for t in gate_up.tiles] == [("gate_proj", 48, 48), ("up_proj", 48, 48)]


def test_stages_hold_embedding_first_and_norm_and_lm_head_last_with_global_or_local_layer_indexes():
    _, plan = plan_for(MHA, "nxdt", tp=1, pp=2)
    first, last = [t.info.name for t in plan[(0, 0)]], [t.info.name for t in plan[(0, 1)]]
    assert first[0] == "model.embed_tokens.weight" and "model.layers.1.mlp.down_proj.weight" in first
    assert "model.layers.2.input_layernorm.weight" in last and last[-2:] == ["model.norm.weight", "lm_head.weight"]
    _, plan = plan_for(MHA, "mcore", tp=1, pp=2)
    assert "model.decoder.layers.0.self_attention.linear_qkv.weight" in [t.info.name for t in plan[(0, 1)]]
    assert "model.decoder.layers.2.self_attention.linear_qkv.weight" in [t.info.name for t in plan[(0, 1)]]
    assert "model.decoder.layers.3.self_attention.linear_qkv.weight" not in [t.info.name for t in plan[(0, 1)]]


def test_a_tied_model_stores_the_embedding_again_as_lm_head_only_when_pipelined():
    tied = LlamaDims(**{**GQA.as_dict(), "tied": True})
    _, plan = plan_for(tied, "mcore", tp=2, pp=1)
    assert not any(t.info.name == "model.output_layer.weight" for t in plan[(0, 0)])
    _, plan = plan_for(tied, "mcore", tp=2, pp=2)
    head = next(t for t in plan[(0, 1)] if t.info.name == "model.output_layer.weight")
    assert head.sources() == {"model.embed_tokens.weight"}


def test_mcore_pads_the_vocabulary_with_zero_rows_and_inverting_drops_them():
    small = LlamaDims(**{**GQA.as_dict(), "vocab": 100})
    infos, plan = plan_for(small, "mcore", tp=2, vocab_multiple=64)
    embed = next(t for t in plan[(1, 0)] if t.info.name == "model.embedding.word_embeddings.weight")
    assert embed.info.shape == (64, 64)
    assert [(t.src, t.src_row, t.rows) for t in embed.tiles] == [("model.embed_tokens.weight", 64, 36), (None, 0, 28)]
    rebuilt = next(t for t in invert(plan, infos) if t.info.name == "model.embed_tokens.weight")
    assert sum(t.rows for t in rebuilt.tiles) == 100


@pytest.mark.parametrize("layout", [
    dict(style="nxdt", tp=2, pp=2), dict(style="nxdt", tp=4, qkv="linear", kv_multiplier=2), dict(style="nxdt", tp=4, pp=3, qkv="fused", kv_multiplier=2),
    dict(style="megatron", tp=2, pp=2, qkv="linear"), dict(style="mcore", tp=2, pp=3), dict(style="mcore", tp=1, norms="separate"),
])
def test_every_layout_inverts_to_the_full_tensors_and_composes_into_any_other(layout):
    infos, plan = plan_for(GQA, **layout)
    gen = torch.Generator().manual_seed(0)
    full = {n: torch.randn(i.shape, generator=gen) for n, i in infos.items()}
    shards = {s: {t.info.name: assemble(t, full.__getitem__) for t in ts} for s, ts in plan.items()}
    fetch = lambda ref: shards[ref[0]][ref[1]]  # noqa: E731
    for tensor in invert(plan, infos):
        assert torch.equal(assemble(tensor, fetch), full[tensor.info.name]), tensor.info.name
    _, other = plan_for(GQA, "mcore", tp=2, pp=2)
    direct = compose(other, invert(plan, infos))
    for shard, tensors in direct.items():
        expected = {t.info.name: assemble(t, full.__getitem__) for t in other[shard]}
        for tensor in tensors:
            assert torch.equal(assemble(tensor, fetch), expected[tensor.info.name])


def test_cover_check_finds_gaps_and_overlaps():
    check_cover("t", 4, 2, [Tile(0, 0, 2, 2, "a"), Tile(2, 0, 2, 2, "b")])
    with pytest.raises(LayoutError, match="overlap"):
        check_cover("t", 4, 2, [Tile(0, 0, 3, 2, "a"), Tile(2, 0, 2, 2, "b")])
    with pytest.raises(LayoutError, match="cover 6 of its 8"):
        check_cover("t", 4, 2, [Tile(0, 0, 3, 2, "a")])


def test_coalesce_merges_tiles_that_continue_each_other_in_output_and_source():
    tiles = [Tile(0, 0, 8, 4, "q", 8, 0), Tile(8, 0, 8, 4, "q", 16, 0), Tile(16, 0, 8, 4, "q", 40, 0)]
    assert coalesce(tiles) == [Tile(0, 0, 16, 4, "q", 8, 0), Tile(16, 0, 8, 4, "q", 40, 0)]


def test_options_that_do_not_apply_to_a_style_are_refused():
    with pytest.raises(LayoutError, match="kv_size_multiplier replicates KV heads only"):
        ShardedLayout("mcore", 4, kv_multiplier=2).resolved(4)
    with pytest.raises(LayoutError, match="no Q/K/V option"):
        ShardedLayout("mcore", 2, qkv="fused").resolved(4)
