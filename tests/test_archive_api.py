"""save_to / restore_from / ArchiveMixin: round trips, artifacts and their lifetime, who decides the class."""

from __future__ import annotations

import gc
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise import ArchiveMixin
from shardwise.errors import FormatError, IntegrityError, OptionError

from conftest import assert_same_tensors, sample_state_dict


class Net(ArchiveMixin, torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(config["width"], 3)
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("steps", torch.tensor(7))
        tokenizer = config.get("tokenizer", {}).get("model")
        self.tokenizer_text = open(tokenizer).read() if tokenizer else None  # artifact paths are real during __init__


def test_mixin_round_trip_restores_weights_config_and_artifacts(tmp_path):
    (tmp_path / "tok.model").write_text("vocab")
    model = Net({"width": 5})
    model.save_to(tmp_path / "net.nemo", artifacts={"tokenizer.model": tmp_path / "tok.model"})
    restored = Net.restore_from(tmp_path / "net.nemo")
    assert isinstance(restored, Net) and restored.tokenizer_text == "vocab"
    assert_same_tensors(restored.state_dict(), model.state_dict())
    assert restored.config["width"] == 5 and restored.config["target"].endswith("Net")
    assert os.path.isfile(restored.config["tokenizer"]["model"])  # still valid after the constructor


def test_artifact_paths_live_as_long_as_the_returned_object(tmp_path):
    (tmp_path / "tok.model").write_text("vocab")
    shardwise.save_to(Net({"width": 2}), tmp_path / "a.nemo", artifacts={"tokenizer.model": tmp_path / "tok.model"})
    restored = Net.restore_from(tmp_path / "a.nemo")
    path = restored.config["tokenizer"]["model"]
    assert os.path.isfile(path)
    del restored
    gc.collect()
    assert not os.path.exists(path)
    kept = shardwise.restore_from(tmp_path / "a.nemo", artifacts_dir=tmp_path / "kept")
    kept.close()
    assert (tmp_path / "kept").is_dir() and any((tmp_path / "kept").iterdir())
    again = shardwise.restore_from(tmp_path / "a.nemo", artifacts_dir=tmp_path / "kept")  # the same folder twice
    assert open(again.config["tokenizer"]["model"]).read() == "vocab"
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [Path(path).name]


def test_state_dict_round_trip_in_both_weight_formats_and_with_a_cast(tmp_path):
    state = dict(sample_state_dict())
    for fmt in ("torch", "safetensors"):
        path = shardwise.save_to(state, tmp_path / f"{fmt}.nemo", config={"a": [1, 2]}, weights_format=fmt)
        with shardwise.restore_from(path) as restored:
            assert_same_tensors(restored.state_dict, state)
            assert restored.config == {"a": [1, 2]}
        assert shardwise.inspect(path)["archive"]["layout"]["weights_format"] == fmt
    path = shardwise.save_to(state, tmp_path / "bf16.nemo", dtype="bf16")
    with shardwise.restore_from(path) as restored:
        assert restored.state_dict["embed.weight"].dtype == torch.bfloat16
        assert restored.state_dict["position_ids"].dtype == torch.int64
        assert torch.equal(restored.state_dict["embed.weight"], state["embed.weight"].bfloat16())


def test_restored_tensors_can_be_written_without_touching_the_archive(tmp_path):
    state = dict(sample_state_dict())
    for fmt in ("torch", "safetensors"):
        path = shardwise.save_to(state, tmp_path / f"{fmt}.nemo", weights_format=fmt)
        before = path.read_bytes()
        with shardwise.restore_from(path) as restored:
            restored.state_dict["embed.weight"].add_(1.0)
            assert torch.equal(restored.state_dict["embed.weight"], state["embed.weight"] + 1.0)
        assert path.read_bytes() == before
        with shardwise.restore_from(path) as again:
            assert_same_tensors(again.state_dict, state)


def test_saving_the_same_model_twice_gives_identical_archives(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("a\nb\n")
    state = dict(sample_state_dict())
    for name in ("one", "two"):
        shardwise.save_to(state, tmp_path / f"{name}.nemo", config={"x": 1}, artifacts={"tokenizer.dir": tmp_path / "tok"})
    assert (tmp_path / "one.nemo").read_bytes() == (tmp_path / "two.nemo").read_bytes()


def test_a_folder_artifact_holding_an_hf_tokenizer_loads_with_transformers(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    import shutil

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_path / name, folder / name)
    path = shardwise.save_to(Net({"width": 2}), tmp_path / "t.nemo", artifacts={"tokenizer.hf": folder})
    restored = Net.restore_from(path)
    folder = restored.config["tokenizer"]["hf"]
    ids = AutoTokenizer.from_pretrained(folder)("hello world")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(minilm_path)("hello world")["input_ids"]


def test_the_config_target_is_never_imported_unless_allowed(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "evil_models.py").write_text(textwrap.dedent(f"""
        import pathlib, torch
        pathlib.Path({str(marker)!r}).write_text("code ran")
        class Model(torch.nn.Module):
            def __init__(self, config):
                super().__init__()
                self.proj = torch.nn.Linear(config["width"], 3)
    """))
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "evil_models", raising=False)
    path = shardwise.save_to({"proj.weight": torch.zeros(3, 4), "proj.bias": torch.zeros(3)}, tmp_path / "m.nemo",
                             config={"target": "evil_models.Model", "width": 4})
    restored = shardwise.restore_from(path)
    assert isinstance(restored, shardwise.RestoredArchive) and not marker.exists()
    with pytest.raises(OptionError, match="not under the allowed prefixes"):
        shardwise.restore_from(path, allow_target=["trusted."])
    assert not marker.exists()
    model = shardwise.restore_from(path, allow_target=["evil_models."])
    assert marker.exists() and type(model).__name__ == "Model"
    assert torch.equal(model.proj.weight, torch.zeros(3, 4))


def test_weights_that_do_not_fit_the_class_are_refused_naming_the_keys(tmp_path):
    path = shardwise.save_to(Net({"width": 5}), tmp_path / "n.nemo")
    with pytest.raises(FormatError, match="proj.weight: \\(3, 6\\) in the model"):
        shardwise.restore_from(path, lambda cfg: Net({"width": 6}))
    state = Net({"width": 5}).state_dict()
    state.pop("norm.bias")
    partial = shardwise.save_to(dict(state), tmp_path / "p.nemo", config={"width": 5})
    with pytest.raises(FormatError, match="missing norm.bias"):
        Net.restore_from(partial)
    assert Net.restore_from(partial, strict=False).proj.weight.shape == (3, 5)


def test_verify_detects_a_corrupted_weights_member(tmp_path):
    path = shardwise.save_to(dict(sample_state_dict()), tmp_path / "c.nemo")
    data = bytearray(path.read_bytes())
    tail = data.rfind(b"./shardwise.json")
    data[tail - 700] ^= 0xFF  # a byte of the weights member, just before the manifest's header
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model_weights.ckpt is corrupted"):
        shardwise.restore_from(path, verify=True)


def test_restore_under_torch_distributed_picks_each_process_rank(tmp_path):
    import torch.multiprocessing as mp

    src = tmp_path / "src"
    src.mkdir()
    for tp_rank in range(2):
        folder = src / f"mp_rank_{tp_rank:02d}"
        folder.mkdir()
        torch.save({"state_dict": {"w": torch.full((2,), float(tp_rank))}, "hyper_parameters": {"cfg": {"tp": 2}}}, folder / "last.ckpt")
    archive = tmp_path / "tp2.nemo"
    shardwise.convert(src, archive, to="archive")
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_restore_rank, args=(str(archive), str(tmp_path / "rdzv"), results), nprocs=2, join=True)
    assert dict(results) == {0: (0, [0.0, 0.0]), 1: (1, [1.0, 1.0])}


def _restore_rank(rank: int, archive: str, rdzv: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    try:
        with shardwise.restore_from(archive) as restored:
            results[rank] = (restored.tp_rank, restored.state_dict["w"].tolist())
    finally:
        dist.destroy_process_group()
