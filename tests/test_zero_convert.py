"""ZeRO-1 optimizer states: merging and re-splitting DP shards in memory (``training.zero1``) and the offline
``shardwise zero-convert`` command, which writes a complete, checksummed checkpoint tag.

Shards are built here the way torch-xla's ZeroRedundancyOptimizer builds them (zero padding on dim 0 to a
multiple of DP, ``torch.chunk``, rank r keeps chunk r), independently of the code under test."""

from __future__ import annotations

import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shardwise.errors import FormatError, LayoutError
from shardwise.training.zero1 import is_zero1_state, merge_zero1, split_zero1

PARAMS = {0: (5, 3), 1: (7,), 2: (1, 4), 3: (10,)}  # odd dim-0 sizes: every DP > 1 pads something
EP_OFFSETS = {"ep_param_id_offset": 3, "ep_base_state_offset": 2, "ep_shape_info_offset": 2, "ep_param_group_offset": 1}


def full_state(seed: int, shape_type=torch.Size, **extra) -> dict:
    """An Adam-like ZeRO-1 state as NxD's --convert_to_full writes it, with fp32 master weights."""
    g = torch.Generator().manual_seed(seed)
    return {
        "state": {},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "params": list(PARAMS)}],
        "base_state": {
            k: {"step": torch.tensor(12.0), "exp_avg": torch.randn(s, generator=g), "exp_avg_sq": torch.rand(s, generator=g)}
            for k, s in PARAMS.items()
        },
        "shape_info": {k: shape_type(s) for k, s in PARAMS.items()},
        "sharded_master_weights": {k: torch.randn(s, generator=g, dtype=torch.float32) for k, s in PARAMS.items()},
        **extra,
    }


def nxd_shards(full: dict, dp: int) -> list[dict]:
    """The DP ranks' states as torch-xla saves them, built with F.pad + chunk like ZeroRedundancyOptimizer."""

    def shard(t: torch.Tensor, r: int) -> torch.Tensor:
        padded = F.pad(t, [0, 0] * (t.dim() - 1) + [0, (-t.shape[0]) % dp])
        return padded.chunk(dp)[r].clone()

    ranks = []
    for r in range(dp):
        state = dict(full)
        state["base_state"] = {k: {n: shard(v, r) if v.dim() else v for n, v in e.items()} for k, e in full["base_state"].items()}
        state["sharded_master_weights"] = {k: shard(v, r) for k, v in full["sharded_master_weights"].items()}
        ranks.append(state)
    return ranks


