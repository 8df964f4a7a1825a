"""CLIP as data: its dimensions, and its tensor names in every style shardwise speaks.

A CLIP is two transformer towers (a ViT image tower and a causal text tower) with the same layer
shape (pre-LN attention with Q/K/V/out biases, a two-layer MLP), a projection per tower and a
logit scale. A tensor is named by its *role*: ``(tower, role)`` with ``tower`` ``vision``,
``text`` or ``""`` (the logit scale), and layer roles ``ln1 q k v o ln2 fc1 fc2`` (each with a
``.weight`` and a ``.bias``). Each style maps roles to name templates, ``{i}`` the layer index:

- ``hf``: transformers' ``CLIPModel``, the canonical form every conversion goes through;
- ``mcore``: NeMo's Megatron-core CLIP, as ``convert_clip_hf_to_nemo.py`` names it inside a
  ``.nemo`` (under ``model.``): Q, K and V fused per head into ``linear_qkv`` (role ``qkv``), the
  layer norms folded into the following linear layers (Transformer Engine names), the class token
  stored as ``(1, 1, width)``;
- ``openclip``: OpenCLIP's ``CLIP`` (read only): each entry is (template, view), where the view
  says how the canonical tensor is seen in the stored one: ``("rows", k, 3)`` for the k-th third of
  ``in_proj_weight``/``in_proj_bias`` ([Q; K; V]), ``"T"`` for the projections, which OpenCLIP
  stores transposed (``[width, embed]``, used as ``x @ proj``).

How the mcore roles are cut across tensor-parallel ranks is decided by
:mod:`shardwise.layout.clip_sharding` from the role alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError
from ..tensors import TensorInfo

__all__ = [
    "Tower", "ClipDims", "ClipStyle", "TOWERS", "TOWER_ROLES", "HF", "MCORE", "OPENCLIP",
    "name_of", "canonical_infos", "check_dims", "OPENAI_MEAN", "OPENAI_STD", "ACTIVATIONS",
]

TOWERS = ("vision", "text")
_HF_LAYER_ORDER = tuple(f"{part}.{p}" for part in ("k", "v", "q", "o", "ln1", "fc1", "fc2", "ln2") for p in ("weight", "bias"))
TOWER_ROLES = {
    "vision": ("class", "patch", "pos", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias", "proj"),
    "text": ("token", "pos", "ln_post.weight", "ln_post.bias", "proj"),
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")  # HF names; NeMo calls quick_gelu "approx-gelu"


def _params(prefix: str, parts: dict[str, str]) -> dict[str, str]:
    """``{"q.weight": prefix + "self_attn.q_proj.weight", ...}`` for parts named ``part -> stored stem``."""
    return {f"{role}.{p}": f"{prefix}{stem}.{p}" for role, stem in parts.items() for p in ("weight", "bias")}


@dataclass(frozen=True)
class ClipStyle:
    """One naming style: ``layers[tower]`` maps layer roles to templates (``{i}`` the layer),
    ``tower[(tower, role)]`` the other tensors (tower ``""`` for the logit scale)."""

    name: str
    layers: dict[str, dict[str, str]]
    tower: dict[tuple[str, str], str]


_HF_PARTS = {"ln1": "layer_norm1", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.out_proj", "ln2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
HF = ClipStyle(
    "hf",
    {t: _params(f"{t}_model.encoder.layers.{{i}}.", _HF_PARTS) for t in TOWERS},
    {
        ("vision", "class"): "vision_model.embeddings.class_embedding",
        ("vision", "patch"): "vision_model.embeddings.patch_embedding.weight",
        ("vision", "pos"): "vision_model.embeddings.position_embedding.weight",
        **{("vision", f"ln_pre.{p}"): f"vision_model.pre_layrnorm.{p}" for p in ("weight", "bias")},  # sic: HF's spelling
        **{("vision", f"ln_post.{p}"): f"vision_model.post_layernorm.{p}" for p in ("weight", "bias")},
        ("vision", "proj"): "visual_projection.weight",
        ("text", "token"): "text_model.embeddings.token_embedding.weight",
        ("text", "pos"): "text_model.embeddings.position_embedding.weight",
        **{("text", f"ln_post.{p}"): f"text_model.final_layer_norm.{p}" for p in ("weight", "bias")},
        ("text", "proj"): "text_projection.weight",
        ("", "logit_scale"): "logit_scale",
    },
)

_MCORE_LAYER = {
    "ln1.weight": "self_attention.linear_qkv.layer_norm_weight", "ln1.bias": "self_attention.linear_qkv.layer_norm_bias",
    "qkv.weight": "self_attention.linear_qkv.weight", "qkv.bias": "self_attention.linear_qkv.bias",
    "o.weight": "self_attention.linear_proj.weight", "o.bias": "self_attention.linear_proj.bias",
    "ln2.weight": "mlp.linear_fc1.layer_norm_weight", "ln2.bias": "mlp.linear_fc1.layer_norm_bias",
    "fc1.weight": "mlp.linear_fc1.weight", "fc1.bias": "mlp.linear_fc1.bias",
    "fc2.weight": "mlp.linear_fc2.weight", "fc2.bias": "mlp.linear_fc2.bias",
}
MCORE = ClipStyle(
    "mcore",
    {t: {role: f"model.{t}_encoder.decoder.layers.{{i}}.{stem}" for role, stem in _MCORE_LAYER.items()} for t in TOWERS},
    {
        ("vision", "class"): "model.vision_encoder.class_token",
        ("vision", "patch"): "model.vision_encoder.conv1.weight",
        ("vision", "pos"): "model.vision_encoder.position_embeddings.weight",
        **{("vision", f"ln_pre.{p}"): f"model.vision_encoder.ln_pre.{p}" for p in ("weight", "bias")},
        **{("vision", f"ln_post.{p}"): f"model.vision_encoder.final_layernorm.{p}" for p in ("weight", "bias")},
        ("vision", "proj"): "model.vision_encoder.head.weight",
        ("text", "token"): "model.text_encoder.embedding.word_embeddings.weight",
        ("text", "pos"): "model.text_encoder.embedding.position_embeddings.weight",
        **{("text", f"ln_post.{p}"): f"model.text_encoder.final_layernorm.{p}" for p in ("weight", "bias")},
        ("text", "proj"): "model.text_encoder.head.weight",
        ("", "logit_scale"): "model.logit_scale",
    },
)

_OC_PARTS = {"ln1": "ln_1", "o": "attn.out_proj", "ln2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
_OC_QKV = {f"{r}.{p}": (f"attn.in_proj_{p}", ("rows", k, 3)) for k, r in enumerate("qkv") for p in ("weight", "bias")}
OPENCLIP_LAYERS = {
    tower: {**{role: (name, None) for role, name in _params(prefix, _OC_PARTS).items()},
            **{role: (prefix + name, view) for role, (name, view) in _OC_QKV.items()}}
    for tower, prefix in (("vision", "visual.transformer.resblocks.{i}."), ("text", "transformer.resblocks.{i}."))
}
OPENCLIP_TOWER = {
    ("vision", "class"): ("visual.class_embedding", None),
    ("vision", "patch"): ("visual.conv1.weight", None),
    ("vision", "pos"): ("visual.positional_embedding", None),
    **{("vision", f"ln_pre.{p}"): (f"visual.ln_pre.{p}", None) for p in ("weight", "bias")},
    **{("vision", f"ln_post.{p}"): (f"visual.ln_post.{p}", None) for p in ("weight", "bias")},
    ("vision", "proj"): ("visual.proj", "T"),
    ("text", "token"): ("token_embedding.weight", None),
    ("text", "pos"): ("positional_embedding", None),
    **{("text", f"ln_post.{p}"): (f"ln_final.{p}", None) for p in ("weight", "bias")},
    ("text", "proj"): ("text_projection", "T"),
    ("", "logit_scale"): ("logit_scale", None),
}
OPENCLIP = (OPENCLIP_LAYERS, OPENCLIP_TOWER)
# Entries of OpenCLIP state dicts that are not weights: OpenAI's JIT exports carry the first three,
# older OpenCLIP saved its causal mask.
OPENCLIP_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def name_of(style: ClipStyle, tower: str, role: str, layer: int | None = None) -> str:
    """The name ``role`` of ``tower`` has in ``style`` (``layer`` for layer roles)."""
    if layer is not None:
        return style.layers[tower][role].format(i=layer)
    return style.tower[(tower, role)]


@dataclass(frozen=True)
class Tower:
    """One tower's transformer: width, layers, heads, MLP width, activation (HF name) and LayerNorm epsilon."""

    width: int
    layers: int
    heads: int
    mlp: int
    act: str = "quick_gelu"
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class ClipDims:
    """The numbers that decide a CLIP's tensor shapes and how it is run.

    ``embed`` is the projection (joint embedding) width; ``image`` and ``patch`` the input size and
    patch size in pixels; ``context`` the text length; ``mean``/``std`` the image normalization.
    """

    vision: Tower
    text: Tower
    embed: int
    patch: int
    image: int
    vocab: int
    context: int
    channels: int = 3
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    @property
    def positions(self) -> int:
        """Vision positions: one per patch, plus the class token."""
        return (self.image // self.patch) ** 2 + 1

    def tower(self, name: str) -> Tower:
        return self.vision if name == "vision" else self.text

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["vision"], out["text"] = dict(self.vision.__dict__), dict(self.text.__dict__)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @staticmethod
    def from_dict(data: dict, label: str) -> "ClipDims":
        """The inverse of :meth:`as_dict` (a shardwise manifest's ``parallel.dims``); FormatError when malformed."""
        try:
            fields = {k: v for k, v in data.items() if k not in ("vision", "text")}
            fields["mean"], fields["std"] = tuple(fields["mean"]), tuple(fields["std"])
            return check_dims(ClipDims(Tower(**data["vision"]), Tower(**data["text"]), **fields), label)
        except (KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{label}: the manifest's CLIP dimensions are malformed ({e})") from None


def check_dims(dims: ClipDims, label: str) -> ClipDims:
    """``dims`` when every number is usable; FormatError naming the first that is not."""
    for where, tower in (("vision", dims.vision), ("text", dims.text)):
        for key in ("width", "layers", "heads", "mlp"):
            _positive(getattr(tower, key), f"{where} {key}", label)
        if tower.width % tower.heads:
            raise FormatError(f"{label}: the {where} width {tower.width} is not a multiple of its {tower.heads} heads")
        if tower.act not in ACTIVATIONS:
            raise FormatError(f"{label}: the {where} activation is {tower.act!r}; shardwise's CLIP runs {' and '.join(ACTIVATIONS)}")
    for key in ("embed", "patch", "image", "vocab", "context", "channels"):
        _positive(getattr(dims, key), key, label)
    if len(dims.mean) != dims.channels or len(dims.std) != dims.channels or not all(s > 0 for s in dims.std):
        raise FormatError(f"{label}: image mean {list(dims.mean)} and std {list(dims.std)} must give one value per channel, std positive")
    return dims


def _positive(value, what: str, label: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FormatError(f"{label}: the CLIP {what} is {value!r}; a positive integer is needed")


def canonical_infos(dims: ClipDims, dtype: str) -> dict[str, TensorInfo]:
    """The HF tensors of a CLIP of ``dims``, in ``CLIPModel.state_dict()`` order, all of ``dtype``."""
    def layer_shapes(t: Tower) -> dict[str, tuple[int, ...]]:
        shapes = {f"{r}.weight": (t.width, t.width) for r in "qkvo"}
        shapes.update({f"{r}.bias": (t.width,) for r in ("q", "k", "v", "o", "ln1", "ln2", "fc2")})
        shapes.update({"ln1.weight": (t.width,), "ln2.weight": (t.width,), "fc1.weight": (t.mlp, t.width), "fc1.bias": (t.mlp,), "fc2.weight": (t.width, t.mlp)})
        return shapes

    v, t = dims.vision, dims.text
    tower_shapes = {
        ("text", "token"): (dims.vocab, t.width), ("text", "pos"): (dims.context, t.width),
        ("text", "ln_post.weight"): (t.width,), ("text", "ln_post.bias"): (t.width,),
        ("vision", "class"): (v.width,), ("vision", "patch"): (v.width, dims.channels, dims.patch, dims.patch),
        ("vision", "pos"): (dims.positions, v.width), ("vision", "ln_pre.weight"): (v.width,), ("vision", "ln_pre.bias"): (v.width,),
        ("vision", "ln_post.weight"): (v.width,), ("vision", "ln_post.bias"): (v.width,),
        ("vision", "proj"): (dims.embed, v.width), ("text", "proj"): (dims.embed, t.width), ("", "logit_scale"): (),
    }
    out: dict[str, TensorInfo] = {}

    def add(name: str, shape: tuple[int, ...]) -> None:
        out[name] = TensorInfo(name, shape, dtype)

    add(HF.tower[("", "logit_scale")], ())
    for tower in ("text", "vision"):
        heads = [r for r in TOWER_ROLES[tower] if r not in ("ln_post.weight", "ln_post.bias", "proj")]
        for role in heads:
            add(name_of(HF, tower, role), tower_shapes[(tower, role)])
        shapes = layer_shapes(dims.tower(tower))
        for layer in range(dims.tower(tower).layers):
            for role in _HF_LAYER_ORDER:
                add(name_of(HF, tower, role, layer), shapes[role])
        for role in ("ln_post.weight", "ln_post.bias"):
            add(name_of(HF, tower, role), tower_shapes[(tower, role)])
    for tower in ("vision", "text"):
        add(name_of(HF, tower, "proj"), tower_shapes[(tower, "proj")])
    return out

