"""Llama models between HF, nxdt (nxdt and megatron styles) and mcore archives at any TP/PP, on disk."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import tiny_llama
from shardwise.archive.reader import Archive
from shardwise.cli import run
from shardwise.errors import FormatError, LayoutError
from shardwise.reshard.convert import convert_layout
from shardwise.reshard.model import open_model
from shardwise.verify.tensor_diff import diff


def _llama(folder, *, heads, kv_heads, layers, tied, vocab=128):
    tiny_llama(
        folder, hidden=64, intermediate=96, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab, tied=tied,
        seed=heads * 10 + kv_heads + layers + tied, dtype=torch.bfloat16,
    )
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {
        "gqa": _llama(root / "gqa", heads=8, kv_heads=2, layers=5, tied=False),
        "gqa-tied": _llama(root / "gqa-tied", heads=8, kv_heads=2, layers=4, tied=True),
        "mha": _llama(root / "mha", heads=8, kv_heads=8, layers=5, tied=False, vocab=100),
    }


LAYOUTS = {
    "nxdt tp1": dict(to="nxdt", tp=1),
    "nxdt tp2 pp2": dict(to="nxdt", tp=2, pp=2),
    "nxdt qkv-linear tp2 pp2": dict(to="nxdt", tp=2, pp=2, qkv_linear=True),
    "nxdt qkv-linear kv x2 tp4": dict(to="nxdt", tp=4, qkv_linear=True, kv_multiplier=2),
    "nxdt fuse-qkv tp2": dict(to="nxdt", tp=2, fuse_qkv=True),
    "nxdt fuse-qkv kv x2 tp4 pp2": dict(to="nxdt", tp=4, pp=2, fuse_qkv=True, kv_multiplier=2),
    "megatron tp2 pp2": dict(to="nxdt", style="megatron", tp=2, pp=2),
    "megatron tp1 pp2": dict(to="nxdt", style="megatron", tp=1, pp=2),
    "mcore tp1": dict(to="archive"),
    "mcore tp2 pp2": dict(to="archive", tp=2, pp=2),
    "mcore nemo-dir tp2": dict(to="nemo-dir", tp=2),
}


def _applies(model: str, layout: dict) -> bool:
    """KV replication needs fewer KV heads than TP: the MHA model takes no multiplier."""
    kv = 8 if model == "mha" else 2
    return layout.get("kv_multiplier", 1) == 1 or kv < layout["tp"]


@pytest.mark.parametrize(("model", "name"), [(m, n) for m in ("gqa", "gqa-tied", "mha") for n in LAYOUTS if _applies(m, LAYOUTS[n])])
def test_hf_to_layout_to_hf_is_bit_exact(models, tmp_path, model, name):
    layout = LAYOUTS[name]
    src = models[model]
    out = tmp_path / ("out.nemo" if layout["to"] == "archive" else "out")
    convert_layout(src, out, **layout)
    back = tmp_path / "back"
    convert_layout(out, back, to="hf")
    report = diff(src, back)
    assert report.equal, (report.missing, report.extra, [m.name for m in report.mismatches][:3])
    assert diff(src, out).equal  # diff merges the shards itself
    assert json.loads((back / "config.json").read_text())["num_key_value_heads"] == (8 if model == "mha" else 2)
    assert (back / "tokenizer.json").is_file() == (layout["to"] != "nxdt")


def test_layout_to_other_layouts_to_hf_is_bit_exact_without_passing_through_hf(models, tmp_path):
    src = models["gqa"]
    chain = [
        dict(to="nxdt", tp=4, qkv_linear=True, kv_multiplier=2),
        dict(to="archive", tp=2, pp=2),
        dict(to="nxdt", style="megatron", tp=1, pp=3),
        dict(to="nemo-dir", tp=2, pp=1),
        dict(to="nxdt", tp=2, pp=2, fuse_qkv=True),
    ]
    previous = src
    for i, layout in enumerate(chain):
        out = tmp_path / f"step{i}"
        convert_layout(previous, out, **layout)
        assert diff(src, out).equal, layout
        previous = out
    convert_layout(previous, tmp_path / "hf", to="hf")
    assert diff(src, tmp_path / "hf").equal


def test_reshard_keeps_format_style_and_options(models, tmp_path):
    convert_layout(models["gqa"], tmp_path / "a", to="nxdt", tp=2, pp=2, fuse_qkv=True)
    convert_layout(tmp_path / "a", tmp_path / "b", keep_layout=True, tp=4, pp=1)
    with open_model(tmp_path / "b") as model:
        assert (model.container, model.layout.style, model.layout.qkv, model.layout.tp, model.layout.pp) == ("nxdt", "nxdt", "fused", 4, 1)
        assert model.layout.kv_multiplier == 2  # TP 4 over 2 KV heads replicates them, as the source did at TP 2 without needing to
    assert diff(models["gqa"], tmp_path / "b").equal
    convert_layout(models["gqa"], tmp_path / "c.nemo", to="archive", tp=2)
    convert_layout(tmp_path / "c.nemo", tmp_path / "d.nemo", keep_layout=True, tp=1, pp=2)
    with Archive(tmp_path / "d.nemo") as archive:
        assert (archive.layout.tp, archive.layout.pp) == (1, 2)
        assert archive.model_config["pipeline_model_parallel_size"] == 2
    assert diff(models["gqa"], tmp_path / "d.nemo").equal


def test_nxdt_files_are_flat_state_dicts_named_as_nxd_names_them(models, tmp_path):
    convert_layout(models["gqa"], tmp_path / "nx", to="nxdt", tp=2, pp=2, qkv_linear=True)
    files = sorted(p.name for p in (tmp_path / "nx" / "model").iterdir())
    assert files == sorted(f"dp_rank_00_tp_rank_{t:02d}_pp_rank_{p:02d}.pt" for p in range(2) for t in range(2))
    shard = torch.load(tmp_path / "nx" / "model" / files[0], weights_only=True)
    assert "model.layers.0.self_attn.qkv_proj.weight_q" in shard and "model.embed_tokens.weight" in shard
    assert "lm_head.weight" not in shard and shard["model.layers.0.mlp.gate_up_proj.weight"].shape == (96, 64)
    last = torch.load(tmp_path / "nx" / "model" / "dp_rank_00_tp_rank_01_pp_rank_01.pt", weights_only=True)
    assert "model.layers.4.self_attn.o_proj.weight" in last and "model.norm.weight" in last  # global layer indexes, uneven 2 + 3
    manifest = json.loads((tmp_path / "nx" / "shardwise.json").read_text())
    assert manifest["parallel"]["stages"] == [{"pp_rank": 0, "layers": [0, 1]}, {"pp_rank": 1, "layers": [2, 3, 4]}]
    assert {m["name"] for m in manifest["members"]} == {f"model/{f}" for f in files}


def test_folders_written_by_nxd_are_read_without_a_manifest_given_the_config(models, tmp_path):
    nx = tmp_path / "nx"
    convert_layout(models["gqa"], nx, to="nxdt", tp=4, qkv_linear=True, kv_multiplier=2)
    (nx / "shardwise.json").unlink()
    # NxD saves o_proj as a transposed view (non-contiguous strides); rewrite one shard that way
    path = nx / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    shard = torch.load(path, weights_only=True)
    shard = {k: (v.t().contiguous().t() if k.endswith("o_proj.weight") else v) for k, v in shard.items()}
    torch.save(shard, path)
    with pytest.raises(LayoutError, match="pass --config"):
        open_model(nx)
    config = models["gqa"] / "config.json"
    with open_model(nx / "model", config=config) as model:
        assert (model.layout.tp, model.layout.kv_multiplier, model.layout.qkv, model.has_manifest) == (4, 2, "linear", False)
    assert diff(models["gqa"], nx, config=config).equal


def test_the_older_tp_rank_pp_rank_checkpoint_pt_layout_is_read(models, tmp_path):
    nx = tmp_path / "nx"
    convert_layout(models["mha"], nx, to="nxdt", tp=2, pp=2)
    old = tmp_path / "old"
    for t in range(2):
        for p in range(2):
            (old / f"tp_rank_{t:02d}_pp_rank_{p:02d}").mkdir(parents=True)
            shutil.copy(nx / "model" / f"dp_rank_00_tp_rank_{t:02d}_pp_rank_{p:02d}.pt", old / f"tp_rank_{t:02d}_pp_rank_{p:02d}" / "checkpoint.pt")
    assert diff(models["mha"], old, config=models["mha"] / "config.json").equal


def test_mcore_archive_pads_the_vocabulary_records_nemo_config_and_packs_the_tokenizer(models, tmp_path):
    out = tmp_path / "m.nemo"
    convert_layout(models["mha"], out, to="archive", tp=2, pp=2)
    with Archive(out) as archive:
        config = archive.model_config
        assert (config["tensor_model_parallel_size"], config["num_query_groups"], config["activation"]) == (2, 8, "fast-swiglu")
        assert config["make_vocab_size_divisible_by"] == 4  # NeMo's choice for a vocabulary of 100
        assert config["tokenizer"]["library"] == "huggingface" and config["tokenizer"]["type"].startswith("nemo:")
        embed = archive.weights(1, 0).info("model.embedding.word_embeddings.weight")
        assert embed.shape == (52, 64)  # 100 padded to 104, split in two
        assert "model.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in archive.weights(0, 1).keys()  # stage-local
        assert archive.manifest["parallel"]["layout"]["style"] == "mcore"


def test_tied_models_store_lm_head_on_the_last_stage_when_pipelined_and_drop_it_on_the_way_back(models, tmp_path):
    out = tmp_path / "t.nemo"
    convert_layout(models["gqa-tied"], out, to="archive", tp=1, pp=2)
    with Archive(out) as archive:
        assert "model.output_layer.weight" in archive.weights(0, 1).keys()
        assert "model.output_layer.weight" not in archive.weights(0, 0).keys()
    convert_layout(out, tmp_path / "hf", to="hf")
    assert diff(models["gqa-tied"], tmp_path / "hf").equal


def test_cli_refuses_layouts_the_model_cannot_take_with_the_numbers(models, tmp_path, capsys):
    gqa, mha = str(models["gqa"]), str(models["mha"])
    assert run(["convert", gqa, str(tmp_path / "a"), "--to", "nxdt", "--tp", "3"]) == 2
    assert "tensor parallel size 3 does not divide 8 query heads" in capsys.readouterr().err
    assert run(["convert", gqa, str(tmp_path / "b"), "--to", "nxdt", "--tp", "4", "--qkv-linear"]) == 2
    assert "--kv-size-multiplier 2" in capsys.readouterr().err
    assert run(["convert", mha, str(tmp_path / "c"), "--to", "nxdt", "--tp", "8"]) == 2
    assert "tensor parallel size 8 does not divide 100 vocabulary rows" in capsys.readouterr().err
    assert run(["convert", gqa, str(tmp_path / "d"), "--to", "archive", "--style", "nxdt"]) == 2
    assert "cannot be written as archive" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_config_that_contradicts_the_files_is_refused(models, tmp_path, capsys):
    nx = tmp_path / "nx"
    convert_layout(models["gqa"], nx, to="nxdt", tp=2)
    (nx / "shardwise.json").unlink()
    wrong = json.loads((models["gqa"] / "config.json").read_text())
    wrong["num_key_value_heads"] = 4
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert run(["convert", str(nx), str(tmp_path / "hf"), "--to", "hf", "--config", str(tmp_path / "wrong.json")]) == 2
    err = capsys.readouterr().err
    assert "KV heads per rank" in err or "the layout predicts" in err
    assert not (tmp_path / "hf").exists()


def test_nxdt_convert_takes_nxd_flags_with_real_booleans(models, tmp_path, capsys):
    src, config = str(models["gqa"] / "model.safetensors"), str(models["gqa"] / "config.json")
    base = ["nxdt-convert", "--input_dir", src, "--config", config, "--convert_from_full_state", "--tp_size", "2", "--pp_size", "2"]
    assert run(base + ["--output_dir", str(tmp_path / "f"), "--qkv_linear", "False"]) == 0
    assert run(base + ["--output_dir", str(tmp_path / "t"), "--qkv_linear", "True"]) == 0
    plain = torch.load(tmp_path / "f" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt", weights_only=True)
    linear = torch.load(tmp_path / "t" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt", weights_only=True)
    assert "model.layers.0.self_attn.q_proj.weight" in plain and "model.layers.0.self_attn.qkv_proj.weight_q" in linear
    (tmp_path / "full").mkdir()  # NxD's users create the output folder first
    back = ["nxdt-convert", "--input_dir", str(tmp_path / "t" / "model"), "--output_dir", str(tmp_path / "full"), "--convert_to_full_state", "--config", config]
    assert run(back + ["--tp_size", "4", "--qkv_linear", "True"]) == 2
    assert "holds tp 2, not the 4" in capsys.readouterr().err
    assert run(back + ["--tp_size", "2", "--pp_size", "2", "--qkv_linear", "1"]) == 0
    assert diff(models["gqa"], tmp_path / "full" / "checkpoint.pt").equal
    assert run(["nxdt-convert", "--output_dir", str(tmp_path / "x"), "--convert_from_full_state", "--qkv_linear", "maybe"]) == 2
    assert "not a boolean" in capsys.readouterr().err


def test_inspect_shows_the_layout_of_sharded_checkpoints(models, tmp_path, capsys):
    convert_layout(models["gqa"], tmp_path / "nx", to="nxdt", tp=2, pp=2, fuse_qkv=True)
    assert run(["inspect", str(tmp_path / "nx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    parallel = summary["parallel"]
    assert (parallel["style"], parallel["tp"], parallel["pp"], parallel["qkv"]) == ("nxdt", 2, 2, "fused")
    assert [s["num_layers"] for s in parallel["stages"]] == [2, 3]
    assert summary["num_tensors"] == sum(1 for _ in summary["tensors"]) and summary["tensors"][0]["name"].startswith("dp_rank_00_tp_rank_00_pp_rank_00.pt/")


def test_a_changed_shard_shows_up_in_diff_under_its_full_tensor_name(models, tmp_path):
    nx = tmp_path / "nx"
    convert_layout(models["gqa"], nx, to="nxdt", tp=2)
    (nx / "shardwise.json").unlink()  # as NxD writes it: with the manifest, the rewritten shard would be damage (tests/hostile)
    path = nx / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    shard = torch.load(path, weights_only=True)
    shard["model.layers.3.mlp.gate_up_proj.weight"][50, 3] += 1
    torch.save(shard, path)
    report = diff(models["gqa"], nx, config=models["gqa"] / "config.json")
    assert [m.name for m in report.mismatches] == ["model.layers.3.mlp.up_proj.weight"]


def test_nemo_config_yaml_is_valid_yaml_with_stage_counts(models, tmp_path):
    convert_layout(models["gqa"], tmp_path / "dir", to="nemo-dir", tp=1, pp=2)
    config = yaml.safe_load((tmp_path / "dir" / "model_config.yaml").read_text())
    assert config["num_layers"] == 5 and config["pipeline_model_parallel_size"] == 2
    assert sorted(p.name for p in (tmp_path / "dir").iterdir() if p.name.startswith("tp_rank")) == ["tp_rank_00_pp_rank_000", "tp_rank_00_pp_rank_001"]


def test_nemo_written_folders_with_transformer_engine_extra_state_and_no_manifest_are_read(models, tmp_path):
    import io

    folder = tmp_path / "nemo"
    convert_layout(models["gqa"], folder, to="nemo-dir", tp=2, pp=2)
    (folder / "shardwise.json").unlink()
    for path in folder.glob("tp_rank_*/model_weights.ckpt"):
        state = torch.load(path, weights_only=True)
        state["model.decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"fp8 state")  # TE < 2.0
        state["model.decoder.layers.0.self_attention.linear_qkv._extra_state"] = torch.empty(0, dtype=torch.uint8)  # TE >= 2.0
        state["model.output_layer._extra_state"] = None
        torch.save(state, path)
    with open_model(folder) as model:
        assert (model.layout.style, model.layout.tp, model.layout.pp, model.has_manifest) == ("mcore", 2, 2, False)
    convert_layout(folder, tmp_path / "hf", to="hf")
    assert diff(models["gqa"], tmp_path / "hf").equal


def test_a_source_truncated_after_it_was_opened_is_refused_before_it_is_mapped(models, tmp_path):
    """Sources are read through maps of their pages; mapping past the end of a file would be SIGBUS later,
    so the size is checked when a chunk is mapped (truncation while mapped remains a crash, as for any mmap reader)."""
    src = tmp_path / "src"
    shutil.copytree(models["gqa"], src)
    with open_model(src) as model:
        weights = src / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        with pytest.raises(FormatError, match="model.safetensors: file is truncated"):
            convert_layout(model.path, tmp_path / "out", to="nxdt", tp=2)  # opened again: refused at open
        last = max(model.canonical, key=lambda n: model.lookup(((0, 0), n))[1].offset)
        source, entry = model.lookup(((0, 0), last))
        with pytest.raises(FormatError, match="file is truncated"):
            source.mapped_bytes(entry)
    assert not (tmp_path / "out").exists()


def test_manifest_checksums_are_the_crc32_of_every_file(models, tmp_path):
    """Each byte is checksummed once on the way out (zip member CRCs folded into the file's): the folds must be exact."""
    import zlib

    out = tmp_path / "out"
    convert_layout(models["gqa"], out, to="nxdt", tp=2, pp=2, fuse_qkv=True)
    members = json.loads((out / "shardwise.json").read_text())["members"]
    assert len(members) == 4
    for member in members:
        data = (out / member["name"]).read_bytes()
        assert (len(data), f"{zlib.crc32(data):08x}") == (member["size"], member["crc32"])


def test_small_chunks_and_background_writes_give_the_same_bytes(models, tmp_path, monkeypatch):
    """The tiny test models fit in one chunk; here every band spans many chunks and every write goes to
    the background writer (alternating gather buffers, mapped views in flight, writeback started per write)."""
    from shardwise.background import BackgroundWriter
    from shardwise.layout import stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 4096)
    monkeypatch.setitem(BackgroundWriter.__init__.__kwdefaults__, "threshold", 512)
    src = models["gqa"]
    nx = tmp_path / "nx"
    convert_layout(src, nx, to="nxdt", tp=4, pp=2, fuse_qkv=True, kv_multiplier=2)
    a2 = tmp_path / "a2.nemo"
    convert_layout(nx, a2, to="archive", tp=2)
    a4 = tmp_path / "a4.nemo"
    convert_layout(a2, a4, keep_layout=True, tp=1, pp=2)
    back = tmp_path / "back"
    convert_layout(a4, back, to="hf")
    assert diff(src, back).equal
    for out in (nx, a2, a4):
        assert diff(src, out).equal


def test_a_sharded_folder_that_needs_trust_pickle_is_routed_to_the_layout_engine(models, tmp_path, capsys):
    """Routing honours --trust-pickle: without it the refusal is the message, with it the folder converts."""
    from fractions import Fraction

    from shardwise.cli import run

    nx, out = tmp_path / "nx", tmp_path / "out"
    convert_layout(models["gqa"], nx, to="nxdt", tp=2)
    (nx / "shardwise.json").unlink()
    for path in (nx / "model").iterdir():
        shard = torch.load(path, weights_only=True)
        shard["extra_state"] = Fraction(1, 3)  # a class outside the allow-list, as custom training code may save
        torch.save(shard, path)
    config = str(models["gqa"] / "config.json")
    assert run(["convert", str(nx), str(out), "--to", "hf", "--config", config]) == 2
    assert "refused to load" in capsys.readouterr().err and not out.exists()
    assert run(["convert", str(nx), str(out), "--to", "hf", "--config", config, "--trust-pickle", "--quiet"]) == 0
    assert diff(models["gqa"], out).equal
