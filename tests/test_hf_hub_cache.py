"""--hf-model-name ORG/NAME: models read from a huggingface_hub cache built on disk here; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

import shardwise
from shardwise.hub import hub_cache_dir

from conftest import assert_same_tensors, listing, run_subprocess, tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V2 = "fedcba9876543210fedcba9876543210fedcba98"


def populate(cache: Path, name: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``folder`` out as huggingface_hub caches a download: blobs/, snapshots/<commit>/ links, refs/<ref>."""
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for sub in (repo / "blobs", snapshot, repo / "refs"):
        sub.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # the hub writes the hash with no newline
    return snapshot


def _llama_folder(folder: Path, seed: int) -> Path:
    tiny_llama(folder, seed=seed)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-models")
    return {"main": _llama_folder(root / "main", 0), "v2": _llama_folder(root / "v2", 1)}


@pytest.fixture
def hf_home(tmp_path, monkeypatch, models) -> Path:
    """An offline HF_HOME whose cache holds org/tiny-llama at main (and at tag v2, another commit)."""
    home = tmp_path / "hf-home"
    populate(home / "hub", "org/tiny-llama", models["main"], COMMIT)
    populate(home / "hub", "org/tiny-llama", models["v2"], COMMIT_V2, refs=("v2",))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _tensors(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_convert_from_the_cache_gives_the_tensors_and_files_of_the_folder(cli, hf_home, models, tmp_path):
    out = tmp_path / "out"
    result = cli("convert", "--hf-model-name", "org/tiny-llama", out, "--to", "hf")
    assert result.code == 0, result
    assert_same_tensors(_tensors(out), _tensors(models["main"]))
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(listing(out))
    assert not any(p.is_symlink() for p in out.iterdir())  # files, not links into the cache
    assert cli("diff", "--hf-model-name", "org/tiny-llama", out).code == 0


def test_revision_picks_a_tag_or_a_commit(cli, hf_home, models, tmp_path):
    for revision in ("v2", COMMIT_V2):
        out = tmp_path / revision
        assert cli("convert", "--hf-model-name", "org/tiny-llama", "--revision", revision, out, "--to", "safetensors").code == 0
        assert_same_tensors(load_file(out), _tensors(models["v2"]))


def test_inspect_and_the_python_api_resolve_the_same_snapshot(cli, hf_home):
    snapshot = hf_home / "hub" / "models--org--tiny-llama" / "snapshots" / COMMIT
    assert shardwise.hf_model_path("org/tiny-llama") == snapshot
    result = cli("inspect", "--hf-model-name", "org/tiny-llama", "--json")
    assert result.code == 0 and json.loads(result.out)["path"] == str(snapshot)


def test_nxdt_convert_takes_hf_model_name_from_the_cache(cli, hf_home, models, tmp_path):
    nx = tmp_path / "nx"
    result = cli("nxdt-convert", "--hf_model_name", "org/tiny-llama", "--output_dir", nx, "--tp_size", "2", "--convert_from_full_state")
    assert result.code == 0, result
    assert cli("diff", models["main"], nx).code == 0
    refused = cli("nxdt-convert", "--hf_model_name", "org/tiny-llama", "--output_dir", tmp_path / "full", "--convert_to_full_state")
    assert refused.code == 2 and "--input_dir" in refused.err


def test_verify_takes_its_reference_from_the_cache(cli, hf_home, models, tmp_path):
    nx = tmp_path / "nx"
    assert cli("convert", models["main"], nx, "--to", "nxdt", "--tp", "2").code == 0
    result = cli("verify", nx, "--hf-model-name", "org/tiny-llama", "--timeout", "120")
    assert result.code == 0 and "logits match" in result.out, result


def test_a_model_not_in_the_offline_cache_is_one_error_line_and_nothing_is_written(cli, hf_home, tmp_path):
    out = tmp_path / "out"
    result = cli("convert", "--hf-model-name", "org/missing", out, "--to", "hf")
    assert result.code == 2 and not out.exists()
    assert result.err.count("\n") == 1 and "org/missing" in result.err and "HF_HUB_OFFLINE" in result.err and "hf download org/missing" in result.err
    missing_revision = cli("inspect", "--hf-model-name", "org/tiny-llama", "--revision", "v3")
    assert missing_revision.code == 2 and "org/tiny-llama (revision v3)" in missing_revision.err


def test_an_unreachable_hub_is_one_error_line_naming_the_model(tmp_path, models):
    """A real process, online mode, a Hub that refuses connections: the hub client's own error path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "empty-home"), HF_ENDPOINT="http://127.0.0.1:9")
    out = tmp_path / "out"
    result = run_subprocess("convert", "--hf-model-name", "org/not-cached", out, "--to", "hf", env=env)
    assert result.code == 2 and not out.exists() and "Traceback" not in result.err, result
    assert result.err.count("\n") == 1 and "org/not-cached" in result.err and "could not be reached" in result.err


def test_online_mode_asks_the_hub_with_the_environment_token_and_falls_back_to_the_cache(hf_home, monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise huggingface_hub.errors.LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert shardwise.hf_model_path("org/tiny-llama", revision="v2").name == COMMIT_V2
    (repo_id, kwargs), = calls
    assert repo_id == "org/tiny-llama" and kwargs["token"] == "hf_from_env" and kwargs["revision"] == "v2"
    assert kwargs["cache_dir"] == str(hf_home / "hub") and "*.safetensors" in kwargs["allow_patterns"]
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(shardwise.HubError, match="org/elsewhere: not in the Hugging Face cache"):
        shardwise.hf_model_path("org/elsewhere")
    assert calls[-1][1]["token"] is False  # no stored login is used, and nothing prompts


@pytest.mark.parametrize("raised, message", [
    ("incomplete", "is incomplete"),
    ("disk full", "downloading into .* failed: No space left on device"),
])
def test_an_incomplete_snapshot_or_a_full_disk_is_not_covered_up_by_the_cache(hf_home, monkeypatch, raised, message):
    import errno

    import huggingface_hub

    def failing(repo_id, **kwargs):
        if raised == "incomplete":
            raise huggingface_hub.errors.IncompleteSnapshotError("2 files missing", snapshot_path="/nowhere")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(shardwise.HubError, match=rf"org/tiny-llama: {'the snapshot in .*' if raised == 'incomplete' else ''}{message}"):
        shardwise.hf_model_path("org/tiny-llama")  # cached: the old fall-back returned the snapshot anyway


@pytest.mark.parametrize("args, message", [
    (["convert", "--hf-model-name", "../../etc", "out"], "not a Hugging Face model name"),
    (["convert", "--hf-model-name", "org/tiny-llama", "--revision", "../../x", "out"], "not a branch, tag or commit"),
    (["convert", "--hf-model-name", "org/tiny-llama", "a", "b"], "takes the place of SRC"),
    (["convert", "only-one"], "missing argument DST"),
    (["convert", "a", "b", "--revision", "main"], "--revision applies to --hf-model-name"),
])
def test_bad_names_and_arguments_are_refused(cli, hf_home, tmp_path, args, message):
    result = cli(*args)
    assert result.code == 2 and message in result.err


def test_a_snapshot_cached_without_weights_names_the_model_folder(cli, hf_home, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text('{"model_type": "llama"}')
    populate(hf_home / "hub", "org/config-only", bare, COMMIT)
    result = cli("convert", "--hf-model-name", "org/config-only", tmp_path / "out", "--to", "hf")
    assert result.code == 2 and "models--org--config-only" in result.err and "no weights" in result.err


def test_cache_location_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"
