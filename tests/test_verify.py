"""verify_logits: a real TP x PP forward (gloo, one process per rank) on converted shards against transformers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from shardwise.errors import FormatError, LayoutError, OptionError
from shardwise.reshard.convert import convert_layout
from shardwise.verify.logits import FAULT_ENV, VerifyError, verify_logits


ATOL = 1e-4


def _hf_model(folder: Path, *, heads=8, kv_heads=2, layers=3, vocab=100, tied=False, seed=0, **extra) -> Path:
    """A tiny random Llama saved in fp32. Weights are larger than HF's init and the norms are not
    ones, so a misplaced head, replica or norm changes the logits far beyond the tolerance."""

    def perturb_norms(model) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)

    return tiny_llama(
        folder, hidden=64, intermediate=96, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab, tied=tied, seed=seed,
        prepare=perturb_norms, rms_norm_eps=1e-6, initializer_range=0.15, **extra,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify-models")
    return {
        "gqa": _hf_model(root / "gqa"),  # 8 query heads, 2 KV heads, 3 layers (PP=2 splits 1 + 2)
        "mha": _hf_model(root / "mha", heads=4, kv_heads=4, layers=4, vocab=128, seed=1),
        "tied": _hf_model(root / "tied", layers=4, tied=True, seed=2),
    }


@pytest.fixture(scope="module")
def kv_replicated(models, tmp_path_factory) -> Path:
    """The GQA model as nxdt TP=4 with --qkv-linear and KV heads replicated twice (K0 K1 K0 K1)."""
    out = tmp_path_factory.mktemp("verify-kv") / "nxdt"
    convert_layout(models["gqa"], out, to="nxdt", tp=4, qkv_linear=True, kv_multiplier=2)
    return out


def _drop_manifest(out: Path) -> None:
    """As NxD writes it: no shardwise.json, so no config; verify takes the reference's config.json."""
    (out / "shardwise.json").unlink()


def _drop_hf_config(out: Path) -> None:
    """A NeMo folder with only model_config.yaml: the vocabulary is known padded (128 x TP), logits are trimmed."""
    (out / "shardwise.json").unlink()
    for extra in out.glob("*_config.json"):
        extra.unlink()


