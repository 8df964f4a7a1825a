"""CLIP: HF and OpenCLIP checkpoints into Megatron-core CLIP archives at any TP and back, reshard, clip-infer."""

from __future__ import annotations

import json
import math
import shutil
import tarfile

import pytest
import torch
import yaml

from clip_builders import TEXTS, MEAN, STD, make_image, openclip_folder, openclip_state_dict, reference_probs, tiny_clip, tiny_tokenizer
from conftest import listing, tiny_llama
from shardwise.archive.reader import Archive
from shardwise.verify.clip_infer import clip_infer
from shardwise.verify.clip_inputs import encode_texts
from shardwise.verify.tensor_diff import diff


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "hf")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("image") / "image.png")


@pytest.fixture(scope="module")
def reference(hf, image):
    probs = reference_probs(hf, image, TEXTS)
    assert max(probs) - min(probs) > 0.1  # a near-uniform answer would make the comparisons below weak
    return probs


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_clip_infer_on_the_archive_gives_transformers_probabilities(hf, image, reference, tmp_path, cli, tp):
    result = cli("convert", hf, tmp_path / "clip.nemo", "--tp", str(tp), "--quiet")
    assert result.code == 0, result
    scores = clip_infer(tmp_path / "clip.nemo", image, TEXTS)
    assert scores.tp == tp and scores.scale == pytest.approx(30.0, rel=1e-5)
    assert _max_diff(scores.probabilities, reference) <= 1e-5
    shown = cli("clip-infer", tmp_path / "clip.nemo", "--image", image, "--texts", *TEXTS)
    assert shown.code == 0, shown
    lines = shown.out.splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [t for t, _ in sorted(zip(TEXTS, reference), key=lambda tp: -tp[1])]
    assert [float(line.split()[0]) for line in lines] == pytest.approx(sorted(reference, reverse=True), abs=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_hf_to_archive_to_hf_is_bit_exact_and_loads_in_transformers(hf, tmp_path, cli, tp):
    import transformers

    assert cli("convert", hf, tmp_path / "clip.nemo", "--to", "archive", "--tp", str(tp)).code == 0
    assert cli("convert", tmp_path / "clip.nemo", tmp_path / "back", "--to", "hf").code == 0
    report = diff(hf, tmp_path / "back")
    assert report.equal and report.compared == len(report.missing) + report.compared, (report.missing, report.extra, report.mismatches[:2])
    assert diff(hf, tmp_path / "clip.nemo").equal  # diff merges the archive's ranks itself
    _, info = transformers.CLIPModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (hf / name).read_bytes()


def test_archive_is_nemo_megatron_core_clip_with_q_k_v_fused_per_head(hf, tmp_path, cli):
    from safetensors.torch import load_file

    assert cli("convert", hf, tmp_path / "clip.nemo", "--tp", "2").code == 0
    with tarfile.open(tmp_path / "clip.nemo") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "x", filter="data")
    assert {"./mp_rank_00/model_weights.ckpt", "./mp_rank_01/model_weights.ckpt", "./model_config.yaml", "./shardwise.json"} <= set(names)
    ranks = [torch.load(tmp_path / "x" / f"mp_rank_0{r}" / "model_weights.ckpt", weights_only=True) for r in range(2)]
    full = load_file(hf / "model.safetensors")
    for tower, heads, width in (("vision", 4, 48), ("text", 4, 32)):
        h, m = f"{tower}_model.encoder.layers.1.", f"model.{tower}_encoder.decoder.layers.1."
        d = width // heads
        q, k, v = (full[h + f"self_attn.{x}_proj.weight"].reshape(heads, d, width) for x in "qkv")
        per_head = torch.stack([q, k, v], dim=1).reshape(heads, 3 * d, width)  # head h: [q_h; k_h; v_h]
        for r in range(2):
            assert torch.equal(ranks[r][m + "self_attention.linear_qkv.weight"], per_head[2 * r:2 * r + 2].reshape(-1, width))
            assert torch.equal(ranks[r][m + "self_attention.linear_proj.weight"], full[h + "self_attn.out_proj.weight"][:, r * width // 2:(r + 1) * width // 2])
            assert torch.equal(ranks[r][m + "self_attention.linear_proj.bias"], full[h + "self_attn.out_proj.bias"])
            assert torch.equal(ranks[r][m + "self_attention.linear_qkv.layer_norm_weight"], full[h + "layer_norm1.weight"])
            mlp = full[h + "mlp.fc1.weight"].shape[0] // 2
            assert torch.equal(ranks[r][m + "mlp.linear_fc1.weight"], full[h + "mlp.fc1.weight"][r * mlp:(r + 1) * mlp])
            assert torch.equal(ranks[r][m + "mlp.linear_fc2.weight"], full[h + "mlp.fc2.weight"][:, r * mlp:(r + 1) * mlp])
    qb = [full[f"text_model.encoder.layers.0.self_attn.{x}_proj.bias"].reshape(4, 8) for x in "qkv"]
    assert torch.equal(ranks[1]["model.text_encoder.decoder.layers.0.self_attention.linear_qkv.bias"], torch.stack(qb, 1)[2:].reshape(-1))
    vocab = full["text_model.embeddings.token_embedding.weight"]
    embedding = torch.cat([r["model.text_encoder.embedding.word_embeddings.weight"] for r in ranks])
    assert embedding.shape[0] % 2 == 0 and embedding.shape[0] > vocab.shape[0]  # 518 tokens padded to a multiple of 2 x TP
    assert torch.equal(embedding[:vocab.shape[0]], vocab) and not embedding[vocab.shape[0]:].any()
    assert ranks[0]["model.vision_encoder.class_token"].shape == (1, 1, 48)
    assert torch.equal(ranks[1]["model.vision_encoder.class_token"].flatten(), full["vision_model.embeddings.class_embedding"])
    assert torch.equal(ranks[0]["model.text_encoder.head.weight"], full["text_projection.weight"])
    assert torch.equal(ranks[1]["model.logit_scale"], full["logit_scale"])
    config = yaml.safe_load((tmp_path / "x" / "model_config.yaml").read_text())
    assert config["mcore_gpt"] is True and config["tensor_model_parallel_size"] == 2 and config["output_dim"] == 24
    assert (config["vision"]["hidden_size"], config["vision"]["patch_dim"], config["vision"]["img_h"], config["vision"]["num_attention_heads"]) == (48, 8, 32, 4)
    assert (config["vision"]["image_mean"], config["vision"]["image_std"]) == (MEAN, STD)
    assert (config["text"]["hidden_size"], config["text"]["num_layers"], config["text"]["max_position_embeddings"]) == (32, 2, 16)
    assert config["text"]["activation"] == "approx-gelu" and config["make_vocab_size_divisible_by"] * 2 * (embedding.shape[0] // (config["make_vocab_size_divisible_by"] * 2)) == embedding.shape[0]
    assert config["tokenizer"]["library"] == "huggingface"
    tokenizer = tmp_path / "x" / config["tokenizer"]["type"].removeprefix("nemo:")
    assert (tokenizer / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def test_reshard_changes_tensor_parallelism_and_keeps_the_model(hf, image, tmp_path, cli):
    assert cli("convert", hf, tmp_path / "tp1.nemo").code == 0
    assert cli("reshard", tmp_path / "tp1.nemo", tmp_path / "tp4.nemo", "--tp", "4").code == 0
    assert cli("convert", tmp_path / "tp4.nemo", tmp_path / "tp2", "--to", "nemo-dir", "--tp", "2").code == 0
    with Archive(tmp_path / "tp4.nemo") as archive:
        assert (archive.layout.tp, archive.model_config["tensor_model_parallel_size"]) == (4, 4)
    assert sorted(p.name for p in (tmp_path / "tp2").iterdir() if p.name.startswith("mp_rank")) == ["mp_rank_00", "mp_rank_01"]
    for out in ("tp4.nemo", "tp2"):
        assert diff(hf, tmp_path / out).equal
    probs = [clip_infer(tmp_path / out, image, TEXTS).probabilities for out in ("tp1.nemo", "tp4.nemo", "tp2")]
    assert _max_diff(probs[0], probs[1]) <= 1e-6 and _max_diff(probs[0], probs[2]) <= 1e-6


def test_openclip_folder_converts_and_infers_as_the_hf_folder_with_the_same_weights(hf, image, reference, tmp_path, cli):
    folder = openclip_folder(tmp_path / "openclip", hf)
    assert cli("convert", folder, tmp_path / "oc.nemo", "--tp", "2").code == 0
    assert cli("convert", hf, tmp_path / "hf.nemo", "--tp", "2").code == 0
    assert diff(tmp_path / "hf.nemo", tmp_path / "oc.nemo").equal
    assert diff(hf, folder).equal  # the OpenCLIP folder itself reads as HF tensors (transposes and Q/K/V rows as views)
    assert clip_infer(tmp_path / "oc.nemo", image, TEXTS).probabilities == clip_infer(tmp_path / "hf.nemo", image, TEXTS).probabilities
    assert cli("convert", folder, tmp_path / "back", "--to", "hf").code == 0
    assert diff(hf, tmp_path / "back").equal
    shutil.copy(hf / "preprocessor_config.json", tmp_path / "back")
    assert _max_diff(reference_probs(tmp_path / "back", image, TEXTS), reference) <= 1e-6


def _vit_s_32_openclip(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights shaped as OpenCLIP's ViT-S-32 (embed 384; vision 12 x 384, patch 32 at 224; text 12 x 384, 77 x 49408), bf16."""
    g = torch.Generator().manual_seed(seed)
    w, layers = 384, 12

    def t(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    hf = {"logit_scale": t(), "vision_model.embeddings.class_embedding": t(w), "vision_model.embeddings.patch_embedding.weight": t(w, 3, 32, 32),
          "vision_model.embeddings.position_embedding.weight": t(50, w), "visual_projection.weight": t(384, w), "text_projection.weight": t(384, w),
          "text_model.embeddings.token_embedding.weight": t(49408, w), "text_model.embeddings.position_embedding.weight": t(77, w)}
    for p in ("weight", "bias"):
        for name in ("vision_model.pre_layrnorm", "vision_model.post_layernorm", "text_model.final_layer_norm"):
            hf[f"{name}.{p}"] = t(w)
    for tower in ("vision_model", "text_model"):
        for i in range(layers):
            h = f"{tower}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                for x in "qkv":
                    hf[h + f"self_attn.{x}_proj.{p}"] = t(w, w) if p == "weight" else t(w)
                hf[h + f"self_attn.out_proj.{p}"] = t(w, w) if p == "weight" else t(w)
                hf[h + f"layer_norm1.{p}"], hf[h + f"layer_norm2.{p}"] = t(w), t(w)
                hf[h + f"mlp.fc1.{p}"] = t(4 * w, w) if p == "weight" else t(4 * w)
                hf[h + f"mlp.fc2.{p}"] = t(w, 4 * w) if p == "weight" else t(w)
    return openclip_state_dict(hf, layers, layers, contiguous=False)


def test_bare_openclip_state_dict_converts_with_arch_for_a_standard_vit(tmp_path, cli):
    import transformers

    state = _vit_s_32_openclip()
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    wrong = cli("convert", tmp_path / "open_clip_pytorch_model.bin", tmp_path / "wrong.nemo", "--arch", "ViT-B-32")
    assert wrong.code == 2 and "has shape" in wrong.err and "--arch ViT-B-32" in wrong.err and len(wrong.err.strip().splitlines()) == 1
    assert not (tmp_path / "wrong.nemo").exists()
    assert cli("convert", tmp_path / "open_clip_pytorch_model.bin", tmp_path / "s32.nemo", "--arch", "ViT-S-32", "--tp", "2").code == 0
    with Archive(tmp_path / "s32.nemo") as archive:
        config = archive.model_config
    assert (config["vision"]["hidden_size"], config["vision"]["patch_dim"], config["vision"]["img_h"], config["vision"]["num_attention_heads"]) == (384, 32, 224, 6)
    assert (config["text"]["num_attention_heads"], config["text"]["max_position_embeddings"], config["vision"]["activation"]) == (6, 77, "gelu")
    assert config["precision"] == "bf16" and "tokenizer" not in config  # a bare state dict has no tokenizer files
    assert cli("convert", tmp_path / "s32.nemo", tmp_path / "hf", "--to", "hf").code == 0
    model, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True, dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    back = openclip_state_dict({k: v.detach() for k, v in model.state_dict().items()}, 12, 12)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_archives_without_a_manifest_are_read_from_their_model_config_yaml(hf, image, reference, tmp_path, cli):
    """What NeMo writes: no shardwise.json and no HF config.json; dimensions come from model_config.yaml."""
    assert cli("convert", hf, tmp_path / "dir", "--to", "nemo-dir").code == 0
    (tmp_path / "dir" / "shardwise.json").unlink()
    config = yaml.safe_load((tmp_path / "dir" / "model_config.yaml").read_text())
    shutil.rmtree(tmp_path / "dir" / config.pop("hf_extra_files").removeprefix("nemo:"))
    (tmp_path / "dir" / config.pop("hf_config_file").removeprefix("nemo:")).unlink()
    (tmp_path / "dir" / "model_config.yaml").write_text(yaml.safe_dump(config))
    assert _max_diff(clip_infer(tmp_path / "dir", image, TEXTS).probabilities, reference) <= 1e-5
    result = cli("convert", tmp_path / "dir", tmp_path / "back", "--to", "hf")
    assert result.code == 0 and "padded rows" in result.err
    assert diff(hf, tmp_path / "back").equal
    assert json.loads((tmp_path / "back" / "config.json").read_text())["text_config"]["eos_token_id"] == len(tiny_tokenizer()) - 1
    shutil.copy(hf / "preprocessor_config.json", tmp_path / "back")
    assert _max_diff(reference_probs(tmp_path / "back", image, TEXTS), reference) <= 1e-5


def test_texts_are_truncated_to_the_context_with_end_of_text_last_and_padded():
    tok = tiny_tokenizer()
    ids, ends = encode_texts(tok, ["a dog", "a very long sentence that does not fit in sixteen tokens"], 16, len(tok))
    assert ids.shape == (2, 16) and ends[1] == 15 and ids[1, 15] == tok.eos_token_id and ids[1, 0] == tok.bos_token_id
    short = [tok.bos_token_id, *tok("a dog", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert ids[0, :len(short)].tolist() == short and ends[0] == len(short) - 1
    assert (ids[0, len(short):] == tok.pad_token_id).all()


def test_fixed_scale_multiplies_the_cosines_by_100(hf, image, tmp_path, cli):
    assert cli("convert", hf, tmp_path / "clip.nemo").code == 0
    own = cli("clip-infer", tmp_path / "clip.nemo", "--image", image, "--texts", *TEXTS, "--json")
    fixed = cli("clip-infer", tmp_path / "clip.nemo", "--image", image, "--texts", TEXTS[0], "--texts", *TEXTS[1:], "--json", "--fixed-scale")
    own, fixed = json.loads(own.out), json.loads(fixed.out)
    assert (fixed["scale"], fixed["fixed_scale"], own["fixed_scale"]) == (100.0, True, False)
    # softmax(100 c) from softmax(s c): the log-probabilities are s c minus a constant
    logp = torch.tensor([math.log(r["probability"]) for r in own["results"]], dtype=torch.float64)
    expected = (logp * 100.0 / own["scale"]).softmax(0)
    by_text = {r["text"]: r["probability"] for r in fixed["results"]}
    assert [by_text[r["text"]] for r in own["results"]] == pytest.approx(expected.tolist(), abs=1e-5)


# -- bad input: one line on stderr, exit 2, nothing written -----------------------------------------
def _one_line_error(result, *words: str) -> None:
    assert result.code == 2, result
    assert len(result.err.strip().splitlines()) == 1 and result.err.startswith("shardwise: error:"), result.err
    for word in words:
        assert word in result.err, result.err


@pytest.fixture(scope="module")
def archive(hf, tmp_path_factory):
    from shardwise.reshard.clip_convert import convert_clip

    path = tmp_path_factory.mktemp("archive") / "clip.nemo"
    convert_clip(hf, path, to="archive", tp=2)
    return path


def test_clip_infer_refuses_a_file_that_is_not_an_image(archive, tmp_path, cli):
    (tmp_path / "notes.png").write_text("not a picture")
    _one_line_error(cli("clip-infer", archive, "--image", tmp_path / "notes.png", "--texts", "a dog"), "notes.png", "not an image")
    _one_line_error(cli("clip-infer", archive, "--image", tmp_path / "missing.png", "--texts", "a dog"), "missing.png")


def test_clip_infer_refuses_an_archive_that_is_not_clip(tmp_path, image, cli):
    llama = tiny_llama(tmp_path / "llama")
    assert cli("convert", llama, tmp_path / "llama.nemo").code == 0
    _one_line_error(cli("clip-infer", tmp_path / "llama.nemo", "--image", image, "--texts", "a dog"), "not a CLIP archive")
    _one_line_error(cli("clip-infer", llama, "--image", image, "--texts", "a dog"), "not a CLIP archive")


def test_clip_infer_needs_texts(archive, image, cli):
    _one_line_error(cli("clip-infer", archive, "--image", image), "at least one text")


def test_an_archive_without_tokenizer_names_the_fix_and_takes_one_given(tmp_path, image, archive, hf, cli):
    bare = tiny_clip(tmp_path / "bare", tokenizer=False)  # same seed: the same weights as ``hf``, no tokenizer files
    assert cli("convert", bare, tmp_path / "bare.nemo", "--tp", "2").code == 0
    _one_line_error(cli("clip-infer", tmp_path / "bare.nemo", "--image", image, "--texts", "a dog"), "carries no tokenizer", "--tokenizer")
    given = clip_infer(tmp_path / "bare.nemo", image, TEXTS, tokenizer=hf)
    assert given.probabilities == clip_infer(archive, image, TEXTS).probabilities


def test_layouts_a_clip_cannot_take_are_refused_before_anything_is_written(hf, tmp_path, cli):
    before = listing(tmp_path)
    _one_line_error(cli("convert", hf, tmp_path / "x.nemo", "--tp", "3"), "3", "heads")
    _one_line_error(cli("convert", hf, tmp_path / "x.nemo", "--tp", "2", "--pp", "2"), "--pp")
    _one_line_error(cli("convert", hf, tmp_path / "x.nemo", "--qkv-linear"), "--qkv-linear")
    _one_line_error(cli("convert", hf, tmp_path / "x.nemo", "--arch", "ViT-Q-99"), "ViT-Q-99", "ViT-B-32")
    _one_line_error(cli("reshard", hf, tmp_path / "x.nemo", "--tp", "2"), "reshard works on CLIP archives")
    assert listing(tmp_path) == before


def test_openclip_configs_that_change_the_forward_are_refused(hf, tmp_path, cli):
    folder = openclip_folder(tmp_path / "openclip", hf)
    document = json.loads((folder / "open_clip_config.json").read_text())
    for section, key, value in (("vision_cfg", "ls_init_value", 1e-5), ("vision_cfg", "attentional_pool", True), ("text_cfg", "hf_model_name", "roberta-base")):
        changed = json.loads(json.dumps(document))
        changed["model_cfg"][section][key] = value
        (folder / "open_clip_config.json").write_text(json.dumps(changed))
        _one_line_error(cli("convert", folder, tmp_path / "x.nemo"), f"{section}.{key}")
    assert not (tmp_path / "x.nemo").exists()


def test_malformed_configs_are_one_line_errors_naming_the_file(hf, tmp_path, cli):
    folder = openclip_folder(tmp_path / "openclip", hf)
    document = json.loads((folder / "open_clip_config.json").read_text())
    for section, value in (("vision_cfg", "x"), ("vision_cfg", {**document["model_cfg"]["vision_cfg"], "head_width": 0})):
        changed = json.loads(json.dumps(document))
        changed["model_cfg"][section] = value
        (folder / "open_clip_config.json").write_text(json.dumps(changed))
        _one_line_error(cli("convert", folder, tmp_path / "x.nemo"), "open_clip_config.json")
    broken = tmp_path / "hf-broken"
    shutil.copytree(hf, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "text_config": [1]}))
    _one_line_error(cli("convert", broken, tmp_path / "x.nemo"), "text_config")
    assert not (tmp_path / "x.nemo").exists()


def test_the_archive_precision_is_the_dtype_of_most_weights(hf, tmp_path, cli):
    """Half-precision exports keep logit_scale (the first tensor) in fp32; the archive is still 16-bit."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(hf).to(torch.bfloat16)
    model.logit_scale.data = model.logit_scale.data.float()
    model.save_pretrained(tmp_path / "mixed")
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (hf / name).exists():
            shutil.copy(hf / name, tmp_path / "mixed" / name)
    assert cli("convert", tmp_path / "mixed", tmp_path / "mixed.nemo", "--quiet").code == 0
    with tarfile.open(tmp_path / "mixed.nemo") as tar:
        config = yaml.safe_load(tar.extractfile("./model_config.yaml"))
    assert config["precision"] == "bf16"


def test_a_clip_archive_with_torch_dist_weights_converts_and_infers(hf, image, reference, tmp_path, cli):
    """NeMo's torch_dist form of the same archive: model_weights/ holds a DCP with each tower's layers stacked."""
    import re

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    assert cli("convert", hf, tmp_path / "tp1", "--to", "nemo-dir", "--quiet").code == 0
    state = torch.load(tmp_path / "tp1/model_weights.ckpt", weights_only=True)
    stacks: dict = {}
    flat = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*\.layers\.)(\d+)\.(.*)", key)
        if m:
            stacks.setdefault(m[1] + m[3], {})[int(m[2])] = value
        else:
            flat[key] = value
    flat.update({key: torch.stack([layers[i] for i in sorted(layers)]) for key, layers in stacks.items()})
    folder = tmp_path / "td"
    shutil.copytree(tmp_path / "tp1", folder, ignore=shutil.ignore_patterns("model_weights.ckpt", "shardwise.json"))
    dcp.save(flat, checkpoint_id=str(folder / "model_weights"), planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
    (folder / "model_weights/metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    assert cli("convert", folder, tmp_path / "back", "--to", "hf", "--quiet").code == 0
    assert diff(hf, tmp_path / "back").equal
    assert cli("convert", folder, tmp_path / "tp2.nemo", "--tp", "2", "--quiet").code == 0
    assert _max_diff(clip_infer(tmp_path / "tp2.nemo", image, TEXTS).probabilities, reference) <= 1e-5
