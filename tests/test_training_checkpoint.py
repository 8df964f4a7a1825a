"""save_checkpoint / load_checkpoint in one process: NxD's layout, exact resume, retention by save order,
checksummed loads, and a save killed at random moments never costing the newest complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import pytest
import torch

import shardwise
from shardwise.errors import FormatError, IntegrityError, UnsafeCheckpointError


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _train(model, optimizer, scheduler, steps, start):
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _setup(seed=0):
    model = _model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


@pytest.mark.parametrize("encoding", ["pt", "safetensors", "xser"])
def test_resume_continues_the_loss_exactly(tmp_path, encoding):
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 5, 0)
    tag = shardwise.save_checkpoint(
        tmp_path, "step_5", model=model, optimizer=optimizer, scheduler=scheduler, user_content={"step": 5}, encoding=encoding,
    )
    expected = _train(model, optimizer, scheduler, 5, 5)

    model2, optimizer2, scheduler2 = _setup(seed=123)  # different initial weights: the load must overwrite them
    user = shardwise.load_checkpoint(tmp_path, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert tag == "step_5" and user == {"step": 5}
    assert _train(model2, optimizer2, scheduler2, 5, user["step"]) == expected


def test_the_tag_holds_nxd_names_loadable_by_torch_and_a_manifest_with_checksums(tmp_path):
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 1, 0)
    shardwise.save_checkpoint(tmp_path, "t", model=model, optimizer=optimizer, scheduler=scheduler, user_content={"a": 1})
    tag = tmp_path / "t"
    assert sorted(p.relative_to(tag).as_posix() for p in tag.rglob("*") if p.is_file()) == [
        "checkpoint", "done", "model/dp_rank_00_tp_rank_00_pp_rank_00.pt", "optim/dp_rank_00_tp_rank_00_pp_rank_00.pt",
        "scheduler.pt", "shardwise.json", "user_content.pt",
    ]
    assert (tag / "checkpoint").read_text() == "1" and (tag / "done").read_text() == "1"
    state = torch.load(tag / "model/dp_rank_00_tp_rank_00_pp_rank_00.pt", weights_only=True)  # as NxD's loader reads it
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    manifest = json.loads((tag / "shardwise.json").read_text())
    assert manifest["sequence"] == 1 and manifest["tag"] == "t" and manifest["layout"] == {"tp": 1, "pp": 1, "dp": 1, "optimizer": "replicated"}
    for entry in manifest["files"]:
        data = (tag / entry["name"]).read_bytes()
        assert (len(data), f"{zlib.crc32(data):08x}") == (entry["size"], entry["crc32"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_retention_keeps_the_newest_by_save_order_and_spares_a_newer_incomplete_tag(tmp_path):
    model = _model()
    for name in ("d", "c", "b", "a"):  # save order is not name order
        shardwise.save_checkpoint(tmp_path, name, model=model)
    old = time.time() + 3600
    for name in ("d", "c"):  # file times lie: the oldest saves look newest
        os.utime(tmp_path / name / "done", (old, old))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "checkpoint").write_text("1")  # a save in progress elsewhere, no done yet
    time.sleep(0.01)
    shardwise.save_checkpoint(tmp_path, "e", model=model, num_kept_ckpts=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "e", "z"]
    # an interrupted removal (done already gone) is finished by the next retention pass
    (tmp_path / "a" / "done").unlink()
    shardwise.save_checkpoint(tmp_path, "f", model=model, num_kept_ckpts=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "f", "z"]


def test_the_default_tag_is_the_newest_complete_and_damage_is_named(tmp_path):
    model = _model()
    first = shardwise.save_checkpoint(tmp_path, model=model, user_content=1)
    with torch.no_grad():
        model[0].weight.add_(1)
    second = shardwise.save_checkpoint(tmp_path, model=model, user_content=2)
    assert (first, second) == ("checkpoint_1", "checkpoint_2")
    assert shardwise.load_checkpoint(tmp_path) == 2
    weights = tmp_path / second / "model/dp_rank_00_tp_rank_00_pp_rank_00.pt"
    data = bytearray(weights.read_bytes())
    data[-200] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="dp_rank_00_tp_rank_00_pp_rank_00.pt: CRC-32 [0-9a-f]{8} does not match"):
        shardwise.load_checkpoint(tmp_path, model=_model())
    # truncation makes the newest incomplete; the older one is taken, with a warning
    weights.write_bytes(bytes(data[:-100]))
    with pytest.warns(UserWarning, match="checkpoint_2: marked done but its files do not match"):
        assert shardwise.load_checkpoint(tmp_path) == 1
    with pytest.raises(IntegrityError, match="checkpoint_2: checkpoint is incomplete"):
        shardwise.load_checkpoint(tmp_path, "checkpoint_2")


def test_user_content_with_arbitrary_classes_needs_the_opt_in(tmp_path):
    from fractions import Fraction

    shardwise.save_checkpoint(tmp_path, "t", user_content={"lr_scale": Fraction(1, 3)})  # a class torch's weights_only refuses
    with pytest.raises(UnsafeCheckpointError, match="user_content.pt: refused to load"):
        shardwise.load_checkpoint(tmp_path)
    assert shardwise.load_checkpoint(tmp_path, trust_pickle=True) == {"lr_scale": Fraction(1, 3)}


def test_bad_arguments_and_empty_folders_are_clear(tmp_path):
    with pytest.raises(FormatError, match="holds no complete checkpoint"):
        shardwise.load_checkpoint(tmp_path)
    with pytest.raises(shardwise.OptionError, match="num_kept_ckpts must be an int of at least 1"):
        shardwise.save_checkpoint(tmp_path, "t", model=_model(), num_kept_ckpts=0)
    with pytest.raises(shardwise.OptionError, match="plain folder name"):
        shardwise.save_checkpoint(tmp_path, "../t", model=_model())


_SAVER = textwrap.dedent("""
    import sys, torch, shardwise
    root, async_save = sys.argv[1], sys.argv[2] == "async"
    model = torch.nn.Linear(1024, 1024)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(step)
        shardwise.save_checkpoint(root, f"step_{step}", model=model, user_content={"step": step}, num_kept_ckpts=2, async_save=async_save)
        if async_save:
            model.weight.data.fill_(-1.0)  # the snapshot was taken: this must never reach the files
            shardwise.finalize_checkpoint()
        print(step, flush=True)
