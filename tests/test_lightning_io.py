"""shardwise's Lightning CheckpointIO plugins, with the real pytorch-lightning Trainer on CPU: what
lands at the checkpoint path, bit-exact resume (from shardwise folders and from Lightning's own
.ckpt files), the async writer, damaged and foreign paths, and the pickle opt-in."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import zlib
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from conftest import raw_bytes
from safetensors.torch import load_file

from shardwise.errors import FormatError, IntegrityError, OptionError, OutputExistsError, UnsafeCheckpointError
from shardwise.lightning import AsyncShardwiseCheckpointIO, ShardwiseCheckpointIO
from shardwise.lightning import folder as folder_module
from shardwise.lightning import plugin as plugin_module

pytestmark = [  # Lightning's advice about workers and resumable loaders; torch's deprecation of a class Lightning uses
    pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore:.*LeafSpec"),
]

PLUGINS = [ShardwiseCheckpointIO, AsyncShardwiseCheckpointIO]


class Tiny(pl.LightningModule):
    """Few parameters, a buffer (BatchNorm), Adam and a per-step scheduler. Each step's batch is drawn
    from a generator seeded with the step number: deterministic, different at every step, and the
    same whether a run was resumed or not (the loader only counts steps)."""

    def __init__(self, lr: float = 0.05, extra=None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
        self.steps_seen: list[int] = []

    def training_step(self, batch, _):
        self.steps_seen.append(self.global_step)
        g = torch.Generator().manual_seed(self.global_step)
        x, y = torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(64), batch_size=1)


def _fit(root: Path, plugin=None, *, max_steps: int, ckpt_path=None, callbacks=None, seed: int = 0, extra=None):
    """Fit a Tiny built after seeding with ``seed``; checkpoints every 4 steps into root/ckpts unless ``callbacks`` says otherwise."""
    torch.manual_seed(seed)
    model = Tiny(extra=extra)
    every_4 = [ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=4, save_top_k=-1)]
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, plugins=[plugin] if plugin is not None else None, enable_checkpointing=callbacks != [],
        callbacks=every_4 if callbacks is None else callbacks,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def _same(a, b) -> bool:
    """Equal in type (exactly), order, attributes (an OrderedDict's _metadata) and bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)
    if isinstance(a, dict):
        attributes_same = type(a) is dict or _same(vars(a), vars(b))  # subclasses: an OrderedDict's _metadata
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a) and attributes_same
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, argparse.Namespace):
        return _same(vars(a), vars(b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _state(trainer: pl.Trainer, model: Tiny) -> dict:
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """8 steps (2 epochs) in one run, no checkpoints: what every resumed run must equal, bit for bit."""
    trainer, model = _fit(tmp_path_factory.mktemp("straight"), max_steps=8, callbacks=[])
    assert trainer.global_step == 8
    return _state(trainer, model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint folder the synchronous plugin wrote at the end of epoch 0 (step 4)."""
    root = tmp_path_factory.mktemp("saved")
    _fit(root, ShardwiseCheckpointIO(), max_steps=4)
    return root / "ckpts/epoch=0-step=4.ckpt"


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def test_the_comparison_used_here_tells_containers_and_metadata_apart():
    with_metadata = OrderedDict(a=1)
    with_metadata._metadata = {"": {"version": 1}}
    assert _same(with_metadata, copy.deepcopy(with_metadata))
    assert not _same(OrderedDict(a=1), {"a": 1}) and not _same(OrderedDict(a=1), with_metadata)
    assert not _same((1, 2), [1, 2]) and not _same({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not _same(torch.zeros(2), torch.zeros(2, dtype=torch.float64)) and not _same(torch.tensor([0.0]), torch.tensor([-0.0]))


@pytest.mark.parametrize("plugin_class", PLUGINS)
def test_the_trainer_saves_shardwise_folders_and_resumes_from_them_bit_exactly(tmp_path, uninterrupted, plugin_class):
    _, first = _fit(tmp_path / "a", plugin_class(), max_steps=4)
    saved = tmp_path / "a/ckpts/epoch=0-step=4.ckpt"
    assert saved.is_dir() and sorted(p.name for p in saved.iterdir()) == ["checkpoint.safetensors", "shardwise.json"]
    manifest = json.loads((saved / "shardwise.json").read_text())
    assert manifest["format"] == "shardwise-lightning-checkpoint" and manifest["pickled"] == []
    assert [e["name"] for e in manifest["files"]] == ["checkpoint.safetensors"]
    for entry in manifest["files"]:
        data = (saved / entry["name"]).read_bytes()
        assert (len(data), f"{zlib.crc32(data):08x}") == (entry["size"], entry["crc32"])
    tensors = load_file(saved / "checkpoint.safetensors")  # the reference library reads the payload: plain safetensors
    for name, value in first.state_dict().items():
        assert _same(tensors[f"state_dict.{name}"], value)
    assert any(name.startswith("optimizer_states.0.state.") for name in tensors)

    trainer, resumed = _fit(tmp_path / "b", plugin_class(), max_steps=8, ckpt_path=saved, seed=123)
    assert resumed.steps_seen == [4, 5, 6, 7] and trainer.global_step == 8
    assert _same(_state(trainer, resumed), uninterrupted)


def test_a_checkpoint_loads_back_as_exactly_the_dict_lightning_gave(tmp_path):
    class Recording(ShardwiseCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self.given = copy.deepcopy(checkpoint)
            super().save_checkpoint(checkpoint, path, storage_options)

    odd = OrderedDict([("inf", math.inf), ("nan", math.nan), (3, "int key"), ((1, "a"), "tuple key"), ("nested", [(), {}, [None, True]])])
    odd._metadata = {"kept": 1}
    extra = {
        "namespace": argparse.Namespace(depth=2, path=Path("data/train")), "pure": PurePosixPath("/x"), "dtype": torch.bfloat16,
        "device": torch.device("cpu"), "set": {1, 2}, "frozen": frozenset({"a"}), "bytes": b"\x00\xff", "array": bytearray(b"ab"),
        "complex": complex(1, -2), "np": np.float32(0.25), "npint": np.int64(7), "odd": odd, "size": torch.Size([2, 3]),
        "tensor": torch.arange(6, dtype=torch.int16).reshape(2, 3)[:, 1],  # a strided view
    }
    plugin = Recording()
    _fit(tmp_path, plugin, max_steps=2, extra=extra, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2)])
    path = tmp_path / "ckpts/epoch=0-step=2.ckpt"
    assert json.loads((path / "shardwise.json").read_text())["pickled"] == []  # every value above has a safe form
    loaded = plugin.load_checkpoint(path)
    assert list(loaded) == list(plugin.given) and type(loaded["state_dict"]) is OrderedDict
    assert _same(loaded, plugin.given)
    assert loaded["state_dict"]._metadata == plugin.given["state_dict"]._metadata  # what load_state_dict reads for versions


def test_a_damaged_file_is_an_integrity_error_naming_it(tmp_path, saved):
    flipped = _copy(saved, tmp_path / "flipped")
    payload = flipped / "checkpoint.safetensors"
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0x10  # inside a tensor: the file still parses, only the CRC tells
    payload.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{payload}: CRC-32 [0-9a-f]{{8}} does not match"):
        ShardwiseCheckpointIO().load_checkpoint(flipped)
    with pytest.raises(IntegrityError, match="checkpoint.safetensors: CRC-32"):
        _fit(tmp_path / "run", ShardwiseCheckpointIO(), max_steps=8, ckpt_path=flipped)
    assert ShardwiseCheckpointIO(verify=False).load_checkpoint(flipped)["global_step"] == 4  # sizes only, as asked

    cut = _copy(saved, tmp_path / "cut")
    with open(cut / "checkpoint.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(IntegrityError, match=rf"{cut / 'checkpoint.safetensors'}: 100 bytes, the manifest says"):
        ShardwiseCheckpointIO().load_checkpoint(cut)


def test_paths_that_are_not_checkpoints_are_format_errors_naming_them(tmp_path, saved):
    import torch.distributed.checkpoint as dcp

    plugin = ShardwiseCheckpointIO()
    torch_file = tmp_path / "real.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}}, torch_file)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(torch_file.read_bytes()[:300])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(256).replace(b"PK", b"pk").lstrip(b"\x80"))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    broken = _copy(saved, tmp_path / "broken")
    (broken / "shardwise.json").write_text("{not json")
    dcp_folder = tmp_path / "dcp.ckpt"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=dcp_folder)
    (dcp_folder / ".metadata").write_bytes(b"\x80\x04not a pickle")
    unknown = "not a checkpoint shardwise reads"
    cases = {
        truncated: "not a readable torch file, or truncated", garbage: rf"{unknown} \(a file that does not start as a torch file\)",
        empty: rf"{unknown} \(an empty file\)", folder: rf"{unknown} \(a folder without shardwise.json or .metadata\)",
        tmp_path / "missing.ckpt": "no such checkpoint", broken / "shardwise.json": "the checkpoint's manifest is not valid JSON",
    }
    for path, message in cases.items():
        target = broken if path.name == "shardwise.json" else path
        with pytest.raises(FormatError, match=rf"^{path}: {message}"):
            plugin.load_checkpoint(target)
    with pytest.raises(FormatError, match=rf"^{dcp_folder / '.metadata'}: not a readable DCP metadata pickle"):
        plugin.load_checkpoint(dcp_folder)
    with pytest.raises(FormatError, match=rf"^{garbage}: not a checkpoint"):
        _fit(tmp_path / "run", plugin, max_steps=8, ckpt_path=garbage)


def test_values_without_a_safe_form_are_pickled_and_need_the_opt_in(tmp_path, uninterrupted):
    _fit(tmp_path / "a", ShardwiseCheckpointIO(), max_steps=4, extra={"ratio": Fraction(1, 3)})
    saved = tmp_path / "a/ckpts/epoch=0-step=4.ckpt"
    manifest = json.loads((saved / "shardwise.json").read_text())
    assert manifest["pickled"] == [{"at": "the checkpoint['hyper_parameters']['extra']['ratio']", "type": "fractions.Fraction"}]
    assert "pickled.pt" in {e["name"] for e in manifest["files"]}
    refusal = rf"^{saved / 'pickled.pt'}: refused to load: 1 value\(s\) .*\['ratio'\]: fractions.Fraction.*trust_pickle=True"
    with pytest.raises(UnsafeCheckpointError, match=refusal):
        ShardwiseCheckpointIO().load_checkpoint(saved)
    with pytest.raises(UnsafeCheckpointError, match=refusal):
        _fit(tmp_path / "refused", ShardwiseCheckpointIO(), max_steps=8, ckpt_path=saved)
    with pytest.raises(UnsafeCheckpointError, match=refusal):  # Lightning's weights_only=True wins over the plugin's trust
        ShardwiseCheckpointIO(trust_pickle=True).load_checkpoint(saved, weights_only=True)
    assert ShardwiseCheckpointIO().load_checkpoint(saved, weights_only=False)["hyper_parameters"]["extra"] == {"ratio": Fraction(1, 3)}

    trainer, resumed = _fit(tmp_path / "b", ShardwiseCheckpointIO(trust_pickle=True), max_steps=8, ckpt_path=saved, seed=5)
    assert trainer.global_step == 8 and _same(_state(trainer, resumed), uninterrupted)


def test_a_single_file_ckpt_from_lightnings_own_plugin_resumes_through_shardwise(tmp_path, uninterrupted):
    _fit(tmp_path / "a", None, max_steps=4, extra=argparse.Namespace(depth=2, path=Path("data")))
    single = tmp_path / "a/ckpts/epoch=0-step=4.ckpt"
    assert single.is_file() and single.read_bytes()[:2] == b"PK"  # torch.save's zip, written by TorchCheckpointIO
    loaded = ShardwiseCheckpointIO().load_checkpoint(single)  # Namespace and paths are inert: no opt-in needed
    assert loaded["hyper_parameters"]["extra"] == argparse.Namespace(depth=2, path=Path("data"))
    assert _same(loaded, torch.load(single, weights_only=False))

    trainer, resumed = _fit(tmp_path / "b", ShardwiseCheckpointIO(), max_steps=8, ckpt_path=single, seed=9)
    assert resumed.steps_seen == [4, 5, 6, 7] and _same(_state(trainer, resumed), uninterrupted)
    assert (tmp_path / "b/ckpts/epoch=0-step=8.ckpt/shardwise.json").is_file()  # saves after the switch are folders

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"ratio": Fraction(1, 3)}}, unsafe)
    with pytest.raises(UnsafeCheckpointError, match=rf"^{unsafe}: refused to load"):
        ShardwiseCheckpointIO().load_checkpoint(unsafe)
    assert ShardwiseCheckpointIO(trust_pickle=True).load_checkpoint(unsafe)["hyper_parameters"]["ratio"] == Fraction(1, 3)


@pytest.mark.parametrize("plugin_class", PLUGINS)
def test_save_top_k_removes_checkpoints_through_the_plugin(tmp_path, plugin_class):
    removed = []

    class Counting(plugin_class):
        def remove_checkpoint(self, path):
            removed.append(Path(path).name)
            super().remove_checkpoint(path)

    best = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="step", mode="max", save_top_k=1, every_n_train_steps=1)
    _fit(tmp_path, Counting(), max_steps=4, callbacks=[best])
    assert removed == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["epoch=0-step=4.ckpt"]  # no hidden staging folders either
    assert ShardwiseCheckpointIO().load_checkpoint(tmp_path / "ckpts/epoch=0-step=4.ckpt")["global_step"] == 4


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": OrderedDict(w=torch.full((3,), float(step)))}


def test_saving_replaces_atomically_and_a_failed_save_changes_nothing(tmp_path, monkeypatch):
    plugin = ShardwiseCheckpointIO()
    path = tmp_path / "last.ckpt"
    torch.save(_checkpoint(1), path)  # a single file from before the switch: replaced by a folder
    plugin.save_checkpoint(_checkpoint(2), path)
    plugin.save_checkpoint(_checkpoint(3), path)
    assert _same(plugin.load_checkpoint(path), _checkpoint(3))
    with pytest.raises(OptionError, match=r"the checkpoint\['hyper_parameters'\]\['fn'\] is a builtins.function, which has no safe form and cannot be pickled"):
        plugin.save_checkpoint({**_checkpoint(4), "hyper_parameters": {"fn": lambda: 0}}, path)
    with monkeypatch.context() as patch:  # the disk fills up as the manifest, the last file, is written
        patch.setattr(folder_module, "write_text_durably", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space left on device"):
            plugin.save_checkpoint(_checkpoint(4), path)
    assert _same(plugin.load_checkpoint(path), _checkpoint(3))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no staging folder left behind

    data = tmp_path / "data.ckpt"
    data.mkdir()
    (data / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match=rf"^{data}: a folder that is not a checkpoint"):
        plugin.save_checkpoint(_checkpoint(5), data)
    with pytest.raises(FormatError, match=rf"^{data}: not removed"):
        plugin.remove_checkpoint(data)
    assert (data / "keep.txt").read_text() == "user data"

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f".other.ckpt.shardwise-tmp-{dead.stdout.strip()}-0badc0de"
    stale.mkdir()  # what a save killed mid-way leaves
    plugin.save_checkpoint(_checkpoint(6), tmp_path / "other.ckpt")
    assert not stale.exists()

    link = tmp_path / "link.ckpt"
    link.symlink_to(path, target_is_directory=True)
    plugin.remove_checkpoint(link)
    plugin.remove_checkpoint(tmp_path / "never-saved.ckpt")
    assert not link.is_symlink() and _same(plugin.load_checkpoint(path), _checkpoint(3))
    plugin.remove_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["data.ckpt", "other.ckpt"]


def test_async_save_returns_before_writing_and_writes_what_was_given(tmp_path, monkeypatch):
    release = threading.Event()
    real_write = plugin_module.write_folder
    monkeypatch.setattr(plugin_module, "write_folder", lambda snap, path: (release.wait(10), real_write(snap, path)))
    plugin = AsyncShardwiseCheckpointIO()
    checkpoint = _checkpoint(7)
    plugin.save_checkpoint(checkpoint, tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()  # returned while the writer waits
    checkpoint["state_dict"]["w"].add_(100)  # training goes on and changes the weights in place
    release.set()
    plugin.teardown()
    assert _same(plugin.load_checkpoint(tmp_path / "a.ckpt"), _checkpoint(7))


def test_async_errors_surface_at_the_next_save_and_at_teardown(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    plugin = AsyncShardwiseCheckpointIO()
    plugin.save_checkpoint(_checkpoint(1), blocker / "x.ckpt")  # fails on the writer thread
    with pytest.raises(OSError, match=str(blocker)):
        plugin.save_checkpoint(_checkpoint(2), tmp_path / "y.ckpt")
    plugin.save_checkpoint(_checkpoint(3), blocker / "z.ckpt")
    with pytest.raises(OSError, match=str(blocker)):
        plugin.teardown()
    plugin.teardown()  # reported once
    assert not (tmp_path / "y.ckpt").exists()  # the save that raised the earlier error did not start


def test_map_location_and_arguments_lightning_may_pass(tmp_path):
    plugin = ShardwiseCheckpointIO()
    plugin.save_checkpoint(_checkpoint(2), tmp_path / "c.ckpt")
    assert plugin.load_checkpoint(tmp_path / "c.ckpt", map_location="meta")["state_dict"]["w"].device.type == "meta"
    assert plugin.load_checkpoint(tmp_path / "c.ckpt", map_location={"cpu": "meta"})["state_dict"]["w"].device.type == "meta"
    same = plugin.load_checkpoint(tmp_path / "c.ckpt", map_location=lambda storage, location: storage)  # TorchCheckpointIO's default
    assert _same(same, _checkpoint(2))
    with pytest.raises(OptionError, match="takes no storage_options"):
        plugin.save_checkpoint(_checkpoint(2), tmp_path / "d.ckpt", storage_options={"x": 1})
    with pytest.raises(OptionError, match="not a storage scheme fsspec knows"):  # s3:// works: see test_object_storage
        plugin.save_checkpoint(_checkpoint(2), "nosuchscheme://bucket/e.ckpt")
    assert not (tmp_path / "d.ckpt").exists()


def test_a_manifest_that_hides_its_pickle_still_needs_the_opt_in(tmp_path):
    plugin = ShardwiseCheckpointIO()
    path = tmp_path / "hidden.ckpt"
    plugin.save_checkpoint({**_checkpoint(1), "hyper_parameters": {"ratio": Fraction(1, 3)}}, path)
    manifest = json.loads((path / "shardwise.json").read_text())
    manifest["pickled"] = []  # the description of the pickle removed; the file and its entry stay
    (path / "shardwise.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError, match=rf"^{path / 'pickled.pt'}: refused to load"):
        plugin.load_checkpoint(path)
    manifest["files"][0]["crc32"] = "not hex"
    (path / "shardwise.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"shardwise.json: the manifest's 'files' is not a list"):
        plugin.load_checkpoint(path)


def test_other_shardwise_folders_are_neither_replaced_nor_removed(tmp_path):
    import shardwise

    tag = shardwise.save_checkpoint(tmp_path / "run", "step_1", model={"w": torch.ones(2)})
    folder = tmp_path / "run" / tag  # a training checkpoint: it has a shardwise.json too
    plugin = ShardwiseCheckpointIO()
    with pytest.raises(FormatError, match=rf"^{folder}: not removed"):
        plugin.remove_checkpoint(folder)
    with pytest.raises(OutputExistsError, match=rf"^{folder}: a folder that is not a checkpoint"):
        plugin.save_checkpoint(_checkpoint(1), folder)
    shardwise.load_checkpoint(tmp_path / "run", tag, model={"w": torch.zeros(2)})


# -- resuming from PyTorch distributed checkpoints (DCP) ------------------------------------------------
def _resumed(root: Path, plugin, ckpt_path: Path, seed: int) -> dict:
    """What a resume to step 8 from ``ckpt_path`` gives: the steps it ran, where it ended, its state."""
    trainer, model = _fit(root, plugin, max_steps=8, ckpt_path=ckpt_path, seed=seed, callbacks=[])
    return {"steps": model.steps_seen, "epoch": trainer.current_epoch, "global_step": trainer.global_step, **_state(trainer, model)}


def _same_checkpoint(loaded: dict, expected: dict) -> bool:
    """The same keys with the same values (``_same``), in whatever order the top-level keys come."""
    return sorted(map(str, loaded)) == sorted(map(str, expected)) and all(_same(loaded[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def dcp_of_a_lightning_checkpoint(tmp_path_factory):
    """The single file Lightning's default plugin wrote at step 4, and its dict saved again with
    ``torch.distributed.checkpoint.save``: (file, folder)."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("dcp_of_lightning")
    _fit(root, None, max_steps=4)
    single = root / "ckpts/epoch=0-step=4.ckpt"
    folder = root / "dcp.ckpt"
    dcp.save(torch.load(single, weights_only=True), checkpoint_id=folder)
    return single, folder


@pytest.mark.parametrize("plugin_class", PLUGINS)
def test_a_dcp_of_the_dict_lightning_saves_resumes_as_the_single_file_does(tmp_path, dcp_of_a_lightning_checkpoint, plugin_class):
    single, folder = dcp_of_a_lightning_checkpoint
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp"]
    expected = torch.load(single, weights_only=True)
    loaded = plugin_class().load_checkpoint(folder)
    # DCP flattening turns the optimizer's integer state keys into strings; they come back as numbers
    assert _same(loaded["optimizer_states"], expected["optimizer_states"])
    assert _same(dict(loaded["state_dict"]), dict(expected["state_dict"]))  # DCP keeps no OrderedDict
    for key in ("epoch", "global_step", "lr_schedulers", "hyper_parameters"):
        assert _same(loaded[key], expected[key]), key

    from_file = _resumed(tmp_path / "file", plugin_class(), single, seed=1)
    from_dcp = _resumed(tmp_path / "dcp", plugin_class(), folder, seed=2)
    assert from_file["steps"] == [4, 5, 6, 7]  # a resume, not a fresh start
    assert _same(from_dcp, from_file)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_optimizer_states_in_a_dcp_come_back_as_torch_gives_them(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    fresh = torch.optim.SGD(layer.parameters(), lr=0.1).state_dict()  # no step yet: an empty state, which DCP drops
    adam = torch.optim.Adam([{"params": [layer.weight]}, {"params": [layer.bias], "lr": 0.5}])
    layer(torch.ones(4, 3)).sum().backward()
    adam.step()  # state keyed 0 and 1 across two groups, which DCP saves under "0" and "1"
    expected = {"state_dict": layer.state_dict(), "optimizer_states": [fresh, adam.state_dict()]}
    dcp.save(expected, checkpoint_id=tmp_path / "dcp")
    loaded = ShardwiseCheckpointIO().load_checkpoint(tmp_path / "dcp")
    assert _same(loaded["optimizer_states"], expected["optimizer_states"])


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory):
    """Lightning's ModelParallelStrategy on 2 gloo ranks, the model sharded by FSDP2, saved at step 4
    both as its sharded DCP folder and as its single file (tests/lightning_ranks.py): (folder, file)."""
    out = tmp_path_factory.mktemp("two_ranks")
    script = Path(__file__).with_name("lightning_ranks.py")
    result = subprocess.run([sys.executable, str(script), str(out), "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
    return out / "sharded.ckpt", out / "full.ckpt"


@pytest.mark.parametrize("plugin_class", PLUGINS)
def test_lightnings_sharded_checkpoint_from_two_ranks_resumes_as_its_single_file_does(tmp_path, two_rank_checkpoints, plugin_class):
    from shardwise.formats.dcp import read_metadata

    folder, single = two_rank_checkpoints
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"] and single.is_file()
    metadata = read_metadata(folder)
    split = [t for t in metadata.tensors.values() if len({c.file for c in t.chunks}) == 2]
    assert {t.path[0] for t in split} == {"state_dict", "optimizer_0"}  # weights and moments, half on each rank

    loaded = plugin_class().load_checkpoint(folder)
    assert _same_checkpoint(loaded, torch.load(single, weights_only=True))  # meta.pt, the model and the optimizer, merged

    from_file = _resumed(tmp_path / "file", plugin_class(), single, seed=1)
    from_dcp = _resumed(tmp_path / "dcp", plugin_class(), folder, seed=2)
    assert from_file["steps"] == [4, 5, 6, 7]
    assert _same(from_dcp, from_file)


def test_lightnings_fsdp_layout_is_read_too(tmp_path, two_rank_checkpoints):
    """FSDPStrategy(state_dict_type="sharded") saves as ModelParallelStrategy does but names the model
    state ``model``; it needs a GPU, so its layout is written here with Lightning's own save helper."""
    from lightning_fabric.strategies.fsdp import _distributed_checkpoint_save

    _, single = two_rank_checkpoints
    checkpoint = torch.load(single, weights_only=True)
    folder = tmp_path / "fsdp.ckpt"
    folder.mkdir()
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    _distributed_checkpoint_save({"model": checkpoint["state_dict"], "optimizer_0": checkpoint["optimizer_states"][0]}, folder)
    torch.save(rest, folder / "meta.pt")
    assert _same_checkpoint(ShardwiseCheckpointIO().load_checkpoint(folder), checkpoint)

    torch.save({**rest, "state_dict": {}}, folder / "meta.pt")
    with pytest.raises(FormatError, match=rf"^{folder / 'meta.pt'}: holds 'state_dict', which the distributed checkpoint beside it holds too"):
        ShardwiseCheckpointIO().load_checkpoint(folder)


def test_pickles_in_a_dcp_need_the_opt_in_as_in_a_single_file(tmp_path, two_rank_checkpoints):
    import torch.distributed.checkpoint as dcp

    plugin = ShardwiseCheckpointIO()
    evil = tmp_path / "evil.ckpt"
    dcp.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"run": os.system}}, checkpoint_id=evil)
    refusal = rf"^{evil / '__0_0.distcp'}\[\d+:\d+\] \(object 'hyper_parameters.run'\): refused to load"
    with pytest.raises(UnsafeCheckpointError, match=refusal):
        plugin.load_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError, match=refusal):
        _fit(tmp_path / "run", plugin, max_steps=8, ckpt_path=evil)

    fraction = tmp_path / "fraction.ckpt"
    extra = {"ratio": Fraction(1, 3), "namespace": argparse.Namespace(depth=2, path=Path("data"))}
    dcp.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": extra}, checkpoint_id=fraction)
    with pytest.raises(UnsafeCheckpointError, match=rf"^{fraction / '__0_0.distcp'}\[\d+:\d+\] \(object 'hyper_parameters.ratio'\): refused"):
        plugin.load_checkpoint(fraction)
    with pytest.raises(UnsafeCheckpointError, match="hyper_parameters.ratio"):  # Lightning's weights_only=True wins over trust
        ShardwiseCheckpointIO(trust_pickle=True).load_checkpoint(fraction, weights_only=True)
    assert ShardwiseCheckpointIO(trust_pickle=True).load_checkpoint(fraction)["hyper_parameters"] == extra

    folder = _copy(two_rank_checkpoints[0], tmp_path)  # Lightning's meta.pt is read as a single file is
    meta = torch.load(folder / "meta.pt", weights_only=True)
    meta["hyper_parameters"]["ratio"] = Fraction(1, 3)
    torch.save(meta, folder / "meta.pt")
    with pytest.raises(UnsafeCheckpointError, match=rf"^{folder / 'meta.pt'}: refused to load"):
        plugin.load_checkpoint(folder)
    assert ShardwiseCheckpointIO(trust_pickle=True).load_checkpoint(folder)["hyper_parameters"]["ratio"] == Fraction(1, 3)


def test_a_damaged_dcp_is_a_format_error_naming_the_file(tmp_path, two_rank_checkpoints):
    plugin = ShardwiseCheckpointIO()
    truncated = _copy(two_rank_checkpoints[0], tmp_path / "truncated")
    data = truncated / "__1_0.distcp"
    os.truncate(data, data.stat().st_size - 100)
    with pytest.raises(FormatError, match=rf"^{truncated / '.metadata'}: not a readable DCP checkpoint: __1_0.distcp is truncated"):
        plugin.load_checkpoint(truncated)
    with pytest.raises(FormatError, match="__1_0.distcp is truncated"):
        _fit(tmp_path / "run", plugin, max_steps=8, ckpt_path=truncated)

    from shardwise.formats.dcp import read_metadata

    overwritten = _copy(two_rank_checkpoints[0], tmp_path / "overwritten")
    metadata = read_metadata(overwritten)
    chunk = metadata.tensors["state_dict.net.0.weight"].chunks[-1]
    with open(overwritten / chunk.file, "r+b") as f:  # the chunk's torch.save zip, its header gone
        f.seek(chunk.offset)
        f.write(b"\0" * 64)
    with pytest.raises(FormatError, match=rf"^{overwritten / chunk.file}\[{chunk.offset}:{chunk.offset + chunk.length}\] \(chunk at \[\d+, 0\] of 'state_dict.net.0.weight'\)"):
        plugin.load_checkpoint(overwritten)
    obj = metadata.objects["optimizer_0.param_groups.0.lr"]
    with open(overwritten / obj.file, "r+b") as f:
        f.seek(obj.offset)
        f.write(b"\0" * 64)
    with pytest.raises(FormatError, match=rf"^{overwritten / obj.file}\[{obj.offset}:{obj.offset + obj.length}\] \(object 'optimizer_0.param_groups.0.lr'\): not a readable torch file"):
        plugin.load_checkpoint(overwritten)


def test_more_damage_is_a_format_error_naming_the_file(tmp_path, two_rank_checkpoints):
    """Found by flipping bytes: a damaged member of a chunk's zip, a metadata pickle asking for 1 PiB,
    and a Lightning folder without its meta.pt (an interrupted save) are format errors, not tracebacks."""
    import struct

    from shardwise.formats.dcp import read_metadata

    plugin = ShardwiseCheckpointIO()
    damaged = _copy(two_rank_checkpoints[0], tmp_path / "byteorder")
    chunk = read_metadata(damaged).tensors["state_dict.net.0.weight"].chunks[0]
    with open(damaged / chunk.file, "r+b") as f:
        f.seek(chunk.offset)
        data = f.read(chunk.length)
        at = data.index(b"little")  # the byteorder record: its CRC no longer matches
        f.seek(chunk.offset + at)
        f.write(b"LITTLE")
    with pytest.raises(FormatError, match=rf"^{damaged / chunk.file}\[.*byteorder record cannot be read"):
        plugin.load_checkpoint(damaged)
    huge = _copy(two_rank_checkpoints[0], tmp_path / "huge")
    (huge / ".metadata").write_bytes(b"\x80\x05\x8e" + struct.pack("<Q", 1 << 50))
    with pytest.raises(FormatError, match=rf"^{huge / '.metadata'}: "):
        plugin.load_checkpoint(huge)
    no_meta = _copy(two_rank_checkpoints[0], tmp_path / "no_meta")
    (no_meta / "meta.pt").unlink()
    with pytest.raises(FormatError, match=rf"^{no_meta / 'meta.pt'}: missing"):
        plugin.load_checkpoint(no_meta)
