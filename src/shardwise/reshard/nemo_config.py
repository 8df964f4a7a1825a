"""NeMo's ``model_config.yaml`` for Megatron-core Llama models, both ways, and an HF config from it.

The keys and values are those NeMo's ``convert_llama_hf_to_nemo.py`` sets on top of
``megatron_llama_config.yaml`` (mcore_gpt, rmsnorm, fast-swiglu, rope, no bias).
"""

from __future__ import annotations

from ..errors import FormatError
from ..models.llama import LlamaDims

__all__ = ["dims_from_nemo_config", "nemo_llama_config", "hf_config_from_nemo", "nemo2_view", "default_vocab_multiple", "vocab_multiple_of", "rope_settings", "nemo_precision"]


def default_vocab_multiple(vocab: int) -> int:
    """NeMo's converter choice: the largest of 128, 64, ..., 1 that divides the vocabulary."""
    multiple = 128
    while vocab % multiple:
        multiple //= 2
    return multiple


def vocab_multiple_of(nemo_config: dict | None, vocab: int) -> int:
    """The vocabulary padding multiple: the source's ``make_vocab_size_divisible_by``, else :func:`default_vocab_multiple`."""
    return (nemo_config or {}).get("make_vocab_size_divisible_by") or default_vocab_multiple(vocab)


def nemo_precision(dtype: str):
    """NeMo's ``precision`` for weights of ``dtype``: ``bf16``, 16 or 32 (anything else counts as 32)."""
    return {"bfloat16": "bf16", "float16": 16, "float32": 32}.get(dtype, 32)


def rope_settings(hf_config: dict) -> dict:
    """RoPE theta and scaling from an HF config: top-level (transformers 4) or ``rope_parameters`` (transformers 5)."""
    nested = hf_config.get("rope_parameters") if isinstance(hf_config.get("rope_parameters"), dict) else {}
    scaling = hf_config.get("rope_scaling") if isinstance(hf_config.get("rope_scaling"), dict) else nested
    return {"theta": hf_config.get("rope_theta", nested.get("rope_theta", 10000.0)), "scaling": scaling or {}}


def _int(config: dict, key: str, label: str, default=None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FormatError(f"{label}: model_config.yaml {key} is {value!r}; a positive integer is needed")
    return value


def dims_from_nemo_config(config: dict, label: str, *, padded_vocab: int) -> LlamaDims:
    """Dimensions from a NeMo GPT config; the vocabulary is the padded one (NeMo does not record the real size)."""
    hidden, heads = _int(config, "hidden_size", label), _int(config, "num_attention_heads", label)
    kv_channels = config.get("kv_channels") or hidden // heads
    return LlamaDims(
        hidden=hidden,
        heads=heads,
        kv_heads=_int(config, "num_query_groups", label, heads) if config.get("num_query_groups") else heads,
        head_dim=_int({"kv_channels": kv_channels}, "kv_channels", label),
        intermediate=_int(config, "ffn_hidden_size", label),
        vocab=padded_vocab,
        layers=_int(config, "num_layers", label),
        tied=bool(config.get("share_embeddings_and_output_weights", False)),
    )


def nemo_llama_config(dims: LlamaDims, hf_config: dict, *, tp: int, pp: int, vocab_multiple: int, precision: str) -> dict:
    """A ``model_config.yaml`` mapping for a Megatron-core Llama model at TP x PP.

    RoPE scaling is carried as NeMo's converter does: linear and llama3 factors become
    ``seq_len_interpolation_factor`` (llama3 also sets ``scale_positional_embedding``).
    """
    rope = rope_settings(hf_config)
    rope_type = rope["scaling"].get("rope_type") or rope["scaling"].get("type")
    scaling = {}
    if rope_type in ("linear", "llama3") and rope["scaling"].get("factor"):
        scaling["seq_len_interpolation_factor"] = rope["scaling"]["factor"]
        if rope_type == "llama3":
            scaling["scale_positional_embedding"] = True
    return {
        "mcore_gpt": True,
        "transformer_engine": True,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "num_layers": dims.layers,
        "hidden_size": dims.hidden,
        "ffn_hidden_size": dims.intermediate,
        "num_attention_heads": dims.heads,
        "num_query_groups": dims.kv_heads,
        "kv_channels": dims.head_dim,
        "encoder_seq_length": hf_config.get("max_position_embeddings", 4096),
        "max_position_embeddings": hf_config.get("max_position_embeddings", 4096),
        "init_method_std": hf_config.get("initializer_range", 0.02),
        "normalization": "rmsnorm",
        "layernorm_epsilon": hf_config.get("rms_norm_eps", 1e-5),
        "activation": "fast-swiglu",
        "bias": False,
        "position_embedding_type": "rope",
        "rotary_base": rope["theta"],
        "rotary_percentage": 1.0,
        **scaling,
        "share_embeddings_and_output_weights": dims.tied,
        "make_vocab_size_divisible_by": vocab_multiple,
        "transformer_block_type": "pre_ln",
        "precision": precision,
    }


def hf_config_from_nemo(dims: LlamaDims, nemo: dict) -> dict:
    """An HF ``LlamaForCausalLM`` config.json for a NeMo Llama model that came without one (with
    Llama 3.1's RoPE scaling when the config carries NeMo 2's fields for it)."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "num_hidden_layers": dims.layers,
        "vocab_size": dims.vocab,
        "tie_word_embeddings": dims.tied,
        "rms_norm_eps": nemo.get("layernorm_epsilon", 1e-5),
        "rope_theta": nemo.get("rotary_base", 10000.0),
        "max_position_embeddings": nemo.get("max_position_embeddings", 4096),
        "initializer_range": nemo.get("init_method_std", 0.02),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    scaling = _rope_scaling(nemo)
    if scaling is not None:
        hf["rope_scaling"] = scaling
    return hf


def nemo2_view(config: dict) -> dict:
    """A NeMo 2 GPT config (model.yaml's ``config``) under the NeMo 1 ``model_config.yaml`` names the
    functions above read: the names are shared but for ``seq_length`` (NeMo 1's ``max_position_embeddings``);
    nested mappings (``activation_func``, ``params_dtype`` ...) are left out."""
    view = {k: v for k, v in config.items() if not isinstance(v, (dict, list))}
    if isinstance(config.get("seq_length"), int):
        view["max_position_embeddings"] = config["seq_length"]
    return view


def _rope_scaling(nemo: dict) -> dict | None:
    """Llama 3.1's RoPE scaling as HF writes it, from NeMo 2's ``scale_factor``, ``low_freq_factor``,
    ``high_freq_factor`` and ``old_context_len`` (as ``HFLlamaExporter`` maps them); None without them."""
    if not all(isinstance(nemo.get(k), (int, float)) and not isinstance(nemo.get(k), bool) for k in ("scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len")):
        return None
    return {
        "factor": float(nemo["scale_factor"]), "low_freq_factor": float(nemo["low_freq_factor"]),
        "high_freq_factor": float(nemo["high_freq_factor"]), "original_max_position_embeddings": nemo["old_context_len"],
        "rope_type": "llama3",
    }
