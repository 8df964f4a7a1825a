"""NeMo 2 checkpoints: a folder holding ``context/`` (what the model is) and ``weights/`` (its tensors).

What NeMo writes (``nemo/lightning/ckpt_utils.py``: ``WEIGHTS_PATH = "weights"``, ``CONTEXT_PATH =
"context"``; ``nemo/lightning/io/pl.py``: ``MegatronCheckpointIO`` saves ``weights/`` with
``megatron.core.dist_checkpointing.save``; ``nemo/lightning/io/mixin.py``: ``IOMixin.io_dump``
writes ``io.json`` and one ``<attr>.yaml`` per attribute asked for, ``model`` in practice):

- ``weights/``: a Megatron ``torch_dist`` checkpoint (:mod:`.torch_dist`) whose model keys start
  with ``module.`` (``module.decoder.layers.self_attention.linear_qkv.weight``, layers stacked),
  possibly next to optimizer states under other keys;
- ``context/model.yaml``: the model's fiddle config as YAML, ``_target_`` naming each class and
  the other keys its arguments, defaults included::

      _target_: nemo.collections.llm.gpt.model.llama.LlamaModel
      config:
        _target_: nemo.collections.llm.gpt.model.llama.Llama3Config8B
        num_layers: 32
        hidden_size: 4096
        ...
      tokenizer:
        _target_: nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer
        pretrained_model_name: nemo_tokenizer

- ``context/io.json``: fiddle's JSON of the whole trainer context (not needed here, not read);
- ``context/nemo_tokenizer/``: an HF tokenizer's files; ``context/artifacts/``: e.g. generation_config.json.

model.yaml is read with :func:`~shardwise.jsonfile.parse_yaml` (PyYAML's safe loader): ``_target_`` strings are data, nothing is imported or
run. Nothing pickled (``common.pt``, pickled artifacts) is ever read. The vocabulary size is not in
model.yaml (the embedding is padded to ``make_vocab_size_divisible_by`` x TP; a preset
``vocab_size`` is the padded row count); NeMo's HF exporter takes it from the tokenizer, and so
does :func:`read_context`, from ``nemo_tokenizer/tokenizer.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..jsonfile import parse_json, parse_yaml

__all__ = ["CONTEXT", "WEIGHTS", "MODEL_YAML", "NEMO2_CONFIG_FILE", "TOKENIZER_DIR", "Nemo2Context", "looks_like_nemo2", "read_context", "companion_files"]

CONTEXT, WEIGHTS, MODEL_YAML, TOKENIZER_DIR = "context", "weights", "model.yaml", "nemo_tokenizer"
NEMO2_CONFIG_FILE = f"{CONTEXT}/{MODEL_YAML}"  # how messages name the config, relative to the checkpoint folder
_GENERATION_CONFIG = Path("artifacts") / "generation_config.json"
_CONFIG_MODULES = ("nemo.collections.llm.gpt.model.llama.", "nemo.collections.llm.gpt.model.base.")
_DIMS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
# GPTConfig fields whose Llama values the layout assumes; a config saying otherwise is another architecture
_LLAMA = {
    "normalization": ("RMSNorm",), "gated_linear_unit": (True,), "add_bias_linear": (False,), "add_qkv_bias": (False,),
    "position_embedding_type": ("rope",), "rotary_percent": (1.0, 1), "qk_layernorm": (False,),
}
_SILU = ("torch.nn.functional.silu", "torch.nn.functional.silu.silu", "torch.nn.SiLU")
_MAX_YAML_BYTES = 64 << 20


def looks_like_nemo2(folder: Path) -> bool:
    """A folder with ``context/model.yaml`` and a ``weights/`` torch_dist checkpoint."""
    from .torch_dist import looks_like_torch_dist

    return (folder / CONTEXT / MODEL_YAML).is_file() and (folder / WEIGHTS).is_dir() and looks_like_torch_dist(folder / WEIGHTS)


@dataclass(frozen=True)
class Nemo2Context:
    """What ``context/`` says: the GPT config mapping of model.yaml (``_target_`` kept as a string)
    and the tokenizer's vocabulary size (None when no ``tokenizer.json`` tells it)."""

    path: Path
    config: dict
    vocab: int | None


def read_context(folder: Path) -> Nemo2Context:
    """Read ``folder/context``; FormatError naming model.yaml when it is not YAML, lacks the model
    dimensions, or its config ``_target_`` is not a NeMo GPT/Llama config."""
    path = folder / CONTEXT / MODEL_YAML
    if path.stat().st_size > _MAX_YAML_BYTES:
        raise FormatError(f"{path}: {path.stat().st_size} bytes is too large for a model config")
    top = parse_yaml(path.read_bytes(), str(path), "the model config")
    if isinstance(top, dict) and "config" not in top and isinstance(top.get("model"), dict):
        top = top["model"]  # a whole-run config: the model is one of its entries
    config = top.get("config") if isinstance(top, dict) else None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: has no model config mapping ('config:' with a _target_ and the model's dimensions)")
    target = config.get("_target_")
    if not isinstance(target, str) or not target.startswith(_CONFIG_MODULES):
        raise FormatError(
            f"{path}: config _target_ {target!r} is not a NeMo GPT/Llama config "
            f"(nemo.collections.llm.gpt.model.llama or .base); shardwise converts Llama-family models"
        )
    for key in _DIMS:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FormatError(f"{path}: config {key} is {value!r}; the model's dimensions need a positive integer there")
    for key, allowed in _LLAMA.items():
        if key in config and config[key] not in allowed:
            raise FormatError(f"{path}: config {key} is {config[key]!r}, not the Llama family's {allowed[0]!r}; shardwise converts Llama-family models")
    activation = config.get("activation_func")
    target = activation.get("_target_") if isinstance(activation, dict) else activation
    if activation is not None and target not in _SILU:
        raise FormatError(f"{path}: config activation_func is {target!r}, not the Llama family's SiLU (torch.nn.functional.silu); shardwise converts Llama-family models")
    return Nemo2Context(path.parent, config, _tokenizer_vocab(path.parent / TOKENIZER_DIR / "tokenizer.json"))


def _tokenizer_vocab(path: Path) -> int | None:
    """len(tokenizer) of an HF ``tokenizer.json``: one past the largest id of its vocabulary and added tokens."""
    if not path.is_file():
        return None
    try:
        data = parse_json(path.read_bytes(), str(path), "the tokenizer")
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list of [piece, score]
        ids += [t["id"] for t in data.get("added_tokens") or []]
    except (OSError, ValueError, KeyError, TypeError):  # FormatError is a ValueError: an unreadable tokenizer tells nothing
        return None
    ints = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ints) + 1 if ints and len(ints) == len(ids) else None


def companion_files(folder: Path) -> list[tuple[str, Path]]:
    """(name in an HF folder, path) of the HF tokenizer files in ``context/nemo_tokenizer/`` (by name:
    :data:`~.hf.TOKENIZER_FILES`, so nothing there can replace the converted weights or config) and
    of ``context/artifacts/generation_config.json``. Links to regular files are followed, as in HF
    folders (a hub cache links every file into ``blobs/``)."""
    from .hf import TOKENIZER_FILES

    context = folder / CONTEXT
    tokenizer = context / TOKENIZER_DIR
    found = [(name, tokenizer / name) for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    if (context / _GENERATION_CONFIG).is_file():
        found.append(("generation_config.json", context / _GENERATION_CONFIG))
    return found
