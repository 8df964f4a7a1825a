#!/usr/bin/env python3
"""Benchmark: checkpoints to and from S3, shardwise against s3fs's own transfers of the same bytes.

A synthetic Llama-shaped bf16 safetensors file (``--size-gib``, TinyLlama shapes, built as in
``convert_bench.py``) is moved through moto's S3 server, started on 127.0.0.1 (a real S3 protocol
server, in memory; its own speed bounds every transfer alike). Each step runs in a fresh process;
medians of ``--repeat`` rounds:

- upload: ``shardwise convert SRC s3://.../out.safetensors`` (writes to scratch, then a streamed
  multipart upload, 16 MiB parts) against ``s3fs.put_file`` of the source file (what ``aws s3 cp``
  does: concurrent 50 MiB parts);
- download: ``shardwise convert s3://.../x.safetensors LOCAL`` (fetch to scratch, convert, fsync)
  against ``s3fs.get_file`` + sync;
- ``save_checkpoint`` of a state of the same size to ``s3://`` against ``torch.save`` to a local
  file followed by ``s3fs.put_file``.

Reported: time ratios against each baseline (goal: close to 1, the transfer dominates) and peak
RSS (goal: shardwise's stays bounded, far below the checkpoint's size, where the baselines'
``torch.save`` path holds the state).

    python benchmarks/s3_bench.py                  # 1 GiB, ~3 minutes
    python benchmarks/s3_bench.py --size-gib 0.25 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import MiB, build_checkpoint, llama_infos, log, ratio, run, shardwise_cli  # noqa: E402

PUT = "import s3fs, sys; s3fs.S3FileSystem().put_file(sys.argv[1], sys.argv[2])"
GET = "import os, s3fs, sys; s3fs.S3FileSystem().get_file(sys.argv[1], sys.argv[2]); os.sync()"
STATE = """
import sys, torch
from safetensors.torch import load_file
state = load_file(sys.argv[1])  # the same tensors, in memory before the timer of the saving step matters
"""
SAVE_SHARDWISE = STATE + "import shardwise; shardwise.save_checkpoint(sys.argv[2], 'tag', model=state)"
SAVE_TORCH = STATE + "import os, s3fs; torch.save(state, sys.argv[3]); os.sync(); s3fs.S3FileSystem().put_file(sys.argv[3], sys.argv[2])"


def start_server() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, env
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's S3 server did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "shardwise-bench-s3", help="kept between runs: the source is built once")
    args = p.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = work / "model.safetensors"
    if not src.exists() or abs(src.stat().st_size - args.size_gib * 2**30) > 0.1 * 2**30:
        log(f"building a {args.size_gib} GiB checkpoint")
        build_checkpoint(src, llama_infos(args.size_gib))
    size = src.stat().st_size
    server, _ = start_server()
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put_file(str(src), "bench/source.safetensors")  # what the download steps read
        cli = shardwise_cli()
        py = [sys.executable, "-c"]
        steps = {
            "upload: shardwise convert": lambda i: cli + ["convert", str(src), f"s3://bench/up{i}.safetensors", "-q"],
            "upload: s3fs put_file": lambda i: py + [PUT, str(src), f"bench/put{i}.safetensors"],
            "download: shardwise convert": lambda i: cli + ["convert", "s3://bench/source.safetensors", str(work / f"down{i}.safetensors"), "-q"],
            "download: s3fs get_file": lambda i: py + [GET, "bench/source.safetensors", str(work / f"get{i}.safetensors")],
            "save: shardwise save_checkpoint": lambda i: py + [SAVE_SHARDWISE, str(src), f"s3://bench/ckpt{i}"],
            "save: torch.save + put_file": lambda i: py + [SAVE_TORCH, str(src), f"bench/torch{i}.pt", str(work / f"torch{i}.pt")],
        }
        results: dict[str, list] = {name: [] for name in steps}
        for i in range(args.repeat):
            for name, cmd in steps.items():
                r = run(cmd(i))
                results[name].append(r)
                log(f"{name}: {r.seconds:.2f} s, peak RSS {r.max_rss / MiB:.0f} MiB")
                for leftover in work.glob(f"*{i}.*"):
                    leftover.unlink()
                fs.invalidate_cache()
                for obj in fs.find("bench"):
                    if obj != "bench/source.safetensors":
                        fs.rm(obj)
    finally:
        server.terminate()
        server.wait(10)
    med = {name: statistics.median(r.seconds for r in runs) for name, runs in results.items()}
    rss = {name: max(r.max_rss for r in runs) for name, runs in results.items()}
    print(f"\ncheckpoint {size / 2**30:.2f} GiB, moto S3 server on 127.0.0.1, {args.repeat} round(s), medians")
    print(f"{'step':36} {'time':>8} {'peak RSS':>10}")
    for name in steps:
        print(f"{name:36} {med[name]:7.2f}s {rss[name] / MiB:8.0f} MiB")
    for kind, ours, theirs in [("upload", "upload: shardwise convert", "upload: s3fs put_file"),
                               ("download", "download: shardwise convert", "download: s3fs get_file"),
                               ("save", "save: shardwise save_checkpoint", "save: torch.save + put_file")]:
        print(f"{kind}: time {ratio(med[ours], med[theirs]):.2f}x of {theirs.split(': ')[1]}, peak RSS {rss[ours] / MiB:.0f} MiB against {rss[theirs] / MiB:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
