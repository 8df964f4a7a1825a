"""Restore a `.nemo` archive with NVIDIA NeMo's real loader and print what NeMo sees, as JSON.

Usage (in the NeMo venv described in make_fixtures.py; shardwise's own tests do not need NeMo)::

    /tmp/nemo-venv/bin/python tests/data/nemo/check_with_nemo.py ARCHIVE \\
        [--model-class MODULE:CLASS] [--resave OUT.nemo] [--no-strict]

The archive is restored with ``CLASS.restore_from(ARCHIVE, map_location="cpu")`` (default class:
``tiny_nemo_model:TinyModel`` next to this file), i.e. NeMo's base ``SaveRestoreConnector``:
tar extraction, ``model_config.yaml``, ``from_config_dict`` (honours the config's ``target``),
``register_artifact`` resolution of ``nemo:`` paths, ``torch.load`` of the weights and a strict
``load_state_dict``. For a model-parallel archive (config ``tensor_model_parallel_size`` or
``pipeline_model_parallel_size`` > 1) every rank is restored in turn in this one process, with
NeMo's AppState set to that rank, so NeMo itself picks ``mp_rank_XX/`` or
``tp_rank_XX_pp_rank_XXX/``.

Printed JSON (stdout; NeMo's own logging is sent to stderr)::

    archive_config   the config as NeMo loads it (restore_from(..., return_config=True))
    restores         one entry per rank: rank, class, cfg after the constructor (artifact keys
                     now hold the temporary absolute paths), state_dict {key: [shape, dtype,
                     sha256]}, artifacts (what TinyModel saw during its constructor: resolved
                     path, whether it existed, is_dir, sha256 or file list), artifact_paths_exist_now
    resave           with --resave: whether NeMo could save the restored model again, and its members

Exit status: 0 when every restore succeeded, 1 otherwise (the error is in the JSON).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tarfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_class(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--model-class must look like MODULE:CLASS, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _set_rank(tp: int, pp: int, tp_rank: int, pp_rank: int) -> None:
    from nemo.utils import AppState

    app = AppState()
    if tp * pp > 1:
        app.model_parallel_size = tp * pp
        app.tensor_model_parallel_size = tp
        app.pipeline_model_parallel_size = pp
        app.tensor_model_parallel_rank = tp_rank
        app.pipeline_model_parallel_rank = pp_rank
        app.data_parallel_rank = 0
    else:
        app.model_parallel_size = None
        app.tensor_model_parallel_size = None
        app.pipeline_model_parallel_size = None
        app.tensor_model_parallel_rank = None
        app.pipeline_model_parallel_rank = None
        app.data_parallel_rank = None


def _restore_one(cls, archive: str, strict: bool) -> dict:
    from omegaconf import OmegaConf

    from tiny_nemo_model import describe_state_dict

    model = cls.restore_from(archive, map_location="cpu", strict=strict)
    report = getattr(model, "artifact_report", {})
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "cfg": OmegaConf.to_container(model.cfg, resolve=True),
        "state_dict": describe_state_dict(model.state_dict()),
        "artifacts": report,
        "artifact_paths_exist_now": {k: os.path.exists(v["resolved_path"]) for k, v in report.items()},
        "_model": model,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive")
    ap.add_argument("--model-class", default="tiny_nemo_model:TinyModel", help="MODULE:CLASS (a ModelPT subclass)")
    ap.add_argument("--resave", metavar="OUT", help="after a TP=1 restore, save the model again with NeMo to OUT")
    ap.add_argument("--no-strict", action="store_true", help="load_state_dict(strict=False)")
    args = ap.parse_args()
    archive = os.path.abspath(args.archive)

    # Keep stdout for the JSON alone: NeMo and Lightning log to stdout as well.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    sys.path.insert(0, HERE)
    from omegaconf import OmegaConf

    result = {"archive": archive, "ok": True}
    try:
        cls = _load_class(args.model_class)
        conf = cls.restore_from(archive, map_location="cpu", return_config=True)
        result["archive_config"] = OmegaConf.to_container(conf, resolve=True)
        with tarfile.open(archive) as tar:
            result["tar_members"] = tar.getnames()
        tp = int(conf.get("tensor_model_parallel_size", 1) or 1)
        pp = int(conf.get("pipeline_model_parallel_size", 1) or 1)
        result["restores"] = []
        last_model = None
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                _set_rank(tp, pp, tp_rank, pp_rank)
                entry = {"tp_rank": tp_rank, "pp_rank": pp_rank}
                try:
                    r = _restore_one(cls, archive, strict=not args.no_strict)
                    last_model = r.pop("_model")
                    entry.update(r)
                except Exception as e:  # report and go on with the other ranks
                    result["ok"] = False
                    entry["error"] = f"{type(e).__name__}: {e}"
                    entry["traceback"] = traceback.format_exc()
                result["restores"].append(entry)
        _set_rank(1, 1, 0, 0)

        if args.resave:
            if tp * pp > 1 or last_model is None:
                result["resave"] = {"ok": False, "error": "--resave needs a successful TP=1/PP=1 restore"}
            else:
                out = os.path.abspath(args.resave)
                try:
                    last_model.save_to(out)
                    with tarfile.open(out) as tar:
                        members = tar.getnames()
                    result["resave"] = {"ok": True, "path": out, "members": members}
                except Exception as e:
                    result["ok"] = False
                    result["resave"] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    except Exception as e:
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()

    json.dump(result, json_out, indent=1, default=str)
    json_out.write("\n")
    json_out.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