def assert_same_state(a: dict, b: dict) -> None:
    """Same keys, same Python types (torch.Size stays torch.Size) and bit-identical tensors of the same dtype."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


# -- in memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape_type", [torch.Size, list, tuple])
@pytest.mark.parametrize("dp", [1, 2, 3, 4, 11])
def test_merging_torch_xla_shards_gives_back_the_full_state_with_shape_info_types_kept(dp, shape_type):
    full = full_state(dp, shape_type)
    merged = merge_zero1(nxd_shards(full, dp), "test")
    assert_same_state(merged, full)
    assert all(type(s) is shape_type for s in merged["shape_info"].values())


@pytest.mark.parametrize("dp", [1, 2, 3, 11])
def test_splitting_matches_torch_xla_sharding_and_each_shard_owns_its_storage(dp):
    full = full_state(0)
    ours = split_zero1(full, dp, "test")
    for mine, theirs in zip(ours, nxd_shards(full, dp), strict=True):
        assert_same_state(mine, theirs)
        for t in mine["sharded_master_weights"].values():  # torch.save of a view would write the whole padded storage
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_master_weights_are_merged_from_every_rank_not_copied_from_rank_0():
    full = full_state(1)
    shards = nxd_shards(full, 2)
    merged = merge_zero1(shards, "test")
    w = full["sharded_master_weights"][3]  # 10 rows: rank 1 owns rows 5..9
    assert torch.equal(merged["sharded_master_weights"][3][5:], w[5:])
    assert not torch.equal(shards[0]["sharded_master_weights"][3], w[5:])  # what copying rank 0 would give


def test_split_then_merge_and_merge_then_split_are_identities_in_memory():
    full = full_state(2)
    assert_same_state(merge_zero1(split_zero1(full, 3, "t"), "t"), full)
    shards = nxd_shards(full, 4)
    for mine, theirs in zip(split_zero1(merge_zero1(shards, "t"), 4, "t"), shards, strict=True):
        assert_same_state(mine, theirs)


def test_dtypes_are_kept():
    full = full_state(3)
    full["base_state"][0]["exp_avg"] = full["base_state"][0]["exp_avg"].bfloat16()
    shards = split_zero1(full, 2, "t")
    assert shards[1]["base_state"][0]["exp_avg"].dtype == torch.bfloat16
    assert merge_zero1(shards, "t")["base_state"][0]["exp_avg"].dtype == torch.bfloat16


def _drop_key(shards):
    del shards[1]["base_state"][2]["exp_avg_sq"]


def _short_rows(shards):
    shards[1]["base_state"][3]["exp_avg"] = shards[1]["base_state"][3]["exp_avg"][:-1]


def _wrong_trailing(shards):
    shards[0]["base_state"][0]["exp_avg"] = torch.zeros(3, 4)
    shards[1]["base_state"][0]["exp_avg"] = torch.zeros(3, 4)


def _missing_param(shards):
    del shards[1]["sharded_master_weights"][1]


def _mixed_dtype(shards):
    shards[1]["base_state"][1]["exp_avg"] = shards[1]["base_state"][1]["exp_avg"].double()


@pytest.mark.parametrize("damage, error, words", [
    (_drop_key, FormatError, "base_state[2]"),
    (_short_rows, LayoutError, "base_state[3]['exp_avg'] on DP rank 1 is [4]"),
    (_wrong_trailing, LayoutError, "base_state[0]['exp_avg'] on DP rank 0 is [3, 4]"),
    (_missing_param, FormatError, "sharded_master_weights covers parameters"),
    (_mixed_dtype, FormatError, "torch.float64 on DP rank 1"),
])
def test_shards_that_disagree_are_refused_naming_the_source_and_parameter(damage, error, words):
    shards = nxd_shards(full_state(4), 2)
    shards[1]["base_state"] = {k: dict(v) for k, v in shards[1]["base_state"].items()}
    shards[1]["sharded_master_weights"] = dict(shards[1]["sharded_master_weights"])
    damage(shards)
    with pytest.raises(error) as e:
        merge_zero1(shards, "optim/dp_rank_*_tp_rank_00_pp_rank_00.pt")
    assert str(e.value).startswith("optim/dp_rank_*_tp_rank_00_pp_rank_00.pt: ") and words in str(e.value)


def test_a_full_state_whose_master_weights_are_one_shard_is_refused_on_split():
    full = full_state(5)
    full["sharded_master_weights"][3] = full["sharded_master_weights"][3][:5]  # what NxD's converter leaves behind
    with pytest.raises(LayoutError, match=r"sharded_master_weights\[3\] is \[5\], but shape_info says \[10\]"):
        split_zero1(full, 2, "full.pt")


def test_is_zero1_state_tells_zero1_from_plain_optimizer_states():
    plain = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]).state_dict()
    assert is_zero1_state(full_state(0)) and not is_zero1_state(plain) and not is_zero1_state([])


# -- on disk ---------------------------------------------------------------------------------
def write_tag(tag: Path, optim: dict[str, dict], *, dp: int = 2, manifest: bool = True, done: bool = True) -> None:
    """A checkpoint tag as NxD's save_checkpoint lays it out (TP=2), plus our manifest when asked."""
    (tag / "model" / "extra.pt.tensors").mkdir(parents=True)
    (tag / "optim").mkdir()
    (tag / "checkpoint").write_text("1")
    g = torch.Generator().manual_seed(9)
    for tp in range(2):
        torch.save({"w": torch.randn(4, 3, generator=g).bfloat16()}, tag / "model" / f"dp_rank_00_tp_rank_{tp:02d}_pp_rank_00.pt")
    (tag / "model" / "extra.pt.tensors" / "tensor_0.pt").write_bytes(b"xser tensor bytes")
    torch.save({"last_epoch": 7, "_step_count": 8}, tag / "scheduler.pt")
    torch.save({"step": 7, "note": "hello"}, tag / "user_content.pt")
    for name, state in optim.items():
        torch.save(state, tag / "optim" / name)
    if manifest:
        files = [
            {"name": p.relative_to(tag).as_posix(), "size": p.stat().st_size, "crc32": f"{zlib.crc32(p.read_bytes()):08x}"}
            for p in sorted(tag.rglob("*")) if p.is_file()
        ]
        layout = {"tp": 2, "pp": 1, "dp": dp, "optimizer": "zero1"}
        doc = {"format": "shardwise-training-checkpoint", "version": 1, "tag": tag.name, "sequence": 7, "encoding": "pt", "layout": layout, "files": files}
        (tag / "shardwise.json").write_text(json.dumps(doc))
    if done:
        (tag / "done").write_text("1")


