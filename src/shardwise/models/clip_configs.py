"""CLIP configs both ways: HF ``config.json``, NeMo's ``model_config.yaml``, OpenCLIP's model configs.

Every reader returns :class:`~shardwise.models.clip.ClipDims` or raises FormatError naming the
file and the value; a config asking for a forward shardwise's CLIP does not run (an attentional
pooler, LayerScale, a timm or HF text tower ...) is refused here rather than converted wrongly.

- HF: ``CLIPConfig`` (missing keys take ``CLIPTextConfig``/``CLIPVisionConfig`` defaults); the image
  mean and std come from ``preprocessor_config.json`` when there is one;
- NeMo: the keys of NeMo's ``megatron_clip_VIT-L-14.yaml`` (``vision.patch_dim``, ``img_h``,
  ``image_mean``, ``text.encoder_seq_length`` ...), as ``convert_clip_hf_to_nemo.py`` sets them
  (``mcore_gpt``, ``transformer_engine``, ``learned_absolute`` positions). NeMo's ``approx-gelu``
  is x * sigmoid(1.702 x), HF's ``quick_gelu``;
- OpenCLIP: ``model_cfg`` (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``) with the
  defaults of OpenCLIP's ``CLIPVisionCfg``/``CLIPTextCfg``, ``preprocess_cfg`` for mean and std, and
  :data:`OPENCLIP_ARCHS`, the standard ViT architectures of OpenCLIP's model list.
"""

from __future__ import annotations

import contextlib

from ..errors import FormatError, ShardwiseError
from .clip import OPENAI_MEAN, OPENAI_STD, ClipDims, Tower, check_dims

__all__ = [
    "dims_from_hf_config", "hf_config_from_dims", "nemo_clip_config", "dims_from_nemo_config", "is_clip_nemo_config",
    "OPENCLIP_ARCHS", "openclip_arch", "dims_from_openclip", "NEMO_CLIP_TARGET",
]

NEMO_CLIP_TARGET = "nemo.collections.multimodal.models.vision_language_foundation.clip.megatron_clip_models.MegatronCLIPModel"
_TO_NEMO_ACT = {"quick_gelu": "approx-gelu", "gelu": "gelu"}
_FROM_NEMO_ACT = {v: k for k, v in _TO_NEMO_ACT.items()}
_HF_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_HF_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3,
              "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


@contextlib.contextmanager
def _malformed(label: str):
    """Turn a value of the wrong type deep in a config (``None`` where a number belongs) into one FormatError."""
    try:
        yield
    except ShardwiseError:
        raise
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, KeyError) as e:
        raise FormatError(f"{label}: malformed CLIP config ({type(e).__name__}: {e})") from None