CASES = {  # model, convert_layout options, output suffix, change before verify
    "nxdt-tp2-pp2": ("gqa", dict(to="nxdt", tp=2, pp=2), "", None),
    "nxdt-tp2-fuse-qkv-no-manifest": ("gqa", dict(to="nxdt", tp=2, fuse_qkv=True), "", _drop_manifest),
    "nxdt-xser-tp2-pp2-no-manifest": ("gqa", dict(to="nxdt", tp=2, pp=2, qkv_linear=True, weights_format="xser"), "", _drop_manifest),
    "megatron-gqa-tp2-pp2": ("gqa", dict(to="nxdt", style="megatron", tp=2, pp=2), "", None),
    "megatron-mha-tp2-fused": ("mha", dict(to="nxdt", style="megatron", tp=2), "", None),
    "archive-tp2-pp2": ("gqa", dict(to="archive", tp=2, pp=2), ".nemo", None),
    "nemo-dir-tp2-padded-vocab": ("mha", dict(to="nemo-dir", tp=2), "", _drop_hf_config),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_layouts_give_the_reference_logits(case, models, tmp_path):
    model, options, suffix, change = CASES[case]
    out = tmp_path / f"out{suffix}"
    convert_layout(models[model], out, **options)
    if change:
        change(out)
    report = verify_logits(out, models[model], seq_len=12, batch=2, seed=3)
    assert report.passed, report.as_dict()
    assert report.max_abs_diff <= ATOL
    assert (report.tp, report.pp) == (options["tp"], options.get("pp", 1))
    vocab = 128 if model == "mha" else 100
    assert report.shape == (2, 12, vocab)
    assert report.as_dict()["passed"] is True and report.as_dict()["shape"] == [2, 12, vocab]


def test_kv_replicated_tp4_passes_and_explicit_tokens_are_used(kv_replicated, models):
    tokens = [[5, 17, 99, 0, 42, 42, 7]]
    report = verify_logits(kv_replicated, models["gqa"], tokens=tokens)
    assert report.passed, report.as_dict()
    assert (report.style, report.tp, report.pp, report.kv_multiplier, report.qkv) == ("nxdt", 4, 1, 2, "linear")
    assert report.shape == (1, 7, 100)


def _swap(folder: Path, a: int, b: int, suffixes: tuple[str, ...]) -> None:
    files = {r: folder / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt" for r in (a, b)}
    state = {r: torch.load(f, weights_only=True) for r, f in files.items()}
    names = [n for n in state[a] if n.endswith(suffixes)]
    assert names
    for name in names:
        state[a][name], state[b][name] = state[b][name], state[a][name]
    for r, f in files.items():
        torch.save(state[r], f)
    (folder / "shardwise.json").unlink()  # as NxD writes it: under the manifest, rewritten shards are damage, refused before verify runs


def test_kv_replicas_in_the_wrong_order_fail(kv_replicated, models, tmp_path):
    """K0 K0 K1 K1 instead of NxD's tiled K0 K1 K0 K1: same shapes, opens and round-trips, wrong for TP."""
    bad = tmp_path / "bad"
    shutil.copytree(kv_replicated, bad)
    _swap(bad, 1, 2, ("qkv_proj.weight_k", "qkv_proj.weight_v"))
    report = verify_logits(bad, models["gqa"])
    assert not report.passed
    assert report.max_abs_diff > 100 * ATOL, report.as_dict()


def test_permuted_query_heads_fail(models, tmp_path):
    out = tmp_path / "nxdt"
    convert_layout(models["gqa"], out, to="nxdt", tp=2, qkv_linear=True)
    f = out / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    state = torch.load(f, weights_only=True)
    name = "model.layers.1.self_attn.qkv_proj.weight_q"
    heads = state[name].view(4, 8, 64)  # rank 1's 4 query heads of head_dim 8
    state[name] = heads[[1, 0, 3, 2]].reshape(32, 64).clone()
    torch.save(state, f)
    (out / "shardwise.json").unlink()  # as NxD writes it (see _swap)
    report = verify_logits(out, models["gqa"])
    assert not report.passed
    assert report.max_abs_diff > 100 * ATOL, report.as_dict()


@pytest.mark.parametrize("pp", [2, 1])
def test_tied_embeddings(pp, models, tmp_path):
    out = tmp_path / "nxdt"
    convert_layout(models["tied"], out, to="nxdt", tp=2, pp=pp)
    last = out / "model" / f"dp_rank_00_tp_rank_00_pp_rank_{pp - 1:02d}.pt"
    assert ("lm_head.weight" in torch.load(last, weights_only=True)) == (pp > 1)  # a copy only when PP > 1
    report = verify_logits(out, models["tied"])
    assert report.passed and report.pp == pp, report.as_dict()


def test_unsharded_hf_folder_runs_as_one_rank(models):
    report = verify_logits(models["gqa"], models["gqa"], seq_len=5, batch=1)
    assert report.passed and (report.style, report.tp, report.pp) == ("hf", 1, 1)
    assert report.max_abs_diff <= 1e-5


def test_mismatched_reference_and_bad_inputs_are_refused(models, tmp_path):
    out = tmp_path / "nxdt"
    convert_layout(models["gqa"], out, to="nxdt", tp=2)
    with pytest.raises(LayoutError, match="vocabulary"):
        verify_logits(out, _hf_model(tmp_path / "vocab", vocab=104))
    with pytest.raises(LayoutError, match="layers 3"):
        verify_logits(out, _hf_model(tmp_path / "layers", layers=4))
    (tmp_path / "empty").mkdir()
    with pytest.raises((LayoutError, FormatError)):
        verify_logits(tmp_path / "empty", models["gqa"])
    with pytest.raises(FormatError, match="config.json"):
        verify_logits(out, tmp_path / "empty")
    with pytest.raises(OptionError, match=r"\[0, 100\)"):
        verify_logits(out, models["gqa"], tokens=[[1, 100]])
    with pytest.raises(OptionError):
        verify_logits(out, models["gqa"], seq_len=0)


def test_a_failing_rank_raises_in_the_parent(models, tmp_path, monkeypatch):
    out = tmp_path / "nxdt"
    convert_layout(models["gqa"], out, to="nxdt", tp=2)
    monkeypatch.setenv(FAULT_ENV, "1")
    started = time.monotonic()
    with pytest.raises(VerifyError, match=r"rank 1 .*injected failure"):
        verify_logits(out, models["gqa"], timeout=60)
    assert time.monotonic() - started < 30  # rank 0, blocked in a collective, was stopped


def test_a_hanging_rank_times_out(models, tmp_path, monkeypatch):
    out = tmp_path / "nxdt"
    convert_layout(models["gqa"], out, to="nxdt", tp=2)
    monkeypatch.setenv(FAULT_ENV, "1:hang")
    started = time.monotonic()
    with pytest.raises(VerifyError):
        verify_logits(out, models["gqa"], timeout=3)
    assert time.monotonic() - started < 20


def test_archive_keeps_a_non_default_rope_theta(tmp_path):
    hf = _hf_model(tmp_path / "hf", rope_theta=5000.0)
    out = tmp_path / "out.nemo"
    convert_layout(hf, out, to="archive", tp=2)
    assert verify_logits(out, hf).passed