def sharded_tag(tag: Path, dp: int, fulls: list[dict], **kwargs) -> None:
    optim = {}
    for tp, full in enumerate(fulls):
        for r, state in enumerate(nxd_shards(full, dp)):
            optim[f"dp_rank_{r:02d}_tp_rank_{tp:02d}_pp_rank_00.pt"] = state
    write_tag(tag, optim, dp=dp, **kwargs)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_round_trip_full_to_dp3_to_dp2_to_full_is_bit_exact(tmp_path, cli):
    fulls = [full_state(10), full_state(11, list)]
    write_tag(tmp_path / "full", {f"full_tp_rank_{tp:02d}_pp_rank_00.pt": s for tp, s in enumerate(fulls)})
    for src, dst, flags in [("full", "dp3", ["--to-sharded", "--dp", "3"]), ("dp3", "dp2", ["--to-sharded", "--dp", "2"]), ("dp2", "back", ["--to-full"])]:
        result = cli("zero-convert", tmp_path / src, tmp_path / dst, *flags)
        assert result.code == 0, result
        assert result.out.startswith(f"wrote {tmp_path / dst}: ") and result.out.count("\n") == 1
    assert sorted(os.listdir(tmp_path / "dp3" / "optim")) == sorted(f"dp_rank_{r:02d}_tp_rank_{t:02d}_pp_rank_00.pt" for r in range(3) for t in range(2))
    for tp, full in enumerate(fulls):
        for r, theirs in enumerate(nxd_shards(full, 2)):  # the dp2 files are what torch-xla would have saved at DP=2
            assert_same_state(load(tmp_path / "dp2" / "optim" / f"dp_rank_{r:02d}_tp_rank_{tp:02d}_pp_rank_00.pt"), theirs)
        assert_same_state(load(tmp_path / "back" / "optim" / f"full_tp_rank_{tp:02d}_pp_rank_00.pt"), full)
    assert sorted(os.listdir(tmp_path / "back" / "optim")) == sorted(os.listdir(tmp_path / "full" / "optim"))


