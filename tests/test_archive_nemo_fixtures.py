"""Archives written by NVIDIA NeMo 2.3.0's own save_to (tests/data/nemo, made by make_fixtures.py):
shardwise reads their config, artifacts and every rank's tensors exactly, without unpacking them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

import shardwise

from conftest import raw_bytes

DATA = Path(__file__).parent / "data" / "nemo"


def _expected(name: str) -> dict:
    return json.loads((DATA / f"{name}_expected.json").read_text())


@pytest.mark.parametrize("name,tp", [("base", 1), ("tp2", 2)])
def test_nemo_written_archives_restore_rank_by_rank(name, tp):
    expected = _expected(name)
    summary = shardwise.inspect(DATA / f"{name}.nemo")
    assert summary["config"] == expected["config"]
    assert summary["archive"]["layout"]["tp"] == tp
    assert summary["archive"]["manifest"] is None  # NeMo writes none
    weights = expected["weights"]
    for member, tensors in weights.items():
        tp_rank = int(member.split("mp_rank_")[1][:2]) if "mp_rank_" in member else 0
        with shardwise.restore_from(DATA / f"{name}.nemo", tp_rank=tp_rank) as restored:
            assert set(restored.state_dict) == set(tensors), member
            for key, (shape, dtype, sha) in tensors.items():
                tensor = restored.state_dict[key]
                assert list(tensor.shape) == shape and str(tensor.dtype).removeprefix("torch.") == dtype, key
                assert hashlib.sha256(raw_bytes(tensor)).hexdigest() == sha, key


def test_nemo_artifacts_resolve_and_match_their_recorded_bytes():
    expected = _expected("base")
    with shardwise.restore_from(DATA / "base.nemo") as restored:
        for dotted, artifact in expected["artifacts"].items():
            key = dotted.split(".")[1]
            assert restored.raw_config["tokenizer"][key] == artifact["config_value"]
            path = Path(restored.config["tokenizer"][key])
            assert path.name == artifact["member"].removeprefix("./")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"]


def test_resaving_a_restored_nemo_model_keeps_one_hash_per_artifact(tmp_path):
    with shardwise.restore_from(DATA / "base.nemo") as restored:
        artifacts = {f"tokenizer.{k}": restored.config["tokenizer"][k] for k in ("tokenizer_model", "vocab_file")}
        path = shardwise.save_to(restored.state_dict, tmp_path / "again.nemo", config=restored.raw_config, artifacts=artifacts)
    config = shardwise.inspect(path)["config"]
    for key in ("tokenizer_model", "vocab_file"):
        assert re.fullmatch(r"nemo:[0-9a-f]{32}_(tokenizer\.model|vocab\.txt)", config["tokenizer"][key]), config["tokenizer"][key]
    assert shardwise.diff(DATA / "base.nemo", path).equal
