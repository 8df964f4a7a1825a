"""Tiny CLIPs for the tests, built with transformers and written the way HF and OpenCLIP publish them (no Hub).

- :func:`tiny_clip`: a random ``CLIPModel`` saved by ``save_pretrained``, with a tiny byte-level BPE
  ``CLIPTokenizer`` (``<|endoftext|>`` the highest id, as in CLIP's vocabulary) and a
  ``preprocessor_config.json`` whose mean and std are not OpenAI's, so that they must travel;
- :func:`openclip_state_dict`: the same weights in OpenCLIP's layout, written from OpenCLIP's
  ``CLIP``/``VisionTransformer``/``ResidualAttentionBlock`` attribute names (``in_proj_weight`` =
  [Q; K; V], projections stored ``[width, embed]``), independently of shardwise's tables;
- :func:`reference_probs`: what transformers computes for an image and texts on an HF folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
TEXTS = ["a dog", "a cat", "a big red dog", "no cat"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, which CLIP's BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer():
    """A CLIPTokenizer over all 256 byte characters (alone and word-final) plus a few merges."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip(folder: Path, *, seed: int = 0, act: str = "quick_gelu", context: int = 16, tokenizer: bool = True) -> Path:
    """A random CLIPModel (vision 48 wide, text 32 wide, 4 heads each, 2 layers each) saved into ``folder``."""
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_tokenizer()
    vocab = len(tok)
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=context, hidden_act=act, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=24, logit_scale_init_value=math.log(30.0),  # a sharper softmax than CLIP's initial 14.3
    )
    model = transformers.CLIPModel(config)
    with torch.no_grad():
        for p in model.parameters():  # random biases and norms too: a zero bias would hide a misplaced one
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


def make_image(path: Path, width: int = 48, height: int = 40, seed: int = 0) -> Path:
    """A generated RGB image: gradients plus noise (its centre-crop margin is even, so every crop rule agrees)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    pixels = torch.stack([x, y, (x + y) / 2]) * 200 + torch.rand(3, height, width, generator=g) * 55
    Image.fromarray(pixels.permute(1, 2, 0).to(torch.uint8).numpy()).save(path)
    return path


def reference_probs(folder: Path, image: Path, texts: list[str]) -> list[float]:
    """transformers' CLIPModel probabilities (softmax of logits_per_image) with its own tokenizer and image processor."""
    import transformers
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    processor = CLIPImageProcessorPil(**{k: v for k, v in json.loads((folder / "preprocessor_config.json").read_text()).items()
                                         if k in ("size", "crop_size", "image_mean", "image_std")})
    inputs = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, pixel_values=processor(images=Image.open(image), return_tensors="pt")["pixel_values"])
    return out.logits_per_image.softmax(dim=-1)[0].tolist()


def openclip_state_dict(hf: dict[str, torch.Tensor], vision_layers: int, text_layers: int, *, contiguous: bool = True) -> dict[str, torch.Tensor]:
    """HF CLIP weights renamed and reshaped into OpenCLIP's ``CLIP.state_dict()`` layout.

    ``contiguous=False`` keeps the projections as transposed views, as ``torch.save`` of ``w.T`` stores them.
    """
    out = {"logit_scale": hf["logit_scale"]}

    def blocks(hf_prefix: str, oc_prefix: str, layers: int) -> None:
        for i in range(layers):
            h, o = f"{hf_prefix}.encoder.layers.{i}.", f"{oc_prefix}transformer.resblocks.{i}."
            out[o + "ln_1.weight"], out[o + "ln_1.bias"] = hf[h + "layer_norm1.weight"], hf[h + "layer_norm1.bias"]
            for p in ("weight", "bias"):
                out[o + f"attn.in_proj_{p}"] = torch.cat([hf[h + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
                out[o + f"attn.out_proj.{p}"] = hf[h + f"self_attn.out_proj.{p}"]
                out[o + f"ln_2.{p}"] = hf[h + f"layer_norm2.{p}"]
                out[o + f"mlp.c_fc.{p}"] = hf[h + f"mlp.fc1.{p}"]
                out[o + f"mlp.c_proj.{p}"] = hf[h + f"mlp.fc2.{p}"]

    def transposed(t: torch.Tensor) -> torch.Tensor:
        return t.T.contiguous() if contiguous else t.T

    out["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf["vision_model.embeddings.position_embedding.weight"]
    out["visual.proj"] = transposed(hf["visual_projection.weight"])
    out["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = hf[f"vision_model.pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = hf[f"vision_model.post_layernorm.{p}"]
        out[f"ln_final.{p}"] = hf[f"text_model.final_layer_norm.{p}"]
    blocks("vision_model", "visual.", vision_layers)
    out["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = transposed(hf["text_projection.weight"])
    out["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    blocks("text_model", "", text_layers)
    return out


def openclip_folder(folder: Path, hf_folder: Path) -> Path:
    """``hf_folder``'s CLIP as OpenCLIP publishes a model: open_clip_config.json, open_clip_model.safetensors, tokenizer files."""
    from safetensors.torch import load_file, save_file

    hf_config = json.loads((hf_folder / "config.json").read_text())
    text, vision = hf_config["text_config"], hf_config["vision_config"]
    folder.mkdir()
    state = openclip_state_dict(load_file(hf_folder / "model.safetensors"), vision["num_hidden_layers"], text["num_hidden_layers"])
    save_file(state, folder / "open_clip_model.safetensors")
    model_cfg = {
        "embed_dim": hf_config["projection_dim"],
        "quick_gelu": vision["hidden_act"] == "quick_gelu",
        "vision_cfg": {"image_size": vision["image_size"], "layers": vision["num_hidden_layers"], "width": vision["hidden_size"],
                       "head_width": vision["hidden_size"] // vision["num_attention_heads"], "patch_size": vision["patch_size"],
                       "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
        "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"], "width": text["hidden_size"],
                     "heads": text["num_attention_heads"], "layers": text["num_hidden_layers"], "mlp_ratio": text["intermediate_size"] / text["hidden_size"]},
    }
    preprocess = {"mean": MEAN, "std": STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    return folder
