"""Object storage: every command and API on s3:// URLs, against a real S3-compatible server
(moto's standalone server, started on 127.0.0.1 for the session)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
import torch

import s3fs  # the test extra installs it: without s3fs this file fails, it is never skipped

import shardwise
from shardwise.cli import run as cli
from shardwise.storage import transfer
from shardwise.storage.urls import Remote

from conftest import tiny_llama
from test_training_distributed import _continuations, run_ranks



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; the AWS_* environment points every client (and child process) at it."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # a client made before (without these credentials) must not be reused
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.1)
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.terminate()
        server.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket's URL."""
    name = f"sw-{uuid.uuid4().hex[:12]}"
    remote = Remote(f"s3://{name}")
    remote.fs.mkdir(name)
    return f"s3://{name}"


def _objects(url: str) -> dict[str, int]:
    kind, files = transfer.listing(Remote(url))
    return {rel: info["size"] for rel, info in files.items()}


def _multipart_uploads(url: str) -> list:
    remote = Remote(url)
    bucket = remote.path.split("/")[0]
    return remote.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def test_hf_to_remote_archive_and_back_is_bit_exact_and_names_urls(tmp_path, bucket, capsys):
    hf = tiny_llama(tmp_path / "hf", heads=8, kv_heads=2, hidden=64)
    assert cli(["convert", str(hf), f"{bucket}/models/hf", "--to", "hf", "-q"]) == 0
    assert "config.json" in _objects(f"{bucket}/models/hf")
    assert cli(["convert", f"{bucket}/models/hf", f"{bucket}/models/llama.nemo", "--tp", "2", "-q"]) == 0
    assert f"wrote {bucket}/models/llama.nemo (archive)" in capsys.readouterr().out
    assert cli(["convert", f"{bucket}/models/llama.nemo", str(tmp_path / "back"), "--to", "hf", "-q"]) == 0
    assert cli(["diff", str(hf), str(tmp_path / "back"), "-q"]) == 0
    assert cli(["diff", f"{bucket}/models/hf", f"{bucket}/models/llama.nemo", "-q"]) == 0
    capsys.readouterr()
    assert cli(["inspect", f"{bucket}/models/llama.nemo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == f"{bucket}/models/llama.nemo"
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("shardwise-fetch-*"))  # scratch copies are gone


def test_the_python_api_takes_urls(tmp_path, bucket):
    hf = tiny_llama(tmp_path / "hf")
    result = shardwise.convert(hf, f"{bucket}/m.safetensors")
    assert result.path == f"{bucket}/m.safetensors" and list(_objects(f"{bucket}/m.safetensors")) == [""]
    with shardwise.open(f"{bucket}/m.safetensors") as ckpt, shardwise.open(hf / "model.safetensors") as original:
        assert ckpt.path == f"{bucket}/m.safetensors"
        assert [i.name for i in ckpt.infos()] == [i.name for i in original.infos()]
        first = ckpt.infos()[0].name
        assert torch.equal(ckpt.tensors.read(first), original.tensors.read(first))
    assert shardwise.diff(f"{bucket}/m.safetensors", hf / "model.safetensors").equal
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    shardwise.save_to(state, f"{bucket}/state.nemo", config={"hidden": 3})
    restored = shardwise.restore_from(f"{bucket}/state.nemo")
    assert torch.equal(restored.state_dict["w"], state["w"])


def test_an_existing_output_needs_overwrite_and_a_replaced_folder_keeps_no_stale_objects(tmp_path, bucket, capsys):
    big = tiny_llama(tmp_path / "big", layers=4)
    small = tiny_llama(tmp_path / "small", layers=2)
    url = f"{bucket}/out"
    assert cli(["convert", str(big), url, "--to", "hf", "--max-shard-size", "100KB", "-q"]) == 0
    before = _objects(url)
    assert cli(["convert", str(small), url, "--to", "hf", "-q"]) == 2
    assert "output already exists; pass --overwrite" in capsys.readouterr().err and _objects(url) == before
    assert cli(["convert", str(small), url, "--to", "hf", "--overwrite", "-q"]) == 0
    after = _objects(url)
    assert "model.safetensors" in after and not any(name.startswith("model-0") for name in after)  # old shards deleted
    assert cli(["diff", url, str(small), "-q"]) == 0


def test_missing_and_damaged_remote_inputs_are_one_line_naming_the_url(tmp_path, bucket, capsys):
    assert cli(["inspect", f"{bucket}/nothing"]) == 2
    assert capsys.readouterr().err.strip() == f"shardwise: error: {bucket}/nothing: no such file or folder"
    hf = tiny_llama(tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    remote = Remote(f"{bucket}/cut.safetensors")
    remote.fs.pipe_file(remote.path, data[: len(data) // 2])
    capsys.readouterr()
    assert cli(["convert", f"{bucket}/cut.safetensors", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bucket}/cut.safetensors" in err and "shardwise-fetch" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_uploads_stream_in_parts_and_never_hold_a_file(tmp_path, bucket):
    part = 5 * 2**20
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(12 * part))
    remote = Remote(f"{bucket}/big.bin")
    tracemalloc.start()
    try:
        transfer.upload(local, remote.fs, remote.path, part_size=part)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * part < local.stat().st_size  # a few parts in flight, never the 60 MiB file
    info = remote.fs.info(remote.path)
    assert info["size"] == 12 * part and info["ETag"].strip('"').endswith("-12")  # a 12-part multipart upload
    assert remote.fs.cat_file(remote.path) == local.read_bytes()


def test_downloads_read_in_ranged_parts(tmp_path, bucket):
    part = 5 * 2**20
    data = os.urandom(12 * part + 123)
    remote = Remote(f"{bucket}/big.bin")
    remote.fs.pipe_file(remote.path, data)
    tracemalloc.start()
    try:
        transfer.download(remote.fs, remote.path, tmp_path / "big.bin", part_size=part)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * part < len(data) and (tmp_path / "big.bin").read_bytes() == data


def test_an_interrupted_upload_leaves_no_object_and_no_open_multipart_upload(tmp_path, bucket, monkeypatch):
    part = 5 * 2**20
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(4 * part))
    remote = Remote(f"{bucket}/big.bin")
    real_open, reads = open, []

    class FailingFile:  # the local file fails on its third read, after two parts went up
        def __init__(self, f):
            self.f = f

        def read(self, n):
            reads.append(n)
            if len(reads) == 3:
                raise KeyboardInterrupt
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(transfer, "open", lambda path, mode: FailingFile(real_open(path, mode)), raising=False)
    with pytest.raises(KeyboardInterrupt):
        transfer.upload(local, remote.fs, remote.path, part_size=part)
    assert not remote.fs.exists(remote.path) and _multipart_uploads(bucket) == []


def test_listings_page_past_1000_objects(tmp_path, bucket):
    remote = Remote(f"{bucket}/many")
    remote.fs.pipe({f"{remote.path}/f{i:05d}": b"x" * (i % 7) for i in range(1234)})
    kind, files = transfer.listing(remote)
    assert kind == "folder" and len(files) == 1234 and files["f01233"]["size"] == 1233 % 7


def test_save_and_load_checkpoint_with_retention_and_async(bucket):
    root = f"{bucket}/run"
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    for step in range(3):
        shardwise.save_checkpoint(root, model=model, optimizer=optimizer, user_content={"step": step}, num_kept_ckpts=2)
    assert sorted({rel.split("/")[0] for rel in _objects(root)}) == ["checkpoint_2", "checkpoint_3"]
    tag = _objects(f"{root}/checkpoint_3")
    manifest = json.loads(Remote(f"{root}/checkpoint_3/shardwise.json").fs.cat_file(Remote(f"{root}/checkpoint_3/shardwise.json").path))
    assert {f["name"]: f["size"] for f in manifest["files"]} == {k: v for k, v in tag.items() if k not in ("shardwise.json", "done", "checkpoint")}
    fresh, fresh_opt = torch.nn.Linear(16, 16), None
    fresh_opt = torch.optim.Adam(fresh.parameters())
    assert shardwise.load_checkpoint(root, model=fresh, optimizer=fresh_opt) == {"step": 2}
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    model.weight.data += 1
    shardwise.save_checkpoint(root, "async", model=model, async_save=True, num_kept_ckpts=1)
    shardwise.finalize_checkpoint()
    assert sorted({rel.split("/")[0] for rel in _objects(root)}) == ["async"]
    assert shardwise.load_checkpoint(root, model=fresh) is None and torch.equal(fresh.weight, model.weight)


def test_a_checkpoint_of_more_than_1000_files_round_trips(bucket):
    """xser writes one file per tensor: 1100 tensors make a tag of more than 1000 objects."""
    model = {f"p{i}": torch.full((2,), float(i)) for i in range(1100)}
    shardwise.save_checkpoint(f"{bucket}/run", "many", model=model, encoding="xser")
    assert len(_objects(f"{bucket}/run/many")) > 1100
    loaded: dict = {}
    shardwise.load_checkpoint(f"{bucket}/run", model=loaded)
    assert loaded.keys() == model.keys() and all(torch.equal(loaded[k], v) for k, v in model.items())


_KILLED_SAVE = """
import os, signal, sys, torch, shardwise
from shardwise.training import remote
real = remote.upload_all
def upload_then_die(pairs, fs, *a, **k):  # the first file reaches the store, then the process is killed mid-save
    pairs = list(pairs)
    real(pairs[:1], fs, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
remote.upload_all = upload_then_die
shardwise.save_checkpoint(sys.argv[1], "killed", model={"w": torch.ones(4)}, optimizer={"s": torch.zeros(4)})
"""


def test_a_save_killed_mid_upload_leaves_the_last_good_checkpoint_and_is_cleaned_up(tmp_path, bucket):
    root = f"{bucket}/run"
    shardwise.save_checkpoint(root, "good", model={"w": torch.zeros(4)})
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, root], stderr=subprocess.PIPE, text=True)
    assert killed.wait(120) == -9, killed.stderr.read()
    import tempfile

    scratch = list(Path(tempfile.gettempdir()).glob(f"shardwise-save-{killed.pid}-*"))
    assert len(scratch) == 1  # the killed process left its scratch copy behind
    assert "killed/checkpoint" in _objects(root) and "killed/done" not in _objects(root)  # half a tag, never complete
    loaded: dict = {}
    shardwise.load_checkpoint(root, model=loaded)
    assert torch.equal(loaded["w"], torch.zeros(4))  # the killed save is passed over
    shardwise.save_checkpoint(root, "next", model={"w": torch.full((4,), 2.0)}, num_kept_ckpts=1)
    assert sorted({rel.split("/")[0] for rel in _objects(root)}) == ["next"]  # retention removed both older tags
    assert not scratch[0].exists()  # the next save swept it


def test_a_failed_save_deletes_what_it_uploaded(bucket, monkeypatch):
    from shardwise.training import remote

    root = f"{bucket}/run"
    shardwise.save_checkpoint(root, "good", model={"w": torch.zeros(4)})
    real = remote.upload_all

    def fail_after_one(pairs, fs, *a, **k):
        pairs = list(pairs)
        real(pairs[:1], fs, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(remote, "upload_all", fail_after_one)
    with pytest.raises(OSError, match="No space left"):
        shardwise.save_checkpoint(root, "bad", model={"w": torch.ones(4)}, optimizer={"s": torch.ones(4)})
    assert sorted({rel.split("/")[0] for rel in _objects(root)}) == ["good"]


def test_world_4_tp2_dp2_saves_to_s3_and_resumes_with_the_exact_loss(tmp_path, bucket):
    common = {"tp": 2, "pp": 1, "root": f"{bucket}/ckpt"}
    results = run_ranks(tmp_path / "run", 4, [
        {**common, "seed": 0, "steps_before": 3, "save": True, "async": True, "encoding": "safetensors", "steps_after": 3},
        {**common, "seed": 9, "load": True, "steps_after": 3},
    ])
    pairs = _continuations(results)
    assert len(pairs) == 4 and all(len(a) == 3 and a == b for a, b in pairs)
    files = _objects(f"{bucket}/ckpt/checkpoint_1")
    assert {"done", "shardwise.json", "model/dp_rank_00_tp_rank_01_pp_rank_00.safetensors"} <= set(files)


@pytest.mark.parametrize("plugin_name", ["ShardwiseCheckpointIO", "AsyncShardwiseCheckpointIO"])
def test_lightning_saves_to_s3_resumes_from_it_and_removes_old_checkpoints(tmp_path, bucket, plugin_name):
    from pytorch_lightning.callbacks import ModelCheckpoint
    from test_lightning_io import _fit, _same, _state

    import shardwise.lightning as lightning

    plugin = getattr(lightning, plugin_name)
    straight, model = _fit(tmp_path / "straight", max_steps=8, callbacks=[])
    uninterrupted = _state(straight, model)
    keep_last = [ModelCheckpoint(dirpath=f"{bucket}/ckpts", every_n_train_steps=2, save_top_k=1, monitor="step", mode="max")]
    _fit(tmp_path / "a", plugin(), max_steps=4, callbacks=keep_last)
    names = {rel.split("/")[0] for rel in _objects(f"{bucket}/ckpts")}
    assert len(names) == 1 and "step=4" in names.pop()  # step 2's checkpoint was removed through the plugin
    saved = next(iter(keep_last[0].best_k_models))
    assert saved.startswith(f"{bucket}/ckpts/") and {"shardwise.json", "checkpoint.safetensors"} == set(_objects(saved))
    trainer, resumed = _fit(tmp_path / "b", plugin(), max_steps=8, ckpt_path=saved, callbacks=[], seed=123)
    assert resumed.steps_seen == [4, 5, 6, 7] and _same(_state(trainer, resumed), uninterrupted)
    with pytest.raises(shardwise.OutputExistsError, match="not a checkpoint"):
        other = Remote(f"{bucket}/data/file.txt")
        other.fs.pipe_file(other.path, b"keep me")
        plugin().save_checkpoint({"x": torch.ones(1)}, f"{bucket}/data")
    assert _objects(f"{bucket}/data") == {"file.txt": 7}


def test_clip_infer_reads_an_archive_and_an_image_from_s3(tmp_path, bucket):
    from clip_builders import TEXTS, make_image, reference_probs, tiny_clip
    from shardwise.verify.clip_infer import clip_infer

    hf = tiny_clip(tmp_path / "clip")
    image = make_image(tmp_path / "image.png")
    assert cli(["convert", str(hf), f"{bucket}/clip.nemo", "--tp", "2", "-q"]) == 0
    Remote(f"{bucket}/image.png").fs.put_file(str(image), Remote(f"{bucket}/image.png").path)
    scores = clip_infer(f"{bucket}/clip.nemo", f"{bucket}/image.png", TEXTS)
    assert scores.archive == f"{bucket}/clip.nemo" and scores.image == f"{bucket}/image.png" and scores.tp == 2
    assert max(abs(a - b) for a, b in zip(scores.probabilities, reference_probs(hf, image, TEXTS), strict=True)) <= 1e-5


def test_overwrite_never_swaps_a_folder_for_a_file_and_an_interrupted_one_leaves_no_mixed_model(tmp_path, bucket, monkeypatch, capsys):
    a, b = tiny_llama(tmp_path / "a", seed=1), tiny_llama(tmp_path / "b", seed=2)
    keep = Remote(f"{bucket}/data/important.txt")
    keep.fs.pipe_file(keep.path, b"keep me")
    assert cli(["convert", str(a / "model.safetensors"), f"{bucket}/data", "--to", "safetensors", "--overwrite", "-q"]) == 2
    assert "exists and is a folder" in capsys.readouterr().err and _objects(f"{bucket}/data") == {"important.txt": 7}
    url = f"{bucket}/nd"
    assert cli(["convert", str(a), url, "--to", "nemo-dir", "--tp", "2", "-q"]) == 0
    real = transfer.upload

    def fail_on_rank_1(local, fs, rpath, *args, **kwargs):
        if "mp_rank_01" in rpath:
            raise OSError(5, "connection reset")
        return real(local, fs, rpath, *args, **kwargs)

    monkeypatch.setattr(transfer, "upload", fail_on_rank_1)
    assert cli(["convert", str(b), url, "--to", "nemo-dir", "--tp", "2", "--overwrite", "-q"]) == 2
    left = _objects(url)
    assert not any(name.startswith("mp_rank_01") for name in left)  # nothing of the old output is left beside the new
    assert not {"model_config.yaml", "shardwise.json"} & set(left)  # and what is there does not read as a model
    monkeypatch.undo()
    assert cli(["convert", url, str(tmp_path / "out"), "--to", "hf", "-q"]) == 2


def test_a_complete_remote_tag_is_not_saved_over_and_an_incomplete_one_is(bucket):
    root = f"{bucket}/run"
    shardwise.save_checkpoint(root, "latest", model={"w": torch.zeros(2)})
    with pytest.raises(shardwise.OutputExistsError, match="save under a new tag, or remove it first"):
        shardwise.save_checkpoint(root, "latest", model={"w": torch.ones(2)})
    loaded: dict = {}
    shardwise.load_checkpoint(root, model=loaded)
    assert torch.equal(loaded["w"], torch.zeros(2))
    done = Remote(f"{root}/latest/done")
    done.fs.rm(done.path)  # as a save killed before its end leaves it
    shardwise.save_checkpoint(root, "latest", model={"w": torch.ones(2)})
    shardwise.load_checkpoint(root, model=loaded)
    assert torch.equal(loaded["w"], torch.ones(2))


def test_folder_marker_keys_file_urls_and_lazy_reads_after_open(tmp_path, bucket):
    hf = tiny_llama(tmp_path / "hf")
    url = f"{bucket}/hf"
    assert cli(["convert", str(hf), url, "--to", "hf", "--max-shard-size", "20KB", "-q"]) == 0
    marker = Remote(f"{url}/")
    marker.fs.call_s3("put_object", Bucket=bucket[5:], Key="hf/", Body=b"")  # what consoles create for a "folder"
    tensors = shardwise.open(url).tensors  # the checkpoint object itself is dropped at once
    import gc

    gc.collect()
    with shardwise.open(hf) as original:
        assert all(torch.equal(tensors.read(k), original.tensors.read(k)) for k in original.tensors.keys())
    out = tmp_path / "via-file-url.safetensors"
    shardwise.convert(f"file://{hf / 'model.safetensors'}", f"file://{out}")
    assert out.is_file() and shardwise.diff(out, hf / "model.safetensors").equal


def test_a_refused_completion_aborts_the_multipart_upload(tmp_path, bucket, monkeypatch):
    part = 5 * 2**20
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(3 * part))
    remote = Remote(f"{bucket}/big.bin")

    def refuse(self):
        raise OSError(5, "completion refused")

    monkeypatch.setattr(s3fs.core.S3File, "commit", refuse)
    with pytest.raises(OSError, match="completion refused"):
        transfer.upload(local, remote.fs, remote.path, part_size=part)
    assert not remote.fs.exists(remote.path) and _multipart_uploads(bucket) == []


def test_a_lightning_save_cut_before_its_manifest_is_replaced_by_the_next(tmp_path, bucket):
    from shardwise.lightning import ShardwiseCheckpointIO

    left = Remote(f"{bucket}/ckpts/last.ckpt/checkpoint.safetensors")
    left.fs.pipe_file(left.path, b"half a payload")
    plugin = ShardwiseCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, f"{bucket}/ckpts/last.ckpt")
    assert torch.equal(plugin.load_checkpoint(f"{bucket}/ckpts/last.ckpt")["state_dict"]["w"], torch.ones(2))


def test_inspect_of_a_url_fetches_safetensors_headers_only(tmp_path, bucket, monkeypatch, capsys):
    hf = tiny_llama(tmp_path / "hf", layers=4)
    url = f"{bucket}/hf"
    assert cli(["convert", str(hf), url, "--to", "hf", "--max-shard-size", "60KB", "-q"]) == 0
    fetched = []
    real = transfer.download
    monkeypatch.setattr(transfer, "download", lambda fs, rpath, *a, **k: (fetched.append(rpath), real(fs, rpath, *a, **k))[1])
    capsys.readouterr()
    assert cli(["inspect", url, "--json", "--all"]) == 0
    remote_report = json.loads(capsys.readouterr().out)
    assert fetched and not any(name.endswith(".safetensors") for name in fetched)  # configs and the index, whole
    assert cli(["convert", url, str(tmp_path / "local"), "--to", "hf", "-q"]) == 0  # the same folder, whole, locally
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "local"), "--json", "--all"]) == 0
    local_report = json.loads(capsys.readouterr().out)
    for report in (remote_report, local_report):
        report.pop("path"), report.pop("files")
    assert remote_report == local_report and remote_report["num_tensors"] == 39
