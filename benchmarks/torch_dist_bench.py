#!/usr/bin/env python3
"""Benchmark: a NeMo ``.nemo`` whose weights are a torch_dist checkpoint, converted to HF, against cp.

One synthetic Llama-shaped bf16 model (1.5 GiB by default, TinyLlama shapes, built as in
``convert_bench.py``) is saved as Megatron-core saves it by ``tests/torch_dist_ranks.py`` under 2
gloo ranks (layers stacked on a leading axis, one DCP chunk per layer and tensor-parallel piece,
linear_qkv interleaved per query group, linear_fc1 as gate/up pieces, fused norms), and packed
with its ``model_config.yaml`` as an uncompressed ``.nemo`` tar (untimed). Then, each in a fresh
process, warm page cache, ``--repeat`` rounds after a warm-up, medians:

- ``shardwise convert model.nemo OUT --to hf`` (read in place from the tar, layer slice by layer
  slice; config.json built from model_config.yaml; fsyncs its output);
- ``shardwise convert`` of the same model from its one safetensors file to HF (a plain copy:
  what the engine's write path costs without any unstacking or de-interleaving);
- ``cp`` of the archive followed by ``sync`` (the same bytes, for scale).

Reported: the time ratio, and peak RSS (``ru_maxrss``) of both, raw and for shardwise above its
own start-up (``shardwise --help``), against the largest tensor. The output is checked bit-exact
against the source model by ``shardwise diff``.

    python benchmarks/torch_dist_bench.py                  # 1.5 GiB, ~3 minutes
    python benchmarks/torch_dist_bench.py --repeat 1 --size-gib 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import (  # noqa: E402 - the sibling benchmark's checkpoint builder, middleman and options
    GiB,
    REPO,
    Bench,
    Step,
    add_common_options,
    build_checkpoint,
    close_workdir,
    llama_infos,
    mib,
    write_llama_config,
    log,
    open_workdir,
    parse_checked,
    ratio,
    run,
    shardwise_cli,
)

WORLD = 2
WRITER = REPO / "tests" / "torch_dist_ranks.py"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(p)
    p.set_defaults(size_gib=1.5)
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    args = parse_checked(p, argv)
    cli = shardwise_cli()
    work, created = open_workdir(args, "torch-dist-")
    try:
        infos = llama_infos(args.size_gib)
        hf = work / "hf"
        hf.mkdir()
        total = sum(i.nbytes for i in infos)
        log(f"building {total / GiB:.2f} GiB in {hf}, saving it as torch_dist under {WORLD} gloo ranks, packing a .nemo")
        build_checkpoint(hf / "model.safetensors", infos)
        write_llama_config(hf, infos)
        run([sys.executable, str(WRITER), str(hf), str(work / "nemo"), str(WORLD), "layer", "128"])
        archive = work / "model.nemo"
        with tarfile.open(archive, "w:") as tar:
            tar.add(work / "nemo", arcname=".")
        steps = [
            Step("shardwise", "shardwise convert --to hf", archive, [[*cli, "convert", str(archive), str(work / "out"), "--to", "hf", "-q"]], work / "out"),
            Step("plain", "shardwise convert of the same model's safetensors", hf / "model.safetensors",
                 [[*cli, "convert", str(hf / "model.safetensors"), str(work / "plain"), "--to", "hf", "--config", str(hf / "config.json"), "-q"]], work / "plain"),
            Step("cp", "cp + sync of the archive", archive, [["cp", str(archive), str(work / "copy.nemo")], ["sync", "-f", str(work)]], work / "copy.nemo"),
        ]
        bench = Bench("warm")
        bench.rounds(steps, args.warmup, args.repeat, "torch_dist .nemo -> hf")
        by = {s.name: s for s in steps}
        exact = run([*cli, "diff", str(hf / "model.safetensors"), str(work / "out"), "-q"], check=False).returncode == 0
        startup = run([*cli, "--help"]).max_rss
        largest = max(i.nbytes for i in infos)
        result = {
            "size_bytes": total,
            "archive_bytes": archive.stat().st_size,
            "largest_tensor_bytes": largest,
            "seconds": {name: {"median": s.median, "best": s.best, "runs": s.seconds} for name, s in by.items()},
            "peak_rss": {name: s.peak_rss for name, s in by.items()},
            "startup_rss": startup,
            "time_vs_cp": ratio(by["shardwise"].median, by["cp"].median),
            "time_vs_plain": ratio(by["shardwise"].median, by["plain"].median),
            "rss_above_startup_vs_largest_tensor": ratio(by["shardwise"].peak_rss - startup, largest),
            "bit_exact": exact,
        }
        print_report(args, result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        close_workdir(args, work, created)
    return 0


def print_report(args, r: dict) -> None:
    s, rss = r["seconds"], r["peak_rss"]
    print(f"torch_dist_bench: {r['archive_bytes'] / GiB:.2f} GiB .nemo (torch_dist, {WORLD} ranks, Llama-shaped bf16), warm cache, "
          f"median of {args.repeat}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for name, label in (("shardwise", "shardwise convert --to hf"), ("plain", "same model from safetensors"), ("cp", "cp + sync")):
        print(f"  {label:28s} {s[name]['median']:6.2f} s (best {s[name]['best']:.2f})   peak RSS {mib(rss[name], 0)}")
    print(f"time    shardwise / cp {r['time_vs_cp']:.2f}x; / the same conversion from one safetensors file {r['time_vs_plain']:.2f}x")
    print(f"memory  shardwise peak RSS {mib(rss['shardwise'], 0)}, {mib(rss['shardwise'] - r['startup_rss'], 0)} above its start-up "
          f"({mib(r['startup_rss'], 0)}), {r['rss_above_startup_vs_largest_tensor']:.2f}x the largest tensor ({mib(r['largest_tensor_bytes'], 0)}); "
          f"model {mib(r['size_bytes'], 0)}")
    print(f"output  bit-exact against the source model by shardwise diff: {r['bit_exact']}")


if __name__ == "__main__":
    sys.exit(main())
