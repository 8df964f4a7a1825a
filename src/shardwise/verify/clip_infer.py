"""Zero-shot CLIP classification computed from a Megatron-core CLIP archive's own stored tensors.

The forward reads each TP rank's tensors by their mcore names and interprets them as Megatron-core
does when it loads that rank, in one process: ``linear_qkv`` holds the rank's heads as
``[q_h; k_h; v_h]`` blocks of ``head_dim`` rows, ``linear_proj`` and ``linear_fc2`` are
row-parallel (their partial products are summed over ranks, the all-reduce, then the bias is
added once), ``linear_fc1`` is column-parallel, and the word embedding is vocabulary-parallel
(rank r holds rows ``[r*V/TP, (r+1)*V/TP)``; lookups outside them are zero and the ranks are summed).
It does not go through shardwise's tile plans, so an archive whose fused layout is wrong gives
wrong probabilities here even if it round-trips.

Procedure (NeMo's ``megatron_clip_infer.py``, see :mod:`.clip_inputs` for the inputs): image
features are the class token after the vision tower's final layer norm, through its head; text
features the end-of-text token after the text tower's final layer norm (causal attention), through
its head; both are L2-normalised; probabilities are ``softmax(scale * image . text)`` over the
texts, ``scale`` the model's own ``exp(logit_scale)``, or 100 with ``fixed_scale`` (as NeMo's
script does). Everything runs in float32 on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..archive.artifacts import NEMO_PREFIX, config_value
from ..atomic import temporary_folder
from ..errors import FormatError, OptionError
from ..reshard.clip_model import ClipModel, clip_source_kind, open_clip_model
from ..storage import accepts_urls
from .clip_inputs import encode_texts, load_image, load_tokenizer

__all__ = ["ClipScores", "clip_infer", "ClipForward"]

FIXED_SCALE = 100.0


@dataclass
class ClipScores:
    """Each text's probability for the image (in the order given), and the scale the cosines were multiplied by."""

    archive: str
    image: str
    texts: list[str]
    probabilities: list[float]
    scale: float
    fixed_scale: bool
    tp: int

    def ranked(self) -> list[tuple[str, float]]:
        """(text, probability), highest first."""
        return sorted(zip(self.texts, self.probabilities), key=lambda tp: -tp[1])

    def as_dict(self) -> dict:
        return {
            "archive": self.archive, "image": self.image, "scale": self.scale, "fixed_scale": self.fixed_scale, "tp": self.tp,
            "results": [{"text": t, "probability": p} for t, p in self.ranked()],
        }


@accepts_urls(inputs=("archive", "image", "tokenizer"))
def clip_infer(
    archive: str | os.PathLike,
    image: str | os.PathLike,
    texts: list[str],
    *,
    fixed_scale: bool = False,
    tokenizer: str | os.PathLike | None = None,
    trust_pickle: bool = False,
) -> ClipScores:
    """Zero-shot probabilities of ``texts`` for ``image`` under the CLIP archive (or unpacked archive) ``archive``.

    ``tokenizer`` is a folder with HF tokenizer files, for archives that carry none. Raises
    OptionError when no text is given, FormatError when ``archive`` is not a CLIP archive, the
    image is not an image, or there is no usable tokenizer.

    >>> clip_infer("clip.nemo", "cat.jpg", ["a dog", "a cat"]).ranked()[0]  # doctest: +SKIP
    ('a cat', 0.99...)
    """
    texts = list(texts or [])
    if not texts:
        raise OptionError("give at least one text to score: --texts 'a dog' 'a cat'")
    if not Path(archive).exists():
        raise FormatError(f"{archive}: no such file or folder")
    if clip_source_kind(archive) != "mcore":
        raise FormatError(f"{archive}: is not a CLIP archive (a .nemo or unpacked folder whose model_config.yaml has vision and text sections)")
    import torch

    with open_clip_model(archive, trust_pickle=trust_pickle, kind="mcore") as model:
        dims = model.dims
        pixels = load_image(image, dims.image, dims.mean, dims.std)
        with _tokenizer_folder(model, tokenizer) as folder:
            ids, ends = encode_texts(load_tokenizer(folder), texts, dims.context, dims.vocab)
        forward = ClipForward(model)
        with torch.no_grad():
            image_features = torch.nn.functional.normalize(forward.image_features(pixels), dim=-1)
            text_features = torch.nn.functional.normalize(forward.text_features(ids, ends), dim=-1)
            scale = FIXED_SCALE if fixed_scale else float(forward.whole("", "logit_scale").exp())
            probabilities = (scale * image_features @ text_features.T).softmax(dim=-1)[0]
    return ClipScores(os.fspath(archive), os.fspath(image), list(texts), [float(p) for p in probabilities], scale, fixed_scale, model.tp)


@contextlib.contextmanager
def _tokenizer_folder(model: ClipModel, given: str | os.PathLike | None):
    """``given``, or the archive's tokenizer artifact (extracted to a temporary folder while the block runs)."""
    if given is not None:
        yield Path(given)
        return
    reference = config_value(model.nemo_config or {}, "tokenizer.type")
    if not (isinstance(reference, str) and reference.startswith(NEMO_PREFIX)):
        named = f" (it names {reference!r}, which shardwise does not download)" if isinstance(reference, str) else ""
        raise FormatError(f"{model.path}: carries no tokenizer{named}; pass --tokenizer FOLDER with the model's tokenizer files, "
                          f"or convert from a folder that has them (tokenizer.json, or vocab.json and merges.txt)")
    member = reference[len(NEMO_PREFIX):]
    if model.archive is None:  # an unpacked archive: the artifact is a folder next to model_config.yaml
        yield Path(model.path) / member
        return
    with temporary_folder("shardwise-tokenizer-") as tmp:
        model.archive.extract([member], Path(tmp))
        yield Path(tmp) / member