""")


def _kill_during_saves(root, delay, mode):
    child = subprocess.Popen([sys.executable, "-c", _SAVER, str(root), mode], stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()  # one save is complete
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize("mode, trials", [("sync", 12), ("async", 10)])
def test_a_save_killed_at_random_moments_never_costs_the_newest_complete_checkpoint(tmp_path, mode, trials):
    rng = random.Random(7)
    for trial in range(trials):
        root = tmp_path / f"run{trial}"
        _kill_during_saves(root, rng.uniform(0, 0.4), mode)
        model = torch.nn.Linear(1024, 1024)
        user = shardwise.load_checkpoint(root, model=model)  # verifies every CRC
        assert torch.all(model.weight == user["step"]), trial
        complete = [p for p in root.iterdir() if (p / "done").is_file() and not p.name.startswith(".")]
        assert 1 <= len(complete) <= 3, (trial, sorted(p.name for p in root.iterdir()))
        for tag in complete:
            assert shardwise.load_checkpoint(root, tag.name) is not None
        left = [p for p in root.iterdir() if p.name.startswith(".")]  # a staging folder the kill interrupted
        shardwise.save_checkpoint(root, "after", model=model)  # the next save clears it
        assert not any(p.exists() for p in left)


def test_a_write_that_fails_midway_raises_and_leaves_earlier_checkpoints_intact(tmp_path):
    script = textwrap.dedent("""
        import resource, signal, sys, torch, shardwise
        root = sys.argv[1]
        shardwise.save_checkpoint(root, "small", model=torch.nn.Linear(4, 4))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            shardwise.save_checkpoint(root, "big", model=torch.nn.Linear(1024, 1024))
        except Exception as e:
            print(type(e).__name__, e)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "File too large" in result.stdout and "earlier checkpoints are untouched" in result.stdout, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]
    shardwise.load_checkpoint(tmp_path, model=torch.nn.Linear(4, 4))


_ASYNC_FAILS = textwrap.dedent("""
    import resource, signal, sys, torch, shardwise
    root = sys.argv[1]
    shardwise.save_checkpoint(root, "small", model=torch.nn.Linear(4, 4), async_save=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    shardwise.finalize_checkpoint()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    shardwise.save_checkpoint(root, "big", model=torch.nn.Linear(1024, 1024), async_save=True)  # returns: the write fails later
    print("returned", flush=True)
    try:
        shardwise.{wait}
    except OSError as e:
        print("raised", e)
    shardwise.save_checkpoint(root, "after", model=torch.nn.Linear(4, 4), async_save=True)  # left to interpreter exit
""")


@pytest.mark.parametrize("wait", ["finalize_checkpoint()", "save_checkpoint(root, 'next', model=torch.nn.Linear(4, 4))"])
def test_an_async_error_is_raised_by_the_next_call_and_exit_waits_for_the_last_save(tmp_path, wait):
    script = _ASYNC_FAILS.replace("{wait}", wait)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "returned" and lines[1].startswith("raised") and "File too large" in lines[1], result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after", "small"]  # exit finished "after"; "big" left nothing
    for tag in ("small", "after"):
        shardwise.load_checkpoint(tmp_path, tag, model=torch.nn.Linear(4, 4))


