"""NeMo archives and folders whose weights are a ``model_weights/`` torch_dist checkpoint, converted to HF.

The checkpoints are written by ``torch.distributed.checkpoint.save`` from a tiny random Llama the
way Megatron-core saves them (``torch_dist_ranks.py``: stacked layers, one chunk per layer and
tensor-parallel piece, byte objects for TransformerEngine's extra state), under 2 gloo ranks and
in one process, then read back in place by shardwise.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import shardwise
from conftest import tiny_llama
from shardwise.errors import FormatError
from shardwise.formats.torch_dist import TorchDistSource, unstacked_name
from shardwise.tensors import FileTensorSource

WRITER = Path(__file__).with_name("torch_dist_ranks.py")
CASES = {
    # GQA (8 query heads, 2 KV heads), untied, saved by 2 ranks as Megatron does; vocabulary 100 padded to 256
    "gqa": dict(model=dict(hidden=64, heads=8, kv_heads=2, intermediate=96, layers=3, vocab=100, tied=False), world=2, chunks="layer", multiple=128),
    # MHA, tied, saved by one process with each stack in one chunk; vocabulary 128, no padding
    "mha": dict(model=dict(hidden=64, heads=4, kv_heads=4, intermediate=96, layers=2, vocab=128, tied=True, seed=1), world=1, chunks="whole", multiple=128),
}


def write_torch_dist(hf: Path, out: Path, world: int, chunks: str, multiple: int, flavour: str = "nemo1") -> None:
    """Run the writer: ``nemo1`` (model_config.yaml + model_weights/) or ``nemo2`` (context/ + weights/) at ``world`` gloo ranks."""
    command = [sys.executable, str(WRITER), str(hf), str(out), str(world), chunks, str(multiple), flavour]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def pack(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:") as tar:
        tar.add(folder, arcname=".")
    return archive


def build_case(name: str, root: Path, flavour: str = "nemo1") -> dict:
    """CASES[name] as the original HF folder (``hf``) and the checkpoint written from it (``dir``) by the writer in ``flavour``."""
    spec = CASES[name]
    hf = tiny_llama(root / "hf", **spec["model"])
    write_torch_dist(hf, root / flavour, spec["world"], spec["chunks"], spec["multiple"], flavour)
    return {"name": name, "hf": hf, "dir": root / flavour, "padded": name == "gqa", **spec}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> dict:
    """The original HF folder, the nemo-dir holding it as torch_dist, and the same packed as a .nemo tar."""
    root = tmp_path_factory.mktemp(f"torch_dist_{request.param}")
    built = build_case(request.param, root)
    return {**built, "archive": pack(built["dir"], root / "model.nemo")}


def logits(folder: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.arange(12).reshape(2, 6) * 7 % 100
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("container", ["archive", "dir"])
def test_a_torch_dist_nemo_converts_to_the_original_hf_model(case, container, tmp_path, cli):
    out = tmp_path / "hf"
    given = ["--config", case["hf"] / "config.json"] if case["padded"] else []  # NeMo's config does not record the real vocabulary
    result = cli("convert", case[container], out, "--to", "hf", *given)
    assert result.code == 0, result.err
    assert cli("diff", out, case["hf"]).code == 0
    assert not (case["dir"] / "pwned").exists()  # common.pt holds a pickle that runs code: it was never loaded
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is case["model"]["tied"] and written["num_key_value_heads"] == case["model"]["kv_heads"]
    if container == "archive":
        assert torch.equal(logits(out), logits(case["hf"]))


def test_the_config_json_is_built_from_model_config_yaml_when_no_hf_config_is_given(case, tmp_path, cli):
    out = tmp_path / "hf"
    result = cli("convert", case["archive"], out, "--to", "hf")
    assert result.code == 0, result.err
    assert "config.json was built from its model_config.yaml" in result.err
    expected, built = logits(case["hf"]), logits(out)
    vocab = case["model"]["vocab"]
    rows = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].shape[0]
    if case["padded"]:  # the padded rows are kept and said so; the real vocabulary's logits are the original ones
        assert rows == 256 and "padding included" in result.err
        assert torch.equal(built[..., :vocab], expected)
    else:
        assert rows == vocab and cli("diff", out, case["hf"]).code == 0
        assert torch.equal(built, expected)


def test_a_bare_model_weights_folder_takes_its_config_from_beside_it_or_from_config(case, tmp_path, cli):
    beside = tmp_path / "beside"
    assert cli("convert", case["dir"] / "model_weights", beside, "--to", "hf", "--config", case["hf"] / "config.json").code == 0
    assert cli("diff", beside, case["hf"]).code == 0
    bare = tmp_path / "weights"
    shutil.copytree(case["dir"] / "model_weights", bare)
    refused = cli("convert", bare, tmp_path / "none", "--to", "hf")
    assert refused.code == 2 and "pass --config" in refused.err and "model_config.yaml" in refused.err
    assert len(refused.err.strip().splitlines()) == 1 and not (tmp_path / "none").exists()
    from_yaml = cli("convert", bare, tmp_path / "yaml", "--to", "hf", "--config", case["dir"] / "model_config.yaml")
    assert from_yaml.code == 0, from_yaml.err
    assert cli("diff", tmp_path / "yaml", tmp_path / "beside").code == (1 if case["padded"] else 0)


def test_a_bare_folder_into_a_tensor_file_keeps_its_own_tensors_unstacked(case, tmp_path, cli):
    out = tmp_path / "raw.safetensors"
    assert cli("convert", case["dir"] / "model_weights", out).code == 0
    raw = load_file(str(out))
    original = load_file(str(case["hf"] / "model.safetensors"))
    layers = case["model"]["layers"]
    assert not [k for k in raw if unstacked_name(k)] and not [k for k in raw if "_extra_state" in k]
    assert sum(".linear_qkv.weight" in k for k in raw) == layers
    assert torch.equal(raw["model.decoder.layers.1.mlp.linear_fc2.weight"], original["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(raw["model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"], original["model.layers.0.input_layernorm.weight"])


def test_inspect_shows_the_unstacked_layers_the_backend_and_what_was_skipped(case, cli):
    result = cli("inspect", case["archive"], "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    layout = summary["layout"]
    assert summary["format"] == "archive" and summary["weights_format"] == "torch_dist" and layout["kind"] == "torch_dist"
    assert layout["backend"]["sharded_backend"] == "torch_dist" and layout["stacked_layers"] == {"model.decoder.": case["model"]["layers"]}
    assert layout["skipped_extra_state"] == 3 * case["world"] and layout["files"] == case["world"]
    names = [t["name"] for t in summary["tensors"]]
    assert "model.decoder.layers.0.mlp.linear_fc1.weight" in names and "model.decoder.layers.mlp.linear_fc1.weight" not in names
    parallel = summary["parallel"]
    assert parallel["style"] == "mcore" and parallel["norms"] == "fused" and parallel["dims"]["kv_heads"] == case["model"]["kv_heads"]
    folder = json.loads(cli("inspect", case["dir"], "--json").out)
    assert folder["layout"]["kind"] == "torch_dist" and [t["name"] for t in folder["tensors"]] == names


def test_each_layer_is_read_from_its_own_bytes_only(case, tmp_path, cli, monkeypatch):
    """A stack of layers saved in one chunk is never read whole: every source byte is read once."""
    read = []
    original = FileTensorSource.mapped_bytes

    def counting(self, entry, start=0, length=None):
        view = original(self, entry, start, length)
        read.append(len(view))
        return view

    monkeypatch.setattr(FileTensorSource, "mapped_bytes", counting)
    out = tmp_path / "hf"
    assert cli("convert", case["archive"], out, "--to", "hf", "--config", case["hf"] / "config.json").code == 0
    written = sum(t.numel() * t.element_size() for t in load_file(str(out / "model.safetensors")).values())
    assert sum(read) == written  # each output byte read once from the archive, padding and other layers never
    with TorchDistSource(case["dir"] / "model_weights") as source:
        name = "model.decoder.layers.{}.self_attention.linear_qkv.weight"
        layer_bytes = source.info(name.format(0)).nbytes
        if case["chunks"] == "whole":  # one chunk of all layers: layer i is its i-th slice, in place
            offsets = [source.stored(name.format(i)).offset for i in range(case["model"]["layers"])]
            assert [b - a for a, b in zip(offsets, offsets[1:])] == [layer_bytes] * (len(offsets) - 1)


def test_other_layouts_and_the_canonical_diff_fall_out(case, tmp_path, cli):
    config = ["--config", case["hf"] / "config.json"]
    assert cli("diff", case["archive"], case["hf"], *config).code == 0
    assert cli("convert", case["archive"], tmp_path / "nx", "--to", "nxdt", "--tp", "2", *config).code == 0
    assert cli("diff", tmp_path / "nx", case["hf"]).code == 0
    assert cli("convert", case["dir"], tmp_path / "out.nemo", "--to", "archive", "--tp", "2", *config).code == 0
    assert cli("diff", tmp_path / "out.nemo", case["hf"]).code == 0
    with tarfile.open(tmp_path / "out.nemo") as tar:
        assert not [n for n in tar.getnames() if "model_weights/" in n or n.endswith(".distcp")]
    refused = cli("reshard", case["archive"], tmp_path / "re.nemo", "--tp", "2")
    assert refused.code == 2 and "distributed checkpoint of global tensors" in refused.err and not (tmp_path / "re.nemo").exists()


def test_restore_from_gives_the_state_dict_nemo_would_load(case):
    restored = shardwise.restore_from(case["archive"])
    original = load_file(str(case["hf"] / "model.safetensors"))
    state = restored.state_dict
    assert torch.equal(state["model.decoder.layers.1.self_attention.linear_proj.weight"], original["model.layers.1.self_attn.o_proj.weight"])
    assert all(unstacked_name(k) is None for k in state)


# -- bad input ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gqa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torch_dist_bad")
    hf = tiny_llama(root / "hf", **CASES["gqa"]["model"])
    write_torch_dist(hf, root / "nemo", 1, "layer", 128)
    return root / "nemo"


def _damaged(gqa: Path, tmp_path: Path, damage: str) -> tuple[Path, Path]:
    copy = tmp_path / "nemo"
    shutil.copytree(gqa, copy)
    weights = copy / "model_weights"
    if damage == "truncated":
        data = sorted(weights.glob("*.distcp"))[0]
        os.truncate(data, data.stat().st_size - 100)
        return copy, data
    if damage == "zarr":
        (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
        return copy, weights / "metadata.json"
    if damage == "no .metadata":
        (weights / ".metadata").unlink()
        return copy, weights / ".metadata"
    raise AssertionError(damage)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is truncated"),
    ("zarr", "sharded backend 'zarr'"),
    ("no .metadata", "missing"),
])
@pytest.mark.parametrize("container", ["archive", "dir"])
def test_damaged_torch_dist_checkpoints_give_one_line_naming_the_file(gqa, tmp_path, cli, damage, message, container):
    folder, bad = _damaged(gqa, tmp_path, damage)
    src = pack(folder, tmp_path / "bad.nemo") if container == "archive" else folder
    out = tmp_path / "out"
    result = cli("convert", src, out, "--to", "hf")
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not out.exists()
    weights = f"{src}:model_weights/" if container == "archive" else f"{folder / 'model_weights'}/"
    assert weights in result.err and bad.name in result.err


def test_stacked_keys_that_disagree_on_the_layer_count_are_refused(gqa, tmp_path):
    copy = tmp_path / "weights"
    shutil.copytree(gqa / "model_weights", copy)
    with open(copy / ".metadata", "rb") as f:  # edited through torch's own classes (a test may import them; shardwise never does)
        metadata = pickle.load(f)
    entry = metadata.state_dict_metadata["model.decoder.layers.mlp.linear_fc2.weight"]
    entry.chunks = [c for c in entry.chunks if c.offsets[0] < 2]
    entry.size = torch.Size([2, *entry.size[1:]])
    with open(copy / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(FormatError, match="disagree on the layer count: .* has 3 layers, 'model.decoder.layers.mlp.linear_fc2.weight' has 2"):
        TorchDistSource(copy)


def test_only_a_layers_component_followed_by_a_name_is_stacked():
    assert unstacked_name("model.decoder.layers.self_attention.linear_qkv.weight") == ("model.decoder.", "self_attention.linear_qkv.weight")
    assert unstacked_name("vision.decoder.layers.mlp.linear_fc1.weight") == ("vision.decoder.", "mlp.linear_fc1.weight")
    assert unstacked_name("model.decoder.layers.3.mlp.linear_fc1.weight") is None
    assert unstacked_name("model.decoder.final_layernorm.weight") is None
    assert unstacked_name("layers") is None