class ClipForward:
    """The CLIP forward over a :class:`~shardwise.reshard.clip_model.ClipModel`'s stored mcore tensors (see module docstring).

    Reads each tensor when it is used (a layer's worth at a time), as float32. Not thread-safe.
    """

    def __init__(self, model: ClipModel) -> None:
        if model.container not in ("archive", "nemo-dir"):
            raise FormatError(f"{model.path}: the forward runs Megatron-core archives; convert it --to archive first")
        self.model, self.tp = model, model.tp

    def rank(self, tp_rank: int, tower: str, role: str, layer: int | None = None):
        return self.model.stored(tp_rank, tower, role, layer).float()

    def whole(self, tower: str, role: str, layer: int | None = None):
        """A tensor every rank holds whole (norms, biases of row-parallel layers, embeddings, heads): rank 0's copy."""
        return self.rank(0, tower, role, layer)

    def image_features(self, pixels):
        """``[batch, embed]`` image features (before normalisation) of ``[batch, 3, size, size]`` pixels."""
        import torch
        import torch.nn.functional as F

        dims, t = self.model.dims, self.model.dims.vision
        x = F.conv2d(pixels, self.whole("vision", "patch"), stride=dims.patch).flatten(2).transpose(1, 2)
        cls = self.whole("vision", "class").reshape(1, 1, t.width).expand(x.shape[0], 1, t.width)
        x = torch.cat([cls, x], dim=1) + self.whole("vision", "pos")
        x = self._norm(x, "vision", "ln_pre")
        for layer in range(t.layers):
            x = self._layer(x, "vision", layer, causal=False)
        return self._norm(x[:, 0], "vision", "ln_post") @ self.whole("vision", "proj").T

    def text_features(self, ids, ends: list[int]):
        """``[texts, embed]`` text features (before normalisation) of ``[texts, context]`` token ids pooled at ``ends``."""
        import torch

        t = self.model.dims.text
        x = self._embed(ids) + self.whole("text", "pos")[: ids.shape[1]]
        for layer in range(t.layers):
            x = self._layer(x, "text", layer, causal=True)
        x = self._norm(x[torch.arange(len(ends)), torch.tensor(ends)], "text", "ln_post")
        return x @ self.whole("text", "proj").T

    # -- pieces ---------------------------------------------------------------------------------
    def _norm(self, x, tower: str, role: str, layer: int | None = None):
        import torch.nn.functional as F

        weight, bias = self.whole(tower, f"{role}.weight", layer), self.whole(tower, f"{role}.bias", layer)
        return F.layer_norm(x, x.shape[-1:], weight, bias, self.model.dims.tower(tower).eps)

    def _embed(self, ids):
        """Vocabulary-parallel lookup: each rank embeds the ids in its row range; the ranks are summed."""
        import torch.nn.functional as F

        out = 0
        for r in range(self.tp):
            table = self.rank(r, "text", "token")
            first = r * table.shape[0]
            inside = (ids >= first) & (ids < first + table.shape[0])
            out = out + F.embedding((ids - first).clamp(0, table.shape[0] - 1), table) * inside.unsqueeze(-1)
        return out

    def _layer(self, x, tower: str, layer: int, *, causal: bool):
        t = self.model.dims.tower(tower)
        h = self._norm(x, tower, "ln1", layer)
        x = x + sum(self._attention(h, tower, layer, r, causal) for r in range(self.tp)) + self.whole(tower, "o.bias", layer)
        h = self._norm(x, tower, "ln2", layer)
        return x + sum(self._mlp(h, tower, layer, r, t.act) for r in range(self.tp)) + self.whole(tower, "fc2.bias", layer)

    def _attention(self, h, tower: str, layer: int, r: int, causal: bool):
        """Rank ``r``'s heads: its ``linear_qkv`` rows are ``[q; k; v]`` per head; returns its share of ``linear_proj``'s output."""
        import torch
        import torch.nn.functional as F

        d = self.model.dims.tower(tower).head_dim
        qkv = F.linear(h, self.rank(r, tower, "qkv.weight", layer), self.rank(r, tower, "qkv.bias", layer))
        batch, seq = h.shape[:2]
        q, k, v = qkv.view(batch, seq, -1, 3, d).permute(3, 0, 2, 1, 4)  # each [batch, heads of rank r, seq, d]
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5
        if causal:
            scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, seq, -1)
        return F.linear(context, self.rank(r, tower, "o.weight", layer))

    def _mlp(self, h, tower: str, layer: int, r: int, act: str):
        import torch
        import torch.nn.functional as F

        hidden = F.linear(h, self.rank(r, tower, "fc1.weight", layer), self.rank(r, tower, "fc1.bias", layer))
        hidden = hidden * torch.sigmoid(1.702 * hidden) if act == "quick_gelu" else F.gelu(hidden)
        return F.linear(hidden, self.rank(r, tower, "fc2.weight", layer))
