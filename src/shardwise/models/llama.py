"""The Llama family as data: its dimensions, and its tensor names in every style shardwise speaks.

Roles name what a tensor is (``q``, ``gate_up``, ``input_norm`` ...); each style maps roles to
name templates, where ``{i}`` is the layer index (global, or stage-local for ``mcore``). How a
role is cut across ranks is decided by :mod:`shardwise.layout.sharding` from the role alone, so
adding a style or a Llama-like architecture means adding names here, not code.

Sources of the names: HuggingFace ``LlamaForCausalLM``; NxD/NxDT's checkpoint converter (hf and
megatron styles, ``qkv_proj.weight_q/_k/_v``, ``weight_qkv``, ``gate_up_proj``); NeMo's
Megatron-core GPT (``linear_qkv``, ``linear_fc1`` and the TE-fused ``layer_norm_weight`` names).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError, LayoutError
from ..formats.hf_conventions import ties_embeddings

__all__ = ["LlamaDims", "Style", "STYLES", "CANONICAL", "dims_from_hf_config", "MODEL_TYPES"]

MODEL_TYPES = ("llama", "mistral")  # HF model_type values whose tensors follow this table

_L = "model.layers.{i}."
CANONICAL = {  # HuggingFace names: the canonical form every conversion goes through
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_norm": _L + "input_layernorm.weight",
    "post_norm": _L + "post_attention_layernorm.weight",
    "q": _L + "self_attn.q_proj.weight",
    "k": _L + "self_attn.k_proj.weight",
    "v": _L + "self_attn.v_proj.weight",
    "o": _L + "self_attn.o_proj.weight",
    "gate": _L + "mlp.gate_proj.weight",
    "up": _L + "mlp.up_proj.weight",
    "down": _L + "mlp.down_proj.weight",
    "inv_freq": _L + "self_attn.rotary_emb.inv_freq",
}
LAYER_ROLES = ("input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down", "inv_freq")


@dataclass(frozen=True)
class Style:
    """One naming style.

    ``qkv`` maps each Q/K/V option to (arrangement, {stored role: template}); arrangements are
    ``separate`` (q, k, v), ``blocked`` (one ``qkv`` = [Q_r; K_r; V_r]), ``q_kv`` (``q`` and
    ``kv`` = [K_r; V_r]) and ``grouped`` (``qkv`` interleaved per query group: the group's query
    heads, then its K head, then its V head). ``norms`` maps each norm option to the names of
    ``input_norm`` and ``post_norm``. ``fused_gate_up`` says gate and up are one tensor whose rank
    slice is [gate_r; up_r]. ``vocab_multiple`` > 0 pads the vocabulary to a multiple of it x TP.
    """

    name: str
    local_layers: bool
    names: dict[str, str]
    qkv: dict[str, tuple[str, dict[str, str]]]
    norms: dict[str, dict[str, str]]
    fused_gate_up: bool
    vocab_multiple: int = 0
    default_qkv: str = ""
    default_norms: str = "separate"
    tp_allowed: bool = True
    keeps_inv_freq: bool = True


_MEG = "language_model.encoder.layers.{i}."
_MC = "model.decoder.layers.{i}."
STYLES = {
    "hf": Style(
        "hf", False,
        {k: CANONICAL[k] for k in ("embed", "final_norm", "lm_head", "o", "gate", "up", "down", "inv_freq")},
        {"separate": ("separate", {r: CANONICAL[r] for r in "qkv"})},
        {"separate": {r: CANONICAL[r] for r in ("input_norm", "post_norm")}},
        fused_gate_up=False, default_qkv="separate", tp_allowed=False,
    ),
    "nxdt": Style(
        "nxdt", False,
        {**{k: CANONICAL[k] for k in ("embed", "final_norm", "lm_head", "o", "down", "inv_freq")}, "gate_up": _L + "mlp.gate_up_proj.weight"},
        {
            "separate": ("separate", {r: CANONICAL[r] for r in "qkv"}),
            "linear": ("separate", {r: _L + f"self_attn.qkv_proj.weight_{r}" for r in "qkv"}),
            "fused": ("blocked", {"qkv": _L + "self_attn.qkv_proj.weight_qkv"}),
        },
        {"separate": {r: CANONICAL[r] for r in ("input_norm", "post_norm")}},
        fused_gate_up=True, default_qkv="separate",
    ),
    "megatron": Style(
        "megatron", False,
        {
            "embed": "language_model.embedding.word_embeddings.weight",
            "final_norm": "language_model.encoder.final_layernorm.weight",
            "lm_head": "language_model.output_layer.weight",
            "o": _MEG + "self_attention.dense.weight",
            "gate_up": _MEG + "mlp.dense_h_to_4h.weight",
            "down": _MEG + "mlp.dense_4h_to_h.weight",
            "inv_freq": _MEG + "self_attention.core_attention.rotary_emb.inv_freq",
        },
        {
            "fused": ("blocked", {"qkv": _MEG + "self_attention.query_key_value.weight"}),
            "linear": ("q_kv", {"q": _MEG + "self_attention.query.weight", "kv": _MEG + "self_attention.key_value.weight"}),
        },
        {"separate": {"input_norm": _MEG + "input_layernorm.weight", "post_norm": _MEG + "post_attention_layernorm.weight"}},
        fused_gate_up=True, default_qkv="fused",
    ),
    "mcore": Style(
        "mcore", True,
        {
            "embed": "model.embedding.word_embeddings.weight",
            "final_norm": "model.decoder.final_layernorm.weight",
            "lm_head": "model.output_layer.weight",
            "o": _MC + "self_attention.linear_proj.weight",
            "gate_up": _MC + "mlp.linear_fc1.weight",
            "down": _MC + "mlp.linear_fc2.weight",
        },
        {"grouped": ("grouped", {"qkv": _MC + "self_attention.linear_qkv.weight"})},
        {
            "fused": {"input_norm": _MC + "self_attention.linear_qkv.layer_norm_weight", "post_norm": _MC + "mlp.linear_fc1.layer_norm_weight"},
            "separate": {"input_norm": _MC + "input_layernorm.weight", "post_norm": _MC + "pre_mlp_layernorm.weight"},
        },
        fused_gate_up=True, vocab_multiple=128, default_qkv="grouped", default_norms="fused", keeps_inv_freq=False,
    ),
}


@dataclass(frozen=True)
class LlamaDims:
    """The numbers that decide how a Llama model's tensors are cut."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    tied: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def dims_from_hf_config(config: dict, label: str) -> LlamaDims:
    """Dimensions from a HuggingFace Llama ``config.json``; FormatError naming a missing key."""
    model_type = config.get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise LayoutError(f"{label}: model_type {model_type!r} is not a Llama-family model; shardwise shards {', '.join(MODEL_TYPES)}")

    def number(key: str, default=None) -> int:
        value = config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FormatError(f"{label}: config {key} is {value!r}; a positive integer is needed")
        return value

    hidden, heads = number("hidden_size"), number("num_attention_heads")
    return LlamaDims(
        hidden=hidden,
        heads=heads,
        kv_heads=number("num_key_value_heads", heads),
        head_dim=number("head_dim", hidden // heads if hidden % heads == 0 else None),
        intermediate=number("intermediate_size"),
        vocab=number("vocab_size"),
        layers=number("num_hidden_layers"),
        tied=ties_embeddings(config),
    )
