"""What transformers' ``save_pretrained`` writes into an HF folder, as rules shardwise's ``--to hf`` follows.

``save_pretrained`` (transformers 5) writes weights in shards of at most 50GB named
``model-0000X-of-0000Y.safetensors`` (one ``model.safetensors`` when they fit), each with the
safetensors metadata ``{"format": "pt"}``; an index whose metadata holds ``total_size`` (bytes of
the tensors written) and ``total_parameters``; ``config.json`` whose ``dtype`` is the weights'
dtype; ``generation_config.json`` for models that generate; and each tied weight once. The
planning side lives in :mod:`shardwise.plan`; this module holds the rest:

- :func:`aliased_duplicates`: tensors of a torch file that are the very same bytes as an earlier
  tensor (a tied ``lm_head.weight`` saved by ``torch.save(model.state_dict())``) are written once,
  as ``save_pretrained`` drops a tied weight, unless the config unties the word embeddings;
- :func:`config_for_dtype`: after a cast, ``config.json`` names the new dtype, because
  ``from_pretrained`` loads in the dtype the config names (``dtype="auto"``, its default);
- :func:`derived_generation_config`: when the source carries no ``generation_config.json`` and its
  config names a generating architecture (``*ForCausalLM``, ``*LMHeadModel``,
  ``*ForConditionalGeneration``, ``*ForSpeechSeq2Seq``), the folder gets the one ``save_pretrained``
  would write: the generation settings of the config (token ids, ``use_cache``, legacy sampling
  keys) marked ``_from_model_config``. ``from_pretrained`` derives the same values when the file is
  missing, so this changes no behaviour; it makes the folder complete for tools that read the file.

Pure functions, except :func:`finish_hf_folder`, which applies the last two to a staged folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..atomic import write_text_durably
from ..jsonfile import read_json_object
from ..tensors import StoredTensor

__all__ = [
    "GENERATION_CONFIG", "aliased_duplicates", "ties_embeddings", "config_for_dtype", "can_generate",
    "derived_generation_config", "finish_hf_folder", "hf_json",
]

GENERATION_CONFIG = "generation_config.json"
_GENERATING_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSpeechSeq2Seq")
_SUBCONFIGS = ("decoder", "generator", "text_config")  # where transformers also looks for generation keys
# The GenerationConfig fields a model config may carry (transformers 4 kept these in config.json).
_GENERATION_KEYS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "output_attentions", "output_hidden_states",
)
# Every transformers config object has these, so save_pretrained's generation config always names them.
_CONFIG_OBJECT_DEFAULTS = {"output_attentions": False, "output_hidden_states": False}


def hf_json(document: dict) -> str:
    """A JSON document formatted as transformers writes its configs (2-space indent, sorted keys)."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def aliased_duplicates(entries: Iterable[tuple[str, StoredTensor | None]]) -> dict[str, str]:
    """``{duplicate name: first name}`` for tensors stored as the very same bytes as an earlier one.

    Same file, offset, strides, shape and dtype: what ``torch.save`` writes for tied parameters.
    Entries are taken in source order, so the first name (the input embedding, declared before
    the head in HF models) is the one kept. Overlapping but different views are not duplicates.

    >>> from shardwise.tensors import TensorInfo
    >>> e = StoredTensor(TensorInfo("x", (2, 2), "float32"), "m.pt", 64)
    >>> aliased_duplicates([("embed.weight", e), ("lm_head.weight", e)])
    {'lm_head.weight': 'embed.weight'}
    """
    seen: dict[tuple, str] = {}
    duplicates: dict[str, str] = {}
    for name, entry in entries:
        if entry is None:
            continue
        key = (entry.path, entry.offset, entry.strides, entry.info.shape, entry.info.dtype)
        if key in seen:
            duplicates[name] = seen[key]
        else:
            seen[key] = name
    return duplicates


def ties_embeddings(config: dict) -> bool:
    """Whether an HF config says ``tie_word_embeddings: true`` (at the top or in its text config).

    A config without the key ties nothing here: Llama's config class defaults to untied, and
    writing both copies always loads, while dropping one that from_pretrained will not tie loses it.
    """
    text = config.get("text_config")
    return config.get("tie_word_embeddings") is True or (isinstance(text, dict) and text.get("tie_word_embeddings") is True)


def config_for_dtype(config: dict, dtype: str) -> dict:
    """A copy of ``config`` naming ``dtype``: its ``dtype`` set, and every ``dtype``/``torch_dtype`` of it or its sub-configs.

    ``dtype`` is a torch dtype name without the prefix (``bfloat16``), as ``save_pretrained`` writes it.

    >>> config_for_dtype({"torch_dtype": "float32", "text_config": {"dtype": "float32"}}, "bfloat16")
    {'torch_dtype': 'bfloat16', 'text_config': {'dtype': 'bfloat16'}, 'dtype': 'bfloat16'}
    """
    return {**_dtype_replaced(config, dtype), "dtype": dtype}


def _dtype_replaced(config: dict, dtype: str) -> dict:
    return {
        key: dtype if key in ("dtype", "torch_dtype") else _dtype_replaced(value, dtype) if isinstance(value, dict) else value
        for key, value in config.items()
    }


def can_generate(config: dict) -> bool:
    """Whether the config's ``architectures`` name a class that ``generate()``s (see module docstring)."""
    architectures = config.get("architectures")
    return isinstance(architectures, list) and any(isinstance(a, str) and a.endswith(_GENERATING_SUFFIXES) for a in architectures)


def derived_generation_config(config: dict) -> dict | None:
    """The ``generation_config.json`` that ``save_pretrained`` writes for a model built from ``config``, or None.

    None when the architecture does not generate. Each generation key is taken from the config,
    else from its decoder/text sub-config, else from the defaults every transformers config object
    has; ``transformers_version`` is the config's.

    >>> derived_generation_config({"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2})
    {'_from_model_config': True, 'bos_token_id': 1, 'eos_token_id': 2, 'output_attentions': False, 'output_hidden_states': False}
    """
    if not can_generate(config):
        return None
    sub = next((config[k] for k in _SUBCONFIGS if isinstance(config.get(k), dict)), {})
    derived: dict = {"_from_model_config": True}
    for key in _GENERATION_KEYS:
        value = config.get(key)
        if value is None:
            value = sub.get(key, _CONFIG_OBJECT_DEFAULTS.get(key))
        if value is not None:
            derived[key] = value
    if isinstance(config.get("transformers_version"), str):
        derived["transformers_version"] = config["transformers_version"]
    return derived


def finish_hf_folder(stage: Path, *, cast: str | None = None) -> list[str]:
    """Complete a staged HF folder whose weights and companion files are written; returns the files (re)written.

    With ``cast`` (the dtype floating tensors were cast to), ``config.json`` is rewritten to name
    it. Without a ``generation_config.json`` in ``stage``, the one derived from ``config.json`` is
    written for generating architectures. A folder without ``config.json`` is left alone.
    Called once, on the staging folder, before the atomic commit; files are fsynced.
    """
    config_path = stage / "config.json"
    if not config_path.is_file():
        return []
    config = read_json_object(config_path, "config")
    written = []
    if cast is not None:
        write_text_durably(config_path, hf_json(config_for_dtype(config, cast)))
        written.append("config.json")
    if not (stage / GENERATION_CONFIG).exists():
        generation = derived_generation_config(config)
        if generation is not None:
            write_text_durably(stage / GENERATION_CONFIG, hf_json(generation))
            written.append(GENERATION_CONFIG)
    return written
