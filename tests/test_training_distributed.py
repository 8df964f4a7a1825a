"""save_checkpoint / load_checkpoint under torch.distributed (gloo, real processes): tensor-, pipeline-
and data-parallel ranks each write and read their own files, and training continues exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.distributed import ParallelCoords
from shardwise.errors import LayoutError
from shardwise.training.assign import files_to_write

RANKS = Path(__file__).with_name("training_ranks.py")


def run_ranks(folder: Path, world: int, phases: list[dict], timeout: float = 240) -> list[dict]:
    """Run the phases on ``world`` gloo processes; each rank's results, in rank order."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps({"world": world, "folder": str(folder), "phases": phases}))
    result = subprocess.run([sys.executable, str(RANKS), str(folder / "spec.json")], capture_output=True, text=True, timeout=timeout)
    errors = "\n".join(p.read_text() for p in sorted(folder.glob("error-*.txt")))
    assert result.returncode == 0, errors or result.stderr[-3000:]
    return [json.loads((folder / f"result-{rank}.json").read_text()) for rank in range(world)]


def _continuations(results, resumed_phase=1):
    """(losses after the save in the uninterrupted run, losses of the resumed run) per last-stage rank."""
    pairs = []
    for r in results:
        saved_after = len(r["phases"][0]["losses"]) - len(r["phases"][resumed_phase]["losses"])
        if r["phases"][0]["losses"]:
            pairs.append((r["phases"][0]["losses"][saved_after:], r["phases"][resumed_phase]["losses"]))
    return pairs


def _files(tag: Path) -> list[str]:
    return sorted(p.relative_to(tag).as_posix() for p in tag.rglob("*") if p.is_file())


@pytest.mark.parametrize("encoding, async_save", [("pt", True), ("safetensors", False), ("xser", "staged")])
def test_world_4_tp2_dp2_resumes_with_the_exact_loss(tmp_path, encoding, async_save):
    root = str(tmp_path / "ckpt")
    common = {"tp": 2, "pp": 1, "root": root}
    results = run_ranks(tmp_path / "run", 4, [
        {**common, "seed": 0, "steps_before": 3, "save": True, "async": async_save, "encoding": encoding, "steps_after": 3},
        {**common, "seed": 9, "load": True, "steps_after": 3},
    ])
    pairs = _continuations(results)
    assert len(pairs) == 4 and all(len(a) == 3 and a == b for a, b in pairs)  # bit-equal floats
    tag = Path(root) / "checkpoint_1"
    manifest = json.loads((tag / "shardwise.json").read_text())
    assert manifest["layout"] == {"tp": 2, "pp": 1, "dp": 2, "optimizer": "replicated"} and manifest["encoding"] == encoding
    suffix = ".safetensors" if encoding == "safetensors" else ".pt"
    states = [f"{kind}/dp_rank_00_tp_rank_0{t}_pp_rank_00{suffix}" for kind in ("model", "optim") for t in range(2)]
    assert set(states) <= set(_files(tag)) and {"checkpoint", "done", "scheduler.pt", "user_content.pt"} <= set(_files(tag))
    assert sorted(e["name"] for e in manifest["files"]) == sorted(set(_files(tag)) - {"shardwise.json", "done", "checkpoint"})
    if encoding == "pt":  # NxD's loader reads our shards: TP rank 1 holds its column-parallel half
        assert torch.load(tag / "model/dp_rank_00_tp_rank_01_pp_rank_00.pt", weights_only=True)["up"].shape == (8, 8)


def test_world_8_tp2_pp2_dp2_zero1_resumes_exactly_and_at_another_dp(tmp_path):
    root = str(tmp_path / "ckpt")
    common = {"tp": 2, "pp": 2, "root": root, "zero1": True}
    results = run_ranks(tmp_path / "run8", 8, [
        {**common, "seed": 0, "steps_before": 2, "save": True, "tag": "step_2", "steps_after": 3},
        {**common, "seed": 9, "load": True, "steps_after": 3},
    ])
    pairs = _continuations(results)
    assert len(pairs) == 4 and all(len(a) == 3 and a == b for a, b in pairs)
    tag = Path(root) / "step_2"
    optim = [f for f in _files(tag) if f.startswith("optim/")]
    assert optim == [f"optim/dp_rank_0{d}_tp_rank_0{t}_pp_rank_0{p}.pt" for d in range(2) for t in range(2) for p in range(2)]
    assert json.loads((tag / "shardwise.json").read_text())["layout"] == {"tp": 2, "pp": 2, "dp": 2, "optimizer": "zero1"}
    shard = torch.load(tag / "optim/dp_rank_01_tp_rank_00_pp_rank_01.pt", weights_only=True)
    assert tuple(shard["shape_info"][0]) == (8, 8) and shard["base_state"][0]["exp_avg"].shape == (4, 8)  # NxD's layout

    # the same checkpoint resumed by 4 ranks (dp 1): ZeRO-1 states merged for the new DP size
    again = run_ranks(tmp_path / "run4", 4, [{**common, "seed": 9, "load": True, "steps_after": 3}])
    expected = {tuple(a) for a, _ in pairs}
    for r in again:
        if r["phases"][0]["losses"]:
            assert any(torch.allclose(torch.tensor(r["phases"][0]["losses"]), torch.tensor(e), rtol=1e-5, atol=1e-7) for e in expected)