def _section(config: dict, key: str, label: str) -> dict:
    """``config[key]``, a mapping (empty when absent); FormatError naming ``label`` for anything else."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FormatError(f"{label}: {key} is a {type(value).__name__}, not a mapping")
    return value


# -- HuggingFace ---------------------------------------------------------------------------------
def dims_from_hf_config(config: dict, label: str, preprocessor: dict | None = None) -> ClipDims:
    """Dimensions from an HF ``CLIPModel`` config.json (and its preprocessor_config.json, if any)."""
    if config.get("model_type") != "clip":
        raise FormatError(f"{label}: model_type is {config.get('model_type')!r}, not a CLIPModel config ('clip')")
    with _malformed(label):
        text = {**_HF_TEXT, **_section(config, "text_config", label)}
        vision = {**_HF_VISION, **_section(config, "vision_config", label)}

    def tower(c: dict) -> Tower:
        return Tower(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"], c["hidden_act"], float(c["layer_norm_eps"]))

    pre = preprocessor or {}
    with _malformed(label):
        dims = ClipDims(
            tower(vision), tower(text), config.get("projection_dim", 512), vision["patch_size"], vision["image_size"],
            text["vocab_size"], text["max_position_embeddings"], vision["num_channels"],
            tuple(map(float, pre.get("image_mean") or OPENAI_MEAN)), tuple(map(float, pre.get("image_std") or OPENAI_STD)),
        )
    return check_dims(dims, label)


def hf_config_from_dims(dims: ClipDims, *, logit_scale_init: float = 2.6592) -> dict:
    """An HF ``CLIPModel`` config.json for ``dims`` (for sources that carry none: OpenCLIP, NeMo).

    The text tower's ``eos_token_id`` is the last id of the vocabulary (CLIP's ``<|endoftext|>``,
    the highest id), so transformers pools at the first end-of-text token, as OpenCLIP's argmax does.
    """
    def tower(t: Tower) -> dict:
        return {"hidden_size": t.width, "intermediate_size": t.mlp, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                "hidden_act": t.act, "layer_norm_eps": t.eps, "projection_dim": dims.embed}

    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": dims.embed,
        "logit_scale_init_value": logit_scale_init,
        "text_config": {**tower(dims.text), "model_type": "clip_text_model", "vocab_size": dims.vocab, "max_position_embeddings": dims.context,
                        "bos_token_id": dims.vocab - 2, "eos_token_id": dims.vocab - 1, "pad_token_id": 1},
        "vision_config": {**tower(dims.vision), "model_type": "clip_vision_model", "image_size": dims.image, "patch_size": dims.patch,
                          "num_channels": dims.channels},
    }


# -- NeMo ------------------------------------------------------------------------------------------
def is_clip_nemo_config(config: dict | None) -> bool:
    """Whether a ``model_config.yaml`` mapping describes a NeMo CLIP (vision and text sections, or a CLIP target)."""
    if not isinstance(config, dict):
        return False
    target = config.get("target") or config.get("_target_") or ""
    return (isinstance(config.get("vision"), dict) and isinstance(config.get("text"), dict)) or (isinstance(target, str) and "CLIP" in target)


def nemo_clip_config(dims: ClipDims, *, tp: int, vocab_multiple: int, precision) -> dict:
    """A ``model_config.yaml`` mapping for a Megatron-core CLIP at tensor-parallel size ``tp``.

    Keys and values are NeMo's (``megatron_clip_VIT-L-14.yaml`` with what ``convert_clip_hf_to_nemo.py``
    forces); ``megatron_legacy`` is false because Q, K and V are stored per head, the mcore way.
    """
    def tower(t: Tower) -> dict:
        return {
            "precision": precision, "output_dim": dims.embed, "position_embedding_type": "learned_absolute",
            "num_layers": t.layers, "hidden_size": t.width, "ffn_hidden_size": t.mlp, "num_attention_heads": t.heads, "kv_channels": None,
            "normalization": "layernorm", "layernorm_epsilon": t.eps, "activation": _TO_NEMO_ACT[t.act], "openai_gelu": False,
            "bias_activation_fusion": False, "megatron_legacy": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        }

    patches = (dims.image // dims.patch) ** 2
    return {
        "target": NEMO_CLIP_TARGET,
        "precision": precision,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "mcore_gpt": True,
        "transformer_engine": True,
        "megatron_amp_O2": False,
        "output_dim": dims.embed,
        "local_loss": False,
        "gather_with_grad": True,
        "vision": {
            "patch_dim": dims.patch, "img_h": dims.image, "img_w": dims.image, "image_mean": list(dims.mean), "image_std": list(dims.std),
            "num_channels": dims.channels, "drop_patch_rate": 0.0, "drop_path_rate": 0.0, "global_average_pool": False,
            "class_token_length": 1, "preprocess_layernorm": True, "encoder_seq_length": patches, "max_position_embeddings": patches,
            **tower(dims.vision),
        },
        "text": {"encoder_seq_length": dims.context, "max_position_embeddings": dims.context, **tower(dims.text)},
        "make_vocab_size_divisible_by": vocab_multiple,
    }


def dims_from_nemo_config(config: dict, label: str, *, vocab: int) -> ClipDims:
    """Dimensions from a NeMo CLIP ``model_config.yaml`` mapping; ``vocab`` comes from elsewhere (NeMo does not record it)."""
    vision, text = config.get("vision"), config.get("text")
    if not (isinstance(vision, dict) and isinstance(text, dict)):
        raise FormatError(f"{label}: model_config.yaml has no vision and text sections; it is not a NeMo CLIP config")
    for where, section, key, wanted in (("vision", vision, "class_token_length", 1), ("vision", vision, "global_average_pool", False),
                                        ("vision", vision, "normalization", "layernorm"), ("text", text, "normalization", "layernorm"),
                                        ("vision", vision, "openai_gelu", False), ("text", text, "openai_gelu", False)):
        if section.get(key, wanted) != wanted:
            raise FormatError(f"{label}: {where}.{key} is {section.get(key)!r}; shardwise's CLIP runs {key} {wanted!r} only")
    if vision.get("img_w", vision.get("img_h")) != vision.get("img_h"):
        raise FormatError(f"{label}: vision.img_h {vision.get('img_h')} and img_w {vision.get('img_w')} differ; shardwise's CLIP takes square images")

    def tower(c: dict, where: str) -> Tower:
        act = c.get("activation", "gelu")
        if act not in _FROM_NEMO_ACT:
            raise FormatError(f"{label}: {where}.activation is {act!r}; shardwise's CLIP runs {' or '.join(_FROM_NEMO_ACT)}")
        return Tower(c.get("hidden_size"), c.get("num_layers"), c.get("num_attention_heads"), c.get("ffn_hidden_size"),
                     _FROM_NEMO_ACT[act], float(c.get("layernorm_epsilon", 1e-5)))

    embed = config.get("output_dim", vision.get("output_dim"))
    with _malformed(label):
        dims = ClipDims(
            tower(vision, "vision"), tower(text, "text"), embed, vision.get("patch_dim"), vision.get("img_h"), vocab,
            text.get("max_position_embeddings", text.get("encoder_seq_length")), vision.get("num_channels", 3),
            tuple(map(float, vision.get("image_mean") or OPENAI_MEAN)), tuple(map(float, vision.get("image_std") or OPENAI_STD)),
        )
    return check_dims(dims, label)


# -- OpenCLIP --------------------------------------------------------------------------------------
def _arch(embed: int, vision: tuple, text: tuple, quick_gelu: bool = False, image: int = 224) -> dict:
    """An OpenCLIP ``model_cfg`` from (layers, width, patch[, head_width, mlp_ratio]) and (width, heads, layers)."""
    layers, width, patch, *rest = vision
    vision_cfg = {"image_size": image, "layers": layers, "width": width, "patch_size": patch}
    if rest:
        vision_cfg.update(head_width=rest[0], mlp_ratio=rest[1])
    cfg = {"embed_dim": embed, "vision_cfg": vision_cfg, "text_cfg": dict(zip(("width", "heads", "layers"), text))}
    return {**cfg, "quick_gelu": True} if quick_gelu else cfg


_B32 = (512, (12, 768, 32), (512, 8, 12))
_B16 = (512, (12, 768, 16), (512, 8, 12))
_L14 = (768, (24, 1024, 14), (768, 12, 12))
_H14 = (1024, (32, 1280, 14, 80, 4.0), (1024, 16, 24))
# OpenCLIP's src/open_clip/model_configs/<name>.json, for the ViT architectures with a standard CLIP text tower.
OPENCLIP_ARCHS = {
    "ViT-S-32": _arch(384, (12, 384, 32), (384, 6, 12)),
    "ViT-S-16": _arch(384, (12, 384, 16), (384, 6, 12)),
    "ViT-M-32": _arch(512, (12, 512, 32), (512, 8, 12)),
    "ViT-M-16": _arch(512, (12, 512, 16), (512, 8, 12)),
    "ViT-B-32": _arch(*_B32),
    "ViT-B-32-quickgelu": _arch(*_B32, quick_gelu=True),
    "ViT-B-32-256": _arch(*_B32, image=256),
    "ViT-B-16": _arch(*_B16),
    "ViT-B-16-quickgelu": _arch(*_B16, quick_gelu=True),
    "ViT-B-16-plus-240": _arch(640, (12, 896, 16), (640, 10, 12), image=240),
    "ViT-L-14": _arch(*_L14),
    "ViT-L-14-quickgelu": _arch(*_L14, quick_gelu=True),
    "ViT-L-14-336": _arch(*_L14, image=336),
    "ViT-L-14-336-quickgelu": _arch(*_L14, quick_gelu=True, image=336),
    "ViT-H-14": _arch(*_H14),
    "ViT-H-14-quickgelu": _arch(*_H14, quick_gelu=True),
    "ViT-g-14": _arch(1024, (40, 1408, 14, 88, 4.3637), (1024, 16, 24)),
    "ViT-bigG-14": _arch(1280, (48, 1664, 14, 104, 4.9231), (1280, 20, 32)),
}

# Options that change the forward, with the values shardwise's CLIP runs (anything else is refused).
_PLAIN = {
    "model_cfg": {"custom_text": (False, None), "init_logit_bias": (None,), "multimodal_cfg": (None,), "nonscalar_logit_scale": (False, None)},
    "vision_cfg": {"timm_model_name": (None, ""), "ls_init_value": (None,), "attentional_pool": (False, None), "global_average_pool": (False, None),
                   "pool_type": ("tok", None), "no_ln_pre": (False, None), "pos_embed_type": ("learnable", None), "input_patchnorm": (False, None),
                   "act_kwargs": (None, {}), "norm_kwargs": (None, {}), "eva_model_name": (None, ""), "proj_type": ("linear", None),
                   "proj_bias": (False, None)},
    "text_cfg": {"hf_model_name": (None, ""), "ls_init_value": (None,), "pool_type": ("argmax", None), "no_causal_mask": (False, None),
                 "proj_type": ("linear", None), "proj_bias": (False, None), "embed_cls": (False, None), "act_kwargs": (None, {}),
                 "norm_kwargs": (None, {}), "ln_post_emb": (False, None)},
}


def openclip_arch(name: str) -> dict:
    """The ``model_cfg`` of a standard OpenCLIP architecture; FormatError listing the names known."""
    try:
        return OPENCLIP_ARCHS[name]
    except KeyError:
        raise FormatError(f"--arch {name}: not a standard OpenCLIP ViT architecture shardwise knows; choose {', '.join(OPENCLIP_ARCHS)}") from None


def dims_from_openclip(model_cfg: dict, preprocess_cfg: dict | None, label: str, *, warnings: list[str] | None = None) -> ClipDims:
    """Dimensions from an OpenCLIP ``model_cfg`` (and ``preprocess_cfg``), with OpenCLIP's defaults.

    Preprocessing that clip-infer does not do (an interpolation other than bicubic, a resize mode
    other than the shortest side) is reported in ``warnings``.
    """
    if not isinstance(model_cfg, dict):
        raise FormatError(f"{label}: model_cfg is not a mapping")
    vision, text = _section(model_cfg, "vision_cfg", label), _section(model_cfg, "text_cfg", label)
    for section, values in (("model_cfg", model_cfg), ("vision_cfg", vision), ("text_cfg", text)):
        for key, allowed in _PLAIN[section].items():
            if values.get(key) not in allowed:
                raise FormatError(f"{label}: {section}.{key} is {values.get(key)!r}; shardwise converts the standard CLIP ViT (with {key} {allowed[0]!r})")
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise FormatError(f"{label}: vision_cfg.layers is a list (a ModifiedResNet image tower); shardwise converts ViT image towers")
    image, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if isinstance(image, (list, tuple)):
        if len(set(image)) != 1:
            raise FormatError(f"{label}: vision_cfg.image_size {image} is not square")
        image = image[0]
    width, text_width = vision.get("width", 768), text.get("width", 512)
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    pre = preprocess_cfg if isinstance(preprocess_cfg, dict) else {}
    if warnings is not None:
        for key, plain in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
            if pre.get(key, plain) != plain:
                warnings.append(f"{label}: preprocess_cfg.{key} is {pre[key]!r}; shardwise clip-infer resizes the shortest side, bicubic")
    with _malformed(label):
        dims = ClipDims(
            Tower(width, vision.get("layers", 12), width // vision.get("head_width", 64), int(width * vision.get("mlp_ratio", 4.0)), act),
            Tower(text_width, text.get("layers", 12), text.get("heads", 8), int(text_width * text.get("mlp_ratio", 4.0)), act),
            model_cfg.get("embed_dim"), patch, image, text.get("vocab_size", 49408), text.get("context_length", 77), 3,
            tuple(map(float, pre.get("mean") or OPENAI_MEAN)), tuple(map(float, pre.get("std") or OPENAI_STD)),
        )
    return check_dims(dims, label)
