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
    unknown = "not a checkpoint shardwise reads"
    cases = {
        truncated: "not a readable torch file, or truncated", garbage: rf"{unknown} \(a file that does not start as a torch file\)",
        empty: rf"{unknown} \(an empty file\)", folder: rf"{unknown} \(a folder without shardwise.json or .metadata\)",
        tmp_path / "missing.ckpt": "no such checkpoint", broken / "shardwise.json": "the checkpoint's manifest is not valid JSON",
        dcp_folder: r"a PyTorch distributed checkpoint \(DCP\) folder",
    }
    for path, message in cases.items():
        target = broken if path.name == "shardwise.json" else path
        with pytest.raises(FormatError, match=rf"^{path}: {message}"):
            plugin.load_checkpoint(target)
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
    with pytest.raises(OptionError, match="local paths only"):
        plugin.save_checkpoint(_checkpoint(2), "s3://bucket/e.ckpt")
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