def test_replicated_files_are_spread_over_the_dp_ranks():
    model = {"w": torch.zeros(100)}
    adam = {"state": {0: {"exp_avg": torch.zeros(100), "exp_avg_sq": torch.zeros(100)}}}
    writers = {}
    for dp_rank in range(2):
        coords = ParallelCoords(tp_rank=1, tp_size=2, dp_rank=dp_rank, dp_size=2)
        for write in files_to_write(coords, model=model, optimizer=adam, scheduler={"s": 1}, user_content=1):
            writers.setdefault(write.name, []).append(dp_rank)
    assert writers == {"model/dp_rank_00_tp_rank_01_pp_rank_00.pt": [1], "optim/dp_rank_00_tp_rank_01_pp_rank_00.pt": [0]}
    first = ParallelCoords(tp_rank=0, tp_size=2, dp_rank=0, dp_size=2)
    names = [w.name for w in files_to_write(first, model=model, optimizer=adam, scheduler={"s": 1}, user_content=1)]
    assert names == ["optim/dp_rank_00_tp_rank_00_pp_rank_00.pt", "scheduler.pt", "user_content.pt"]
    zero1 = [w.name for w in files_to_write(ParallelCoords(dp_rank=1, dp_size=3), optimizer=adam, zero1=True)]
    assert zero1 == ["optim/dp_rank_01_tp_rank_00_pp_rank_00.pt"]


def test_coordinates_that_do_not_match_the_world_are_refused(tmp_path):
    with pytest.raises(LayoutError, match="tp 2 x pp 1 x dp 1 = 2 ranks do not match a run without torch.distributed"):
        shardwise.save_checkpoint(tmp_path, model={"w": torch.zeros(1)}, parallel=ParallelCoords(tp_rank=0, tp_size=2))
    with pytest.raises(LayoutError, match="tp_rank 2 is not within tp_size 2"):
        ParallelCoords(tp_rank=2, tp_size=2)


def test_a_llama_saved_at_tp2_pp2_loads_at_another_tp_and_pp(tmp_path):
    from shardwise.reshard.convert import convert_layout
    from test_reshard import _llama

    hf = _llama(tmp_path / "hf", heads=8, kv_heads=4, layers=4, tied=False)
    convert_layout(hf, tmp_path / "tp2pp2", to="nxdt", tp=2, pp=2)
    root, out = tmp_path / "ckpt", tmp_path / "loaded"
    out.mkdir()
    run_ranks(tmp_path / "save", 4, [{"kind": "llama_save", "tp": 2, "pp": 2, "src": str(tmp_path / "tp2pp2"), "root": str(root), "config": str(hf / "config.json")}])
    run_ranks(tmp_path / "load", 4, [{"kind": "llama_load", "tp": 4, "pp": 1, "root": str(root), "out": str(out)}])
    convert_layout(hf, tmp_path / "tp4", to="nxdt", tp=4, pp=1)
    single = {}
    shardwise.load_checkpoint(root, model=single)  # one process: tp 1, pp 1
    convert_layout(hf, tmp_path / "tp1", to="nxdt", tp=1, pp=1)
    cases = [(out / f"dp_rank_00_tp_rank_0{t}_pp_rank_00.pt", tmp_path / f"tp4/model/dp_rank_00_tp_rank_0{t}_pp_rank_00.pt") for t in range(4)]
    for got, expected in cases + [(single, tmp_path / "tp1/model/dp_rank_00_tp_rank_00_pp_rank_00.pt")]:
        got = torch.load(got, weights_only=True) if isinstance(got, Path) else got
        want = torch.load(expected, weights_only=True)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), expected.name
    with pytest.raises(LayoutError, match="optimizer states saved at tp 2 x pp 2 cannot load into tp 1 x pp 1"):
        shardwise.load_checkpoint(root, model={}, optimizer={})


@pytest.mark.parametrize("async_save", [False, True])
def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank_and_leaves_nothing(tmp_path, async_save):
    root = tmp_path / "ckpt"
    results = run_ranks(tmp_path / "run", 2, [{"kind": "fail", "tp": 1, "pp": 1, "root": str(root), "failing_dp_rank": 1, "async": async_save}])
    errors = [r["phases"][0]["error"] for r in results]
    assert errors[0].startswith("OSError") and "rank 1" in errors[0] and "earlier checkpoints are untouched" in errors[0], errors
    assert errors[1] is not None and "lambda" in errors[1], errors  # the failing rank raises its own error
    assert sorted(p.name for p in root.iterdir()) == ["after"]  # no tag, no staging folder; the next save worked