def test_output_is_a_complete_checkpoint_with_a_manifest_of_every_file(tmp_path, cli):
    sharded_tag(tmp_path / "in", 2, [full_state(20), full_state(21)])
    assert cli("zero-convert", tmp_path / "in", tmp_path / "out", "--to-sharded", "--dp", "3").code == 0
    src, out = tmp_path / "in", tmp_path / "out"
    for rel in ["checkpoint", "done", "scheduler.pt", "user_content.pt", "model/dp_rank_00_tp_rank_00_pp_rank_00.pt",
                "model/dp_rank_00_tp_rank_01_pp_rank_00.pt", "model/extra.pt.tensors/tensor_0.pt"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    manifest = json.loads((out / "shardwise.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name not in ("shardwise.json", "done"))
    assert [f["name"] for f in manifest["files"]] == on_disk
    for f in manifest["files"]:
        data = (out / f["name"]).read_bytes()
        assert f["size"] == len(data) and f["crc32"] == f"{zlib.crc32(data):08x}", f["name"]
    assert manifest["layout"] == {"tp": 2, "pp": 1, "dp": 3, "optimizer": "zero1"}
    assert (manifest["tag"], manifest["sequence"], manifest["encoding"]) == ("out", 7, "pt")
    assert not any(".shardwise-tmp-" in p for p in os.listdir(tmp_path))


def test_no_done_marker_is_written_when_the_input_had_none(tmp_path, cli):
    sharded_tag(tmp_path / "in", 2, [full_state(22), full_state(23)], done=False, manifest=False)
    assert cli("zero-convert", tmp_path / "in", tmp_path / "out", "--to-full").code == 0
    assert not (tmp_path / "out" / "done").exists()
    manifest = json.loads((tmp_path / "out" / "shardwise.json").read_text())
    assert manifest["layout"] == {"tp": 2, "pp": 1, "dp": 2, "optimizer": "zero1-full"} and manifest["sequence"] == 1


def test_ep_file_names_and_offsets_are_kept(tmp_path, cli):
    fulls = {(ep, tp): full_state(30 + 2 * ep + tp, **EP_OFFSETS) for ep in range(2) for tp in range(2)}
    optim = {
        f"dp_rank_{r:02d}_ep_rank_{ep:02d}_tp_rank_{tp:02d}_pp_rank_00.pt": s
        for (ep, tp), full in fulls.items() for r, s in enumerate(nxd_shards(full, 2))
    }
    write_tag(tmp_path / "in", optim)
    manifest = json.loads((tmp_path / "in" / "shardwise.json").read_text())
    manifest["layout"]["ep"] = 2
    (tmp_path / "in" / "shardwise.json").write_text(json.dumps(manifest))
    assert cli("zero-convert", tmp_path / "in", tmp_path / "out", "--to-full").code == 0
    assert json.loads((tmp_path / "out" / "shardwise.json").read_text())["layout"] == {"tp": 2, "pp": 1, "dp": 2, "optimizer": "zero1-full", "ep": 2}
    for (ep, tp), full in fulls.items():
        merged = load(tmp_path / "out" / "optim" / f"full_ep_rank_{ep:02d}_tp_rank_{tp:02d}_pp_rank_00.pt")
        assert_same_state(merged, full)
        assert {k: merged[k] for k in EP_OFFSETS} == EP_OFFSETS
    assert len(os.listdir(tmp_path / "out" / "optim")) == 4


def test_overwrite_replaces_an_existing_output(tmp_path, cli):
    sharded_tag(tmp_path / "in", 2, [full_state(40), full_state(41)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    assert cli("zero-convert", tmp_path / "in", tmp_path / "out", "--to-full").code == 2
    assert os.listdir(tmp_path / "out") == ["old"]
    assert cli("zero-convert", tmp_path / "in", tmp_path / "out", "--to-full", "--overwrite").code == 0
    assert not (tmp_path / "out" / "old").exists() and (tmp_path / "out" / "optim" / "full_tp_rank_01_pp_rank_00.pt").is_file()


# -- refusals --------------------------------------------------------------------------------
def _no_marker(tag):
    (tag / "checkpoint").unlink()


def _no_optim(tag):
    for p in (tag / "optim").iterdir():
        p.unlink()
    (tag / "optim").rmdir()


def _replicated(tag):
    plain = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]).state_dict()
    for p in (tag / "optim").iterdir():
        torch.save(plain, p)
    (tag / "shardwise.json").unlink()


def _missing_rank(tag):
    (tag / "optim" / "dp_rank_01_tp_rank_01_pp_rank_00.pt").unlink()
    (tag / "shardwise.json").unlink()


def _unequal_dp(tag):
    (tag / "optim" / "dp_rank_02_tp_rank_01_pp_rank_00.pt").unlink()
    (tag / "shardwise.json").unlink()


def _truncated(tag):
    p = tag / "optim" / "dp_rank_01_tp_rank_00_pp_rank_00.pt"
    p.write_bytes(p.read_bytes()[:300])
    (tag / "shardwise.json").unlink()


def _truncated_listed(tag):
    p = tag / "optim" / "dp_rank_01_tp_rank_00_pp_rank_00.pt"
    p.write_bytes(p.read_bytes()[:300])


def _flipped_byte(tag):
    p = tag / "optim" / "dp_rank_02_tp_rank_01_pp_rank_00.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _xser(tag):
    (tag / "optim" / "dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors").mkdir()


def _stray_file(tag):
    (tag / "optim" / "notes.txt").write_text("x")


@pytest.mark.parametrize("damage, args, words", [
    (None, ["missing-tag", "--to-full"], "missing-tag: no such checkpoint folder"),
    (_no_marker, ["--to-full"], "in: not a checkpoint tag"),
    (_no_optim, ["--to-full"], "in: has no optim/ folder"),
    (_replicated, ["--to-full"], "dp_rank_00_tp_rank_00_pp_rank_00.pt: not a ZeRO-1 optimizer state (no base_state and shape_info): a replicated"),
    (_missing_rank, ["--to-full"], "optim/dp_rank_01_tp_rank_01_pp_rank_00.pt: missing"),
    (_unequal_dp, ["--to-full"], "tp_rank_00_pp_rank_00 has DP=3 but tp_rank_01_pp_rank_00 has DP=2"),
    (_truncated, ["--to-full"], "optim/dp_rank_01_tp_rank_00_pp_rank_00.pt: not a readable torch file, or truncated"),
    (_truncated_listed, ["--to-full"], "optim/dp_rank_01_tp_rank_00_pp_rank_00.pt: 300 bytes, the manifest says"),
    (_flipped_byte, ["--to-full"], "optim/dp_rank_02_tp_rank_01_pp_rank_00.pt: CRC-32"),
    (_xser, ["--to-full"], "pt.tensors: xser optimizer files are not supported yet"),
    (_stray_file, ["--to-full"], "optim/notes.txt: not an optimizer file"),
    (None, ["--to-sharded", "--dp", "0"], "--dp 0"),
    (None, ["--to-sharded", "--dp", "-2"], "--dp -2"),
    (None, ["--to-full", "--to-sharded", "--dp", "2"], "exactly one of --to-full and --to-sharded"),
    (None, [], "exactly one of --to-full and --to-sharded"),
    (None, ["--to-full", "--dp", "2"], "--dp 2 only applies with --to-sharded"),
    (None, ["--to-sharded"], "--to-sharded needs --dp N"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_at_out(tmp_path, cli, damage, args, words):
    sharded_tag(tmp_path / "in", 3, [full_state(50), full_state(51)])
    if damage is not None:
        damage(tmp_path / "in")
    src = tmp_path / args.pop(0) if args and not args[0].startswith("-") else tmp_path / "in"
    result = cli("zero-convert", src, tmp_path / "out", *args)
    assert result.code == 2, result
    assert result.err.startswith("shardwise: error: ") and result.err.count("\n") == 1, result.err
    assert words in result.err, result.err
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_the_output_may_not_be_inside_the_input(tmp_path, cli):
    sharded_tag(tmp_path / "in", 2, [full_state(80), full_state(81)])
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    result = cli("zero-convert", tmp_path / "in", tmp_path / "in" / "sub", "--to-full")
    assert result.code == 2 and "must not be the input" in result.err, result
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


class _Payload:
    """Pickles as a call of os.system, as a hostile optimizer file would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_an_optimizer_file_is_refused_without_running_it(tmp_path, cli):
    sharded_tag(tmp_path / "in", 2, [full_state(60), full_state(61)], manifest=False)
    marker = tmp_path / "pwned"
    bad = tmp_path / "in" / "optim" / "dp_rank_01_tp_rank_00_pp_rank_00.pt"
    bad.write_bytes(pickle.dumps({"base_state": {}, "shape_info": {}, "x": _Payload(marker)}, protocol=2))
    result = cli("zero-convert", tmp_path / "in", tmp_path / "out", "--to-full")
    assert result.code == 2 and f"{bad}: refused to load" in result.err and "system" in result.err, result
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_expert_parameters_sharded_over_a_smaller_group_are_refused_with_a_hint():
    full = full_state(70, **EP_OFFSETS)
    shards = nxd_shards(full, 2)
    for state in shards:  # expert parameters (base_state index >= 2) sharded over expert-DP = 1: whole on every rank
        state["base_state"] = {**state["base_state"], 3: full["base_state"][3]}
    with pytest.raises(LayoutError, match=r"base_state\[3\]\['exp_avg'\] on DP rank 0 is \[10\].*expert-data-parallel"):
        merge_zero1(shards, "t")
