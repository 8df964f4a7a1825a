"""NeMo-style torch_dist checkpoints of a HuggingFace Llama, written without NeMo or Megatron, for the tests.

    python tests/torch_dist_ranks.py HF_DIR OUT WORLD CHUNKS VOCAB_MULTIPLE [nemo1|nemo2]

writes OUT as an unpacked ``.nemo`` (``model_config.yaml`` and ``model_weights/``), or with
``nemo2`` as a NeMo 2 checkpoint (``context/model.yaml``, ``context/io.json``, ``weights/``), holding the
model in HF_DIR, saved by ``torch.distributed.checkpoint.save`` from WORLD gloo ranks the way
Megatron-core's ``torch_dist`` strategy saves it (read from the public Megatron-LM and NeMo
sources, written here independently of shardwise so that a wrong mapping in shardwise shows):

- keys are global mcore names with the layer index folded into a leading axis
  (``model.decoder.layers.self_attention.linear_qkv.weight`` of shape ``[layers, ...]``), saved
  as a flat dict with ``flatten_state_dict=False`` (no planner data, as MCoreSavePlanner);
- CHUNKS ``layer``: every layer is a chunk of its own (``prepend_axis_num=1``), as Megatron saves;
  ``whole``: one chunk holds all layers (a stack saved as one tensor);
- at WORLD > 1, tensor parallel pieces: linear_qkv, the embedding and output_layer by rows,
  linear_proj and linear_fc2 by columns, linear_fc1 as two pieces per rank (gate_r at
  ``r * ffn / tp``, up_r at ``ffn + r * ffn / tp``, as ``apply_swiglu_sharded_factory``); norms
  are whole, layer i written by rank ``i % WORLD`` (each replica saved once);
- Q, K and V interleaved per query group in linear_qkv; gate and up stacked in linear_fc1; the
  input and post-attention norms fused into linear_qkv / linear_fc1 ``layer_norm_weight``; the
  vocabulary padded to a multiple of VOCAB_MULTIPLE x WORLD with non-zero rows;
- TransformerEngine ``_extra_state`` entries as byte objects, ``metadata.json``, and a
  ``common.pt`` whose pickle would run code if anything loaded it (shardwise must not);
- NeMo 2 (``MegatronParallel`` prefixes each model chunk's keys with ``module.``; NeMo's
  ``IOMixin.io_dump`` writes ``context/io.json`` and ``context/model.yaml``, fiddle configs with
  ``_target_`` and every argument, defaults included): the same tensors under ``module.``, next to
  optimizer states under ``optimizer.state.*`` keys saved in the same call (as a trainer
  checkpoint holds them), and an ``io.json`` that is JSON only in shape.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def hf_state(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state, config


def padded(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = torch.arange(1, (rows - weight.shape[0]) * weight.shape[1] + 1, dtype=torch.float32).reshape(-1, weight.shape[1]) / 1000
    return torch.cat([weight, extra.to(weight.dtype)])


def mcore_stacked(state: dict, config: dict, vocab_rows: int) -> dict:
    """The global mcore tensors, layers stacked on a leading axis."""
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = config.get("head_dim") or config["hidden_size"] // heads
    per_group = heads // kv
    layers = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k, v = (state[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        groups = []
        for g in range(kv):
            groups += [q[g * per_group * d:(g + 1) * per_group * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        layers.append({
            "self_attention.linear_qkv.layer_norm_weight": state[p + "input_layernorm.weight"],
            "self_attention.linear_qkv.weight": torch.cat(groups),
            "self_attention.linear_proj.weight": state[p + "self_attn.o_proj.weight"],
            "mlp.linear_fc1.layer_norm_weight": state[p + "post_attention_layernorm.weight"],
            "mlp.linear_fc1.weight": torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]),
            "mlp.linear_fc2.weight": state[p + "mlp.down_proj.weight"],
        })
    out = {"model.embedding.word_embeddings.weight": padded(state["model.embed_tokens.weight"], vocab_rows)}
    for rest in layers[0]:
        out[f"model.decoder.layers.{rest}"] = torch.stack([layer[rest] for layer in layers])
    out["model.decoder.final_layernorm.weight"] = state["model.norm.weight"]
    if not config.get("tie_word_embeddings", False):
        out["model.output_layer.weight"] = padded(state["lm_head.weight"], vocab_rows)
    return out


def pieces(key: str, tensor: torch.Tensor, rank: int, world: int, ffn: int, chunks: str) -> list[tuple[torch.Tensor, list[int]]]:
    """This rank's (piece, global offsets) of ``tensor``."""
    stacked = ".layers." in key
    norm = key.endswith("layer_norm_weight") or key.endswith("final_layernorm.weight")
    lead = 1 if stacked else 0  # the axis after the stacked layer axis
    if norm:
        if stacked and chunks == "layer":
            return [(tensor[i:i + 1], [i, 0]) for i in range(tensor.shape[0]) if i % world == rank]
        return [(tensor, [0] * tensor.dim())] if rank == 0 else []
    if key.endswith("linear_fc1.weight"):
        part = ffn // world
        found = [(tensor[:, rank * part:(rank + 1) * part], [0, rank * part, 0]), (tensor[:, ffn + rank * part:ffn + (rank + 1) * part], [0, ffn + rank * part, 0])]
    else:
        axis = lead + (1 if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight") else 0)
        part = tensor.shape[axis] // world
        offsets = [0] * tensor.dim()
        offsets[axis] = rank * part
        found = [(tensor.narrow(axis, rank * part, part), offsets)]
    if stacked and chunks == "layer":
        found = [(piece[i:i + 1], [i, *offsets[1:]]) for piece, offsets in found for i in range(piece.shape[0])]
    return found


def save(hf_dir: Path, out: Path, world: int, chunks: str, vocab_multiple: int, flavour: str = "nemo1") -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
    from torch.distributed.checkpoint import DefaultSavePlanner

    rank = dist.get_rank()
    state, config = hf_state(hf_dir)
    vocab_rows = math.ceil(config["vocab_size"] / (vocab_multiple * world)) * vocab_multiple * world
    ffn = config["intermediate_size"]
    to_save: dict = {}
    prefix = "module." if flavour == "nemo2" else "model."
    tensors = {prefix + key[len("model."):]: tensor for key, tensor in mcore_stacked(state, config, vocab_rows).items()}
    if flavour == "nemo2":  # optimizer moments of two parameters, saved beside the weights (not weights: never read as such)
        for key in (f"{prefix}decoder.layers.mlp.linear_fc2.weight", f"{prefix}embedding.word_embeddings.weight"):
            tensors[f"optimizer.state.exp_avg.{key}"] = torch.full_like(tensors[key], 7.0)
    for key, tensor in tensors.items():
        local = [Shard.from_tensor_and_offsets(piece.contiguous().clone(), offsets, rank) for piece, offsets in pieces(key, tensor, rank, world, ffn, chunks)]
        to_save[key] = init_from_local_shards(local, *tensor.shape)
    for module in ("self_attention.core_attention", "self_attention.linear_qkv", "mlp.linear_fc1"):
        blob = io.BytesIO()
        torch.save([{"fp8_meta": rank}], blob)
        to_save[f"{prefix}decoder.layers.{module}._extra_state/shard_{rank}_{world}"] = blob
    weights = out / ("weights" if flavour == "nemo2" else "model_weights")
    dcp.save(to_save, checkpoint_id=str(weights), planner=DefaultSavePlanner(flatten_state_dict=False))
    if rank == 0:
        backend = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
        (weights / "metadata.json").write_text(json.dumps(backend))
        (weights / "common.pt").write_bytes(pickle.dumps(_RunsCode(str(out / "pwned"))))
        if flavour == "nemo2":
            (out / "context").mkdir()
            (out / "context" / "model.yaml").write_text(nemo2_model_yaml(config, world, vocab_multiple))
            (out / "context" / "io.json").write_text(json.dumps({"root": {"type": ["ref", "config:1"]}, "objects": {}, "refcounts": {}, "version": "0.0.1"}))
        else:
            (out / "model_config.yaml").write_text(model_config_yaml(config, world, vocab_multiple))


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def model_config_yaml(config: dict, world: int, vocab_multiple: int) -> str:
    """NeMo's model_config.yaml for the model (the keys NeMo's Llama converter sets)."""
    heads = config["num_attention_heads"]
    fields = {
        "mcore_gpt": True, "transformer_engine": True, "tensor_model_parallel_size": world, "pipeline_model_parallel_size": 1,
        "num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"], "ffn_hidden_size": config["intermediate_size"],
        "num_attention_heads": heads, "num_query_groups": config.get("num_key_value_heads", heads),
        "kv_channels": config.get("head_dim") or config["hidden_size"] // heads,
        "max_position_embeddings": config.get("max_position_embeddings", 2048), "encoder_seq_length": config.get("max_position_embeddings", 2048),
        "normalization": "rmsnorm", "layernorm_epsilon": config.get("rms_norm_eps", 1e-6), "activation": "fast-swiglu", "bias": False,
        "position_embedding_type": "rope", "rotary_base": config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        "share_embeddings_and_output_weights": bool(config.get("tie_word_embeddings", False)),
        "make_vocab_size_divisible_by": vocab_multiple, "precision": 32,
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
    }
    import yaml

    return yaml.safe_dump(fields, sort_keys=False)