def test_async_saves_snapshot_the_state_and_may_change_tag_names(tmp_path):
    model = _model()
    names = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.fill_(step)
        names.append(shardwise.save_checkpoint(tmp_path, f"checkpoint-{10 * step}", model=model, user_content=step, async_save=True, num_kept_ckpts=2))
        with torch.no_grad():
            model[0].weight.fill_(-1)  # after the call returns, training goes on
    shardwise.finalize_checkpoint()
    assert sorted(p.name for p in tmp_path.iterdir()) == names[1:]
    for step, name in enumerate(names[1:], start=1):
        restored = _model(seed=5)
        assert shardwise.load_checkpoint(tmp_path, name, model=restored) == step
        assert torch.all(restored[0].weight == step)


def test_async_staging_defers_the_copy_until_the_next_optimizer_step(tmp_path, monkeypatch):
    from shardwise.training import staging

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    _train(model, optimizer, scheduler, 3, 0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]

    copying = __import__("threading").Event()
    slow_run = staging.DeferredCopies.run

    def slow(self):  # the copy takes long: a step that did not wait would change what gets saved
        copying.set()
        time.sleep(0.5)
        slow_run(self)

    monkeypatch.setattr(staging.DeferredCopies, "run", slow)
    shardwise.save_checkpoint(tmp_path, "staged", model=model, optimizer=optimizer, scheduler=scheduler, async_save=True, async_staging=True)
    assert copying.wait(5)
    _train(model, optimizer, scheduler, 2, 3)  # forward passes update the batch-norm statistics: copied before the return
    shardwise.finalize_checkpoint()
    assert not optimizer._optimizer_step_pre_hooks  # the hook is gone once the save is over

    restored = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1))
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.01)
    shardwise.load_checkpoint(tmp_path, "staged", model=restored, optimizer=restored_optimizer)
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert all(torch.equal(restored_optimizer.state[p]["exp_avg"], m) for p, m in zip(restored.parameters(), saved_moments))


def test_async_staging_needs_an_async_save_and_the_optimizer_object(tmp_path):
    model, optimizer, _ = _setup()
    with pytest.raises(shardwise.errors.OptionError, match="needs async_save"):
        shardwise.save_checkpoint(tmp_path, model=model, optimizer=optimizer, async_staging=True)
    with pytest.raises(shardwise.errors.OptionError, match="optimizer object"):
        shardwise.save_checkpoint(tmp_path, model=model, optimizer=optimizer.state_dict(), async_save=True, async_staging=True)
    assert not list(tmp_path.iterdir())


def test_a_commit_that_fails_leaves_no_staging_folder_and_names_the_tag(tmp_path, monkeypatch):
    from shardwise.training import save

    shardwise.save_checkpoint(tmp_path, "a", model=_model())
    real = save.write_text_durably

    def full_disk(path, text):
        if path.name == "shardwise.json":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(save, "write_text_durably", full_disk)
    with pytest.raises(OSError, match="b: committing the checkpoint failed: No space left on device; earlier checkpoints are untouched"):
        shardwise.save_checkpoint(tmp_path, "b", model=_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(shardwise.OptionError, match="num_kept_ckpts must be an int of at least 1"):
        shardwise.save_checkpoint(tmp_path, "c", model=_model(), num_kept_ckpts="2")


def test_the_leader_refuses_a_layout_with_files_no_rank_wrote(tmp_path):
    from shardwise.training.save import SavePlan, _missing

    plan = SavePlan(tmp_path, "t", 1, tmp_path, "pt", {"tp": 2, "pp": 1, "dp": 2, "optimizer": "zero1"}, None)
    written = {"model/dp_rank_00_tp_rank_00_pp_rank_00.pt", "model/dp_rank_00_tp_rank_01_pp_rank_00.pt",
               "optim/dp_rank_00_tp_rank_00_pp_rank_00.pt", "optim/dp_rank_01_tp_rank_00_pp_rank_00.pt", "optim/dp_rank_00_tp_rank_01_pp_rank_00.pt"}
    assert _missing(plan, written) == {"optim/dp_rank_01_tp_rank_01_pp_rank_00.pt"}
    assert _missing(plan, {n for n in written if n.startswith("model/")}) == set()  # a model-only save is whole


def test_a_writer_thread_that_cannot_start_fails_the_save_and_leaves_no_step_waiting(tmp_path, monkeypatch):
    import threading

    from shardwise.training import background

    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, 1, 0)

    def no_thread(work):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(background, "submit", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        shardwise.save_checkpoint(tmp_path, "t", model=model, optimizer=optimizer, async_save=True, async_staging=True)
    stepped = threading.Thread(target=_train, args=(model, optimizer, scheduler, 1, 1), daemon=True)
    stepped.start()
    stepped.join(30)
    assert not stepped.is_alive(), "the optimizer step waits for a copy no thread will make"
    assert not optimizer._optimizer_step_pre_hooks and list(tmp_path.iterdir()) == []
