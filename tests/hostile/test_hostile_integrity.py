"""A flipped byte anywhere in a sharded checkpoint never passes as equal, and is never converted.

The contract these tests hold (issue 17): a sharded checkpoint whose stored bytes contradict
themselves is damaged input, whatever it is compared with. ``diff`` exits 2 with one line naming
the damaged file (not 1: a difference is between two sound checkpoints), never 0;
``convert``/``reshard`` exit 2 the same way and leave nothing behind. Damage is found by the
manifest's CRC-32s where the checkpoint has a manifest, and, manifest or not, by reading every
stored copy: each replica must equal the copy used, and vocabulary padding rows must be the zeros
shardwise writes (checked where a shardwise manifest says shardwise wrote them).
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from shardwise.checksum import crc32
from shardwise.reshard.containers import find_shards

VOCAB = 100  # the mcore style pads it to 104 rows at TP 2: rank 1 ends with 4 padding rows


def _hf_llama(folder: Path, *, hidden: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2, intermediate: int = 64) -> Path:
    """A random tiny Llama as an HF folder (config.json + model.safetensors), the shapes and names
    :func:`conftest.tiny_llama` saves, written without building the model (9 s less on this machine)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head_dim, kv = hidden // heads, kv_heads * (hidden // heads)
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (hidden,), layer + "post_attention_layernorm.weight": (hidden,),
            layer + "self_attn.q_proj.weight": (hidden, hidden), layer + "self_attn.k_proj.weight": (kv, hidden),
            layer + "self_attn.v_proj.weight": (kv, hidden), layer + "self_attn.o_proj.weight": (hidden, hidden),
            layer + "mlp.gate_proj.weight": (intermediate, hidden), layer + "mlp.up_proj.weight": (intermediate, hidden),
            layer + "mlp.down_proj.weight": (hidden, intermediate),
        })
    folder.mkdir()
    save_file({name: torch.randn(shape) for name, shape in shapes.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "vocab_size": VOCAB,
        "head_dim": head_dim, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An HF model and its TP-2 archive, nemo-dir, nxdt folder and xser nxdt folder, written once."""
    from shardwise.cli import run

    root = tmp_path_factory.mktemp("integrity")
    hf = _hf_llama(root / "hf")
    out = {"hf": hf}
    for name, args in {
        "archive": ["--to", "archive"], "nemo-dir": ["--to", "nemo-dir"], "nxdt": ["--to", "nxdt"],
        "xser": ["--to", "nxdt", "--weights-format", "xser"],
    }.items():
        target = root / (name + (".nemo" if name == "archive" else ""))
        assert run(["convert", str(hf), str(target), "--tp", "2", *args]) == 0
        out[name] = target
    return out


def _copy(built: dict, kind: str, tmp_path: Path) -> Path:
    source = built[kind]
    target = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
    return target


def _locate(path: Path, rank: int, pick) -> tuple[str, int, int, str]:
    """(file, offset of the tensor's first byte, bytes per row, tensor name) of the first tensor of ``rank`` that ``pick(name)`` accepts."""
    with find_shards(path) as shards:
        source = shards.sources[(rank, 0)]
        name = next(n for n in source.keys() if pick(n))
        entry = source.stored(name)
        return entry.path, entry.offset, entry.info.nbytes // entry.info.shape[0], name


def _flip(file: str, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _is_norm(name: str) -> bool:
    return "norm" in name and "layers.1." in name


def _is_embedding(name: str) -> bool:
    return "embed" in name


def _flip_norm_copy(path: Path) -> str:
    """Flip a byte of the layer-1 norm weight stored on rank 1 (a replica: rank 0's copy is the one read)."""
    file, offset, _, _ = _locate(path, 1, _is_norm)
    _flip(file, offset + 2)
    return file


def _flip_padding_row(path: Path) -> str:
    """Flip a byte in the last embedding row of rank 1, which is vocabulary padding."""
    file, offset, row, name = _locate(path, 1, _is_embedding)
    with find_shards(path) as shards:
        rows = shards.sources[(1, 0)].info(name).shape[0]
    assert 2 * rows > VOCAB  # the layout padded the vocabulary
    _flip(file, offset + (rows - 1) * row + 1)
    return file


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _named(file: str, line: str) -> bool:
    """The line names the damaged file (an archive member as ``archive:member`` or the archive)."""
    return file in line or Path(file).name in line


def _refit_manifest(folder: Path, file: str) -> None:
    """Make the folder's manifest agree with a damaged file, as if the damage happened before it was written."""
    manifest = folder / "shardwise.json"
    document = json.loads(manifest.read_text())
    entries = document.get("members") or document["files"]
    relpath = Path(file).relative_to(folder).as_posix()
    entry = next(e for e in entries if e["name"] == relpath)
    entry["crc32"] = f"{crc32(Path(file).read_bytes()):08x}"
    manifest.write_text(json.dumps(document))


def _without_manifest(archive: Path) -> None:
    """Rewrite ``archive`` without its shardwise.json member (as NeMo writes archives)."""
    copy = archive.with_suffix(".tmp")
    with tarfile.open(archive) as src, tarfile.open(copy, "w") as dst:
        for member in src.getmembers():
            if member.name.rstrip("/").endswith("shardwise.json"):
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    copy.replace(archive)


def _assert_damaged(cli, path: Path, file: str, built: dict, tmp_path: Path, *extra: str) -> None:
    """diff exits 2 naming ``file``; convert exits 2 naming it and writes nothing."""
    result = cli("diff", path, built["hf"], *extra)
    assert result.code == 2, result
    assert _named(file, _one_line(result.err)), result
    out = tmp_path / "out"
    result = cli("convert", path, out, "--to", "hf", *extra)
    assert result.code == 2, result
    assert _named(file, _one_line(result.err)), result
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


@pytest.mark.parametrize("kind", ["archive", "nemo-dir", "nxdt", "xser"])
def test_a_flipped_byte_in_a_replica_on_rank_1_is_damage_for_diff_and_convert(cli, built, tmp_path, kind):
    path = _copy(built, kind, tmp_path)
    assert cli("diff", path, built["hf"]).code == 0  # sound before the flip
    file = _flip_norm_copy(path)
    _assert_damaged(cli, path, file, built, tmp_path)


@pytest.mark.parametrize("kind", ["archive", "nemo-dir"])
def test_a_flipped_byte_in_a_vocabulary_padding_row_is_damage_for_diff_and_convert(cli, built, tmp_path, kind):
    path = _copy(built, kind, tmp_path)
    file = _flip_padding_row(path)
    _assert_damaged(cli, path, file, built, tmp_path)


@pytest.mark.parametrize("kind", ["archive", "nxdt", "xser"])
def test_a_flipped_byte_in_the_copy_that_is_read_is_reported_as_damage_not_as_a_difference(cli, built, tmp_path, kind):
    path = _copy(built, kind, tmp_path)
    file, offset, _, _ = _locate(path, 0, _is_embedding)
    _flip(file, offset + 3)
    _assert_damaged(cli, path, file, built, tmp_path)


def test_reshard_of_a_damaged_archive_refuses_and_writes_nothing(cli, built, tmp_path):
    path = _copy(built, "archive", tmp_path)
    file = _flip_norm_copy(path)
    result = cli("reshard", path, tmp_path / "out.nemo", "--tp", "1")
    assert result.code == 2 and _named(file, _one_line(result.err)), result
    assert not (tmp_path / "out.nemo").exists()


@pytest.mark.parametrize("flip, named", [(_flip_norm_copy, "are a copy of"), (_flip_padding_row, "padding")], ids=["replica", "padding"])
def test_a_replica_or_padding_row_that_is_wrong_is_found_even_where_the_manifest_agrees_with_the_damage(cli, built, tmp_path, flip, named):
    path = _copy(built, "nemo-dir", tmp_path)
    file = flip(path)
    _refit_manifest(path, file)
    result = cli("diff", path, built["hf"])
    assert result.code == 2 and _named(file, _one_line(result.err)) and named in result.err, result


def test_a_replica_that_differs_in_a_checkpoint_without_manifest_is_damage(cli, built, tmp_path):
    archive = _copy(built, "archive", tmp_path)
    _without_manifest(archive)
    _flip_norm_copy(archive)
    result = cli("diff", archive, built["hf"])
    assert result.code == 2 and "mp_rank_01" in _one_line(result.err), result
    nxdt = _copy(built, "nxdt", tmp_path)
    (nxdt / "shardwise.json").unlink()
    file = _flip_norm_copy(nxdt)
    result = cli("diff", nxdt, built["hf"], "--config", built["hf"] / "config.json")
    assert result.code == 2 and _named(file, _one_line(result.err)), result


def test_inspect_checks_sizes_against_the_manifest_and_says_checksums_are_not_read(cli, built, tmp_path):
    path = _copy(built, "nxdt", tmp_path)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result
    assert "not verified" in json.loads(result.out)["integrity"]
    file, _, _, _ = _locate(path, 1, _is_norm)
    with open(file, "ab") as f:
        f.write(b"\0")
    result = cli("inspect", path)
    assert result.code == 2 and _named(file, _one_line(result.err)), result


def test_unread_copies_lists_replicas_and_padding_but_not_the_copies_that_are_read():
    from shardwise.layout.tiles import Tile, TiledTensor, invert, unread_copies, whole
    from shardwise.tensors import TensorInfo

    norm, embed = TensorInfo("norm", (4,), "float32"), TensorInfo("embed", (3, 2), "float32")
    padded = TensorInfo("embed", (2, 2), "float32")
    plan = {
        0: [whole(norm, "norm"), TiledTensor(padded, (Tile(0, 0, 2, 2, "embed", 0, 0),))],
        1: [whole(norm, "norm"), TiledTensor(padded, (Tile(0, 0, 1, 2, "embed", 2, 0), Tile(1, 0, 1, 2, None)))],
    }
    unread = unread_copies(plan, invert(plan, {"norm": norm, "embed": embed}))
    assert list(unread) == [1]
    by_name = {t.info.name: t.tiles for t in unread[1]}
    assert by_name == {"norm": (Tile(0, 0, 4, 1, (0, "norm"), 0, 0),), "embed": (Tile(1, 0, 1, 2, None),)}


def test_an_unsharded_archive_damaged_under_its_manifest_is_refused_by_diff_and_convert(cli, tmp_path):
    import torch
    from safetensors.torch import save_file

    from shardwise.formats import open_checkpoint

    save_file({"a.weight": torch.randn(64, 32), "b.bias": torch.randn(32)}, tmp_path / "plain.safetensors")
    archive = tmp_path / "plain.nemo"
    assert cli("convert", tmp_path / "plain.safetensors", archive, "--to", "archive").code == 0
    with open_checkpoint(archive) as ckpt:
        entry = ckpt.tensors.stored("a.weight")
    _flip(entry.path, entry.offset + 5)
    result = cli("diff", archive, tmp_path / "plain.safetensors")
    assert result.code == 2 and "model_weights.ckpt" in _one_line(result.err), result
    result = cli("convert", archive, tmp_path / "out.safetensors")  # (--to dcp is checked the same way; its torch.distributed import takes seconds)
    assert result.code == 2 and "CRC-32" in _one_line(result.err) and not (tmp_path / "out.safetensors").exists(), result


def test_a_manifest_that_lists_one_file_many_times_is_refused_before_any_checksum(cli, built, tmp_path):
    path = _copy(built, "nxdt", tmp_path)
    document = json.loads((path / "shardwise.json").read_text())
    document["members"] = [document["members"][0]] * 100_000  # checked 100,000 times, this would read the shard 100,000 times
    (path / "shardwise.json").write_text(json.dumps(document))
    result = cli("diff", path, built["hf"])
    assert result.code == 2 and "more than once" in _one_line(result.err), result
