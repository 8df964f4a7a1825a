"""CLIP inputs as NeMo's ``megatron_clip_infer.py`` prepares them: an image tensor and text token ids.

Image (``image_transform(is_train=False)``, torchvision's rules, done here with Pillow alone):
RGB; the shortest side resized to the model's image size with bicubic interpolation (the other
side ``int(size * long / short)``); a centre crop of size x size (offsets rounded half to even,
as torchvision's ``center_crop``); values / 255; ``(x - mean) / std`` per channel.

Text (``tokenize`` in NeMo's ``clip_dataset.py``): ``[bos] + ids + [eos]``, truncated to the
context length with the last token forced to ``eos``, padded with the pad id. The end-of-text
position of each text is returned with the ids: that is where its features are pooled (where
NeMo's and OpenCLIP's ``argmax`` land, ``<|endoftext|>`` being CLIP's highest id).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError, OptionError

__all__ = ["load_image", "resized_size", "crop_box", "load_tokenizer", "encode_texts"]


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest side to ``size`` (torchvision's ``Resize(int)``).

    >>> resized_size(48, 40, 32)
    (38, 32)
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's ``CenterCrop(size)`` on a width x height image.

    >>> crop_box(38, 32, 32)
    (3, 0, 35, 32)
    """
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def load_image(path: str | os.PathLike, size: int, mean, std):
    """The image at ``path`` as a ``[1, 3, size, size]`` float32 tensor (see module docstring).

    FormatError naming the file when it is missing or not an image Pillow can decode.
    """
    import torch

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise OptionError("clip-infer reads images with Pillow; install it: pip install 'shardwise[clip]'") from None
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such image file")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not halfway through the forward
            image = opened.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise FormatError(f"{path}: not an image Pillow can read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    image = image.resize(resized_size(*image.size, size), Image.BICUBIC)
    image = image.crop(crop_box(*image.size, size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float().div(255)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def load_tokenizer(folder: str | os.PathLike):
    """The HF tokenizer saved in ``folder`` (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``), local files only."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise OptionError("clip-infer tokenizes with transformers; install it: pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise FormatError(f"{folder}: cannot load a tokenizer from it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def encode_texts(tokenizer, texts: list[str], context: int, vocab: int):
    """(ids ``[len(texts), context]`` int64, end-of-text position of each text); see module docstring.

    FormatError when the tokenizer has no bos/eos token or produces ids the model has no embedding for.
    """
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise FormatError(f"the tokenizer ({type(tokenizer).__name__}) has no start-of-text or end-of-text token; it is not a CLIP tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, ends = [], []
    for text in texts:
        ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos][:context]
        ids[-1] = eos
        ends.append(len(ids) - 1)
        rows.append(ids + [pad] * (context - len(ids)))
    out = torch.tensor(rows, dtype=torch.int64)
    if int(out.max()) >= vocab or int(out.min()) < 0:
        raise FormatError(f"the tokenizer gives token id {int(out.max())}, but the model's vocabulary has {vocab} tokens; it is not this model's tokenizer")
    return out, ends
