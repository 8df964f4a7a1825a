"""Write tiny `.nemo` fixtures with NVIDIA NeMo's own ``ModelPT.save_to`` (plus their expected contents).

The fixtures (``*.nemo``) and their descriptions (``*_expected.json``) are committed, so shardwise's
tests and CI read them without NeMo installed. Only regenerate them on purpose: every run gives the
artifacts new random uuid names (NeMo uses ``uuid4().hex``), so the files change byte for byte.

How to run (NeMo is *not* a shardwise dependency; it lives in its own venv)::

    python3.11 -m venv /tmp/nemo-venv
    echo 'torch==2.13.0' > /tmp/c.txt; printf 'torch==2.13.0\\nnumpy==1.26.4\\n' > /tmp/c2.txt
    /tmp/nemo-venv/bin/pip install torch==2.13.0
    /tmp/nemo-venv/bin/pip install "nemo_toolkit==2.3.0" -c /tmp/c.txt
    /tmp/nemo-venv/bin/pip install "hydra-core<=1.3.2,>1.3" "lightning<=2.4.0,>2.2.1" "omegaconf<=2.3" \\
        "torchmetrics>=0.11.0" -c /tmp/c.txt
    # only for tp2.nemo (NLPSaveRestoreConnector lives in the NLP collection):
    /tmp/nemo-venv/bin/pip install einops "transformers>=4.51.0,<5" sentencepiece pandas braceexpand \\
        webdataset h5py ijson sacremoses "nltk>=3.6.5" jieba opencc "pangu<5" ftfy inflect rapidfuzz \\
        sacrebleu rouge_score markdown2 prettytable "matplotlib>=3.3.2" psutil -c /tmp/c2.txt
    /tmp/nemo-venv/bin/pip install --no-deps "megatron_core==0.12.3" -c /tmp/c2.txt
    /tmp/nemo-venv/bin/python tests/data/nemo/make_fixtures.py

Fixtures written next to this file:

* ``base.nemo``  - TP=1/PP=1, base ``SaveRestoreConnector``: ``./model_config.yaml``,
  ``./model_weights.ckpt`` and two hashed file artifacts (``tokenizer.tokenizer_model``,
  ``tokenizer.vocab_file``). NeMo 2.3.0 cannot save folder artifacts (``shutil.copy2`` on a
  directory raises IsADirectoryError), so there is none.
* ``tp2.nemo``   - TP=2 written by the legacy ``NLPSaveRestoreConnector`` path
  (``./mp_rank_00/model_weights.ckpt``, ``./mp_rank_01/model_weights.ckpt``) with AppState faked
  the way NeMo's ``megatron_change_num_partitions.py`` does; skipped if the NLP collection does not
  import.
* ``<name>_expected.json`` - read back from each archive with tarfile/yaml/torch only: members in
  order with raw tar header details, the ``model_config.yaml`` text and parsed dict, the artifacts,
  and every tensor as [shape, dtype, sha256 of raw little-endian bytes] (see
  ``tiny_nemo_model.tensor_sha256``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import nemo  # noqa: E402
from nemo.utils import AppState  # noqa: E402
from tiny_nemo_model import (  # noqa: E402
    TP_SPLIT_DIM,
    TinyModel,
    describe_state_dict,
    reference_full_state_dict,
    shard_state_dict,
)

HIDDEN, FFN = 4, 6
TOKENIZER_MODEL_TEXT = b"tiny tokenizer model for shardwise tests (not a real sentencepiece model)\n"
VOCAB_TEXT = b"<unk>\n<s>\n</s>\nhello\nworld\n"


def make_cfg(src_dir: str, tp: int):
    return OmegaConf.create(
        {
            "hidden_size": HIDDEN,
            "ffn_hidden_size": FFN,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": 1,
            "precision": 32,
            "tokenizer": {
                "library": "sentencepiece",
                "tokenizer_model": os.path.join(src_dir, "tokenizer.model"),
                "vocab_file": os.path.join(src_dir, "vocab.txt"),
            },
        }
    )


def raw_headers(path: str) -> list:
    """Every 512-byte tar header block as written (pax 'x' headers included), read without tarfile."""
    with open(path, "rb") as f:
        data = f.read()
    out, off = [], 0
    while off + 512 <= len(data):
        h = data[off : off + 512]
        if h == b"\0" * 512:
            out.append(OrderedDict(offset=off, typeflag="<zero block>"))
            off += 512
            continue
        size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        rec = OrderedDict(
            offset=off,
            typeflag=h[156:157].decode("latin-1"),
            name=h[:100].rstrip(b"\0").decode("utf-8"),
            prefix=h[345:500].rstrip(b"\0").decode("utf-8"),
            size=size,
            mode=h[100:108].rstrip(b"\0 ").decode("ascii"),
            magic=h[257:263].decode("latin-1"),
            version=h[263:265].decode("latin-1"),
            uname=h[265:297].rstrip(b"\0").decode("utf-8"),
            gname=h[297:329].rstrip(b"\0").decode("utf-8"),
        )
        if rec["typeflag"] in ("x", "g"):
            rec["pax_records"] = data[off + 512 : off + 512 + size].decode("utf-8")
        out.append(rec)
        off += 512 + (size + 511) // 512 * 512
    # collapse the run of trailing zero blocks
    n_zero = 0
    while out and out[-1]["typeflag"] == "<zero block>":
        out.pop()
        n_zero += 1
    out.append(OrderedDict(offset=len(data) - 512 * n_zero, typeflag=f"<{n_zero} zero blocks to EOF>"))
    return out


def describe_archive(path: str) -> "OrderedDict":
    out = OrderedDict()
    out["file_size"] = os.path.getsize(path)
    members = []
    with tarfile.open(path, "r:") as tar:
        infos = tar.getmembers()
        for ti in infos:
            members.append(
                OrderedDict(
                    name=ti.name,  # as Python's tarfile reports it (directories lose the trailing '/')
                    type="dir" if ti.isdir() else "file" if ti.isfile() else str(ti.type),
                    size=ti.size,
                    mode=oct(ti.mode),
                    header_offset=ti.offset,
                    data_offset=ti.offset_data,
                    pax_headers=dict(ti.pax_headers),
                )
            )
        out["members"] = members
        out["tar_format_note"] = (
            "written by tarfile.open(path, 'w:') with Python's default PAX_FORMAT: every member is a POSIX "
            "ustar header (magic 'ustar\\x00', version '00') preceded by a pax 'x' header "
            "(name '././@PaxHeader') holding only the float mtime; directories are stored as './', "
            "'./mp_rank_00/' (trailing slash, typeflag '5'); no GNU headers"
        )
        out["raw_headers"] = raw_headers(path)
        by_name = {ti.name: ti for ti in infos}
        cfg_text = tar.extractfile(by_name["./model_config.yaml"]).read().decode("utf-8")
        out["model_config_yaml"] = cfg_text
        cfg = yaml.safe_load(cfg_text)
        out["config"] = cfg

        artifacts = OrderedDict()
        for key in ("tokenizer_model", "vocab_file", "vocab_dir"):
            val = (cfg.get("tokenizer") or {}).get(key)
            if not val:
                continue
            assert val.startswith("nemo:"), val
            member = "./" + val[len("nemo:"):]
            data = tar.extractfile(by_name[member]).read()
            artifacts["tokenizer." + key] = OrderedDict(
                config_value=val, member=member, size=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
        out["artifacts"] = artifacts

        weights = OrderedDict()
        for ti in infos:
            if ti.name.endswith("model_weights.ckpt"):
                sd = torch.load(io.BytesIO(tar.extractfile(ti).read()), map_location="cpu", weights_only=True)
                weights[ti.name] = describe_state_dict(sd)
        out["weights"] = weights
    return out


def save_base(src_dir: str, work: str, out_dir: str) -> str:
    model = TinyModel(cfg=make_cfg(src_dir, tp=1))
    model.load_state_dict(reference_full_state_dict(HIDDEN, FFN), strict=True)
    tmp_path = os.path.join(work, "base.nemo")
    model.save_to(tmp_path)
    dst = os.path.join(out_dir, "base.nemo")
    shutil.copyfile(tmp_path, dst)
    return dst


def save_tp2(src_dir: str, work: str, out_dir: str):
    try:
        from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    except Exception as e:  # the NLP collection needs many extra packages
        print(f"skipping tp2.nemo: cannot import NLPSaveRestoreConnector ({type(e).__name__}: {e})")
        return None
    tp = 2
    full = reference_full_state_dict(HIDDEN, FFN)
    app = AppState()
    app.model_parallel_size = tp
    app.tensor_model_parallel_size = tp
    app.pipeline_model_parallel_size = 1
    app.pipeline_model_parallel_rank = 0
    app.data_parallel_rank = 0
    tmp_path = os.path.join(work, "tp2", "tp2.nemo")
    os.makedirs(os.path.dirname(tmp_path))
    try:
        # Non-zero ranks only drop mp_rank_XX_model_weights.ckpt next to the target; rank 0 then moves
        # every rank's file into mp_rank_XX/ and packs, so rank 0 must go last (one process, no barrier).
        for rank in reversed(range(tp)):
            app.tensor_model_parallel_rank = rank
            model = TinyModel(cfg=make_cfg(src_dir, tp=tp))
            model.load_state_dict(shard_state_dict(full, tp, rank), strict=True)
            model._save_restore_connector = NLPSaveRestoreConnector()
            model.save_to(tmp_path)
    finally:
        app.model_parallel_size = None
        app.tensor_model_parallel_size = None
        app.tensor_model_parallel_rank = None
        app.pipeline_model_parallel_size = None
        app.pipeline_model_parallel_rank = None
        app.data_parallel_rank = None
    dst = os.path.join(out_dir, "tp2.nemo")
    shutil.copyfile(tmp_path, dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=HERE, help="output folder (default: next to this script)")
    ap.add_argument("--no-tp2", action="store_true", help="do not write tp2.nemo")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    full = reference_full_state_dict(HIDDEN, FFN)
    common = OrderedDict(
        generator=OrderedDict(nemo_toolkit=nemo.__version__, torch=torch.__version__, python=sys.version.split()[0]),
        reference_full_tensors=describe_state_dict(full),
        tp_split_dim=dict(TP_SPLIT_DIM),
    )
    with tempfile.TemporaryDirectory() as work:
        src_dir = os.path.join(work, "src")
        os.makedirs(src_dir)
        with open(os.path.join(src_dir, "tokenizer.model"), "wb") as f:
            f.write(TOKENIZER_MODEL_TEXT)
        with open(os.path.join(src_dir, "vocab.txt"), "wb") as f:
            f.write(VOCAB_TEXT)
        written = [("base", save_base(src_dir, work, args.out))]
        if not args.no_tp2:
            p = save_tp2(src_dir, work, args.out)
            if p:
                written.append(("tp2", p))

    for name, path in written:
        desc = describe_archive(path)
        desc.update(common)
        # sanity: what NeMo wrote is exactly the reference weights (or their TP shards)
        for member, tensors in desc["weights"].items():
            rank = 0 if member == "./model_weights.ckpt" else int(member.split("mp_rank_")[1][:2])
            tp = 1 if member == "./model_weights.ckpt" else 2
            assert tensors == describe_state_dict(shard_state_dict(full, tp, rank)), member
        with open(os.path.join(args.out, f"{name}_expected.json"), "w") as f:
            json.dump(desc, f, indent=1)
            f.write("\n")
        print(f"wrote {path} ({os.path.getsize(path)} bytes) and {name}_expected.json")


if __name__ == "__main__":
    main()