def nemo2_model_yaml(config: dict, world: int, vocab_multiple: int) -> str:
    """NeMo 2's context/model.yaml for the model: the LlamaModel config as ``IOMixin._io_dump_yaml`` writes it
    (``_target_`` per fiddle config, every dataclass field, non-dataclass objects as ``_target_`` + ``_call_``)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    model = {
        "_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel",
        "config": {
            "_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig",
            "tensor_model_parallel_size": world, "pipeline_model_parallel_size": 1, "sequence_parallel": False,
            "num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"], "ffn_hidden_size": config["intermediate_size"],
            "num_attention_heads": heads, "num_query_groups": config.get("num_key_value_heads", heads),
            # NeMo leaves kv_channels null when it is hidden / heads (TransformerConfig fills it in)
            "kv_channels": None if head_dim * heads == config["hidden_size"] else head_dim,
            "init_method_std": config.get("initializer_range", 0.02), "layernorm_epsilon": config.get("rms_norm_eps", 1e-6),
            "normalization": "RMSNorm", "add_bias_linear": False, "add_qkv_bias": False, "gated_linear_unit": True,
            "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
            "position_embedding_type": "rope", "rotary_percent": 1.0,
            "rotary_base": config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            "seq_length": config.get("max_position_embeddings", 2048), "share_embeddings_and_output_weights": bool(config.get("tie_word_embeddings", False)),
            "make_vocab_size_divisible_by": vocab_multiple, "vocab_size": None,
            "params_dtype": {"_target_": "torch.float32", "_call_": False}, "bf16": False, "fp16": False,
            "transformer_layer_spec": {"_target_": "nemo.collections.llm.gpt.model.base.default_layer_spec", "_call_": False},
        },
        "optim": {
            "_target_": "nemo.lightning.pytorch.optim.megatron.MegatronOptimizerModule",
            "config": {"_target_": "megatron.core.optimizer.optimizer_config.OptimizerConfig", "lr": 0.0003, "optimizer": "adam", "use_distributed_optimizer": True},
        },
        "tokenizer": {
            "_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
            "pretrained_model_name": "nemo_tokenizer", "use_fast": True,
        },
        "model_transform": None,
    }
    import yaml

    return yaml.safe_dump(model, sort_keys=False)


def main(args: list[str]) -> int:
    from dcp_ranks import run_ranks  # the sibling script's gloo launcher (this folder is on sys.path when run as a script)

    flavour = args[5] if len(args) > 5 else "nemo1"
    return run_ranks(int(args[2]), f"{args[1]}.rendezvous", lambda: save(Path(args[0]), Path(args[1]), dist.get_world_size(), args[3], int(args[4]), flavour))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
