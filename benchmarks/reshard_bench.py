#!/usr/bin/env python3
"""Benchmark: sharding and resharding a Llama checkpoint with shardwise, against cp and the original tools' approach.

One synthetic Llama-shaped bf16 checkpoint (>= 2 GiB by default, TinyLlama-1.1B's shapes: 32 query
heads, 4 KV heads; built as in ``convert_bench.py``) in an HF folder, then two jobs:

1. **HF -> nxdt TP=4 PP=2**: ``shardwise convert HF OUT --to nxdt --tp 4 --pp 2`` against
   - ``cp`` of the same bytes (the HF safetensors file), and
   - the original tools' approach, as NxD's ``checkpoint_converter.py`` does it: load the whole
     state dict, then for every (tp, pp) narrow and ``.clone()`` each tensor (gate/up fused) and
     ``torch.save`` the rank's dict.
2. **archive TP=2 -> TP=4**: ``shardwise reshard A2.nemo A4.nemo --tp 4`` (a Megatron-core archive
   written by shardwise, untimed) against
   - ``cp`` of the archive, and
   - NeMo's approach (``megatron_change_num_partitions.py`` without the model instantiation, so
     a lower bound on its cost): load every rank's weights, merge them into full tensors, split
     them for the new TP, ``torch.save`` each rank and pack the tar.

Every command runs in a fresh process; its wall time and peak RSS (``ru_maxrss``) are measured
by the reaper of ``convert_bench.py``. shardwise fsyncs what it writes, so ``cp`` is followed by
``sync FILE`` and the original approach by ``sync -f`` (both timed): the same durability for all. Before each step pending writes are flushed and the input is
read once (warm page cache). Reported, in one run: time ratios against cp (goal <= 1.5x) and the
original approach (goal: faster), peak RSS above the ``shardwise --help`` baseline against the goal
(largest output file + 2 x largest tensor + 256 MiB, and at least 4x below the original
approach). Outputs are checked bit-exact with ``shardwise diff`` (untimed).

    python benchmarks/reshard_bench.py                  # 2 GiB, ~4 minutes
    python benchmarks/reshard_bench.py --repeat 1 --size-gib 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import (  # noqa: E402 - the sibling benchmark's checkpoint builder, middleman and options
    GiB,
    MiB,
    Bench,
    Step,
    add_common_options,
    parse_checked,
    ratio,
    build_checkpoint,
    close_workdir,
    layer_count,
    llama_infos,
    mib,
    write_llama_config,
    log,
    open_workdir,
    run,
    shardwise_cli,
)

# argv: hf folder, output folder, tp, pp. NxD's converter: whole state dict in memory, clone per rank, torch.save.
NAIVE_SHARD = r"""
import os, sys, torch, safetensors.torch
src, out, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
full = {k: v.clone() for k, v in safetensors.torch.load_file(os.path.join(src, "model.safetensors")).items()}  # torch.load of the whole model
layers = sorted({int(k.split(".")[2]) for k in full if k.startswith("model.layers.")})
per = [len(layers) // pp + (1 if s >= pp - len(layers) % pp else 0) for s in range(pp)]
bounds = [sum(per[:s]) for s in range(pp + 1)]
os.makedirs(os.path.join(out, "model"))
for p in range(pp):
    for t in range(tp):
        shard = {}
        for k, v in full.items():
            if k.startswith("model.layers."):
                if not bounds[p] <= int(k.split(".")[2]) < bounds[p + 1]:
                    continue
            elif k == "model.embed_tokens.weight" and p != 0 or k in ("model.norm.weight", "lm_head.weight") and p != pp - 1:
                continue
            if k.endswith(("o_proj.weight", "down_proj.weight")):
                size = v.shape[1] // tp
                shard[k] = v.narrow(1, t * size, size).clone()
            elif v.dim() == 2:
                size = v.shape[0] // tp
                shard[k] = v.narrow(0, t * size, size).clone()
            else:
                shard[k] = v.clone()
        for k in [k for k in shard if k.endswith("gate_proj.weight")]:
            up = k.replace("gate_proj", "up_proj")
            shard[k.replace("gate_proj", "gate_up_proj")] = torch.cat([shard.pop(k), shard.pop(up)], 0)
        torch.save(shard, os.path.join(out, "model", f"dp_rank_00_tp_rank_{t:02d}_pp_rank_{p:02d}.pt"))
"""

# argv: archive, output archive, old tp, new tp. NeMo's change_num_partitions: merge everything, split, save, tar.
NAIVE_RESHARD = r"""
import io, os, sys, tarfile, tempfile, torch
src, out, old, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with tarfile.open(src, "r:") as tar:
    ranks = [torch.load(io.BytesIO(tar.extractfile(f"./mp_rank_{r:02d}/model_weights.ckpt").read()), map_location="cpu", weights_only=True) for r in range(old)]
    config = tar.extractfile("./model_config.yaml").read()
full = {}
for k in ranks[0]:
    parts = [r[k] for r in ranks]
    if parts[0].dim() == 1:
        full[k] = parts[0]
    elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
        full[k] = torch.cat(parts, 1)
    elif k.endswith("linear_fc1.weight"):
        halves = [p.chunk(2) for p in parts]
        full[k] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    else:
        full[k] = torch.cat(parts, 0)
del ranks
with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as tmp:
    for r in range(new):
        shard = {}
        for k, v in full.items():
            if v.dim() == 1:
                shard[k] = v.clone()
            elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
                shard[k] = v.chunk(new, 1)[r].clone()
            elif k.endswith("linear_fc1.weight"):
                gate, up = v.chunk(2)
                shard[k] = torch.cat([gate.chunk(new)[r], up.chunk(new)[r]])
            else:
                shard[k] = v.chunk(new, 0)[r].clone()
        os.makedirs(os.path.join(tmp, f"mp_rank_{r:02d}"))
        torch.save(shard, os.path.join(tmp, f"mp_rank_{r:02d}", "model_weights.ckpt"))
    with open(os.path.join(tmp, "model_config.yaml"), "wb") as f:
        f.write(config)
    with tarfile.open(out, "w:") as tar:
        tar.add(tmp, arcname=".")
"""


def largest_file(path: Path) -> int:
    return max((p.stat().st_size for p in path.rglob("*") if p.is_file()), default=0) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(p)
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    args = parse_checked(p, argv)
    cli = shardwise_cli()
    work, created = open_workdir(args, "reshard-")
    try:
        hf = work / "hf"
        hf.mkdir()
        infos = llama_infos(args.size_gib)
        layers = layer_count(infos)
        log(f"building {sum(i.nbytes for i in infos) / GiB:.2f} GiB, {layers} layers in {hf}")
        build_checkpoint(hf / "model.safetensors", infos)
        write_llama_config(hf, infos)
        largest_tensor = max(i.nbytes for i in infos)
        a2 = work / "a2.nemo"
        run([*cli, "convert", str(hf), str(a2), "--to", "archive", "--tp", "2", "-q"])
        py = [sys.executable, "-c"]
        jobs = {
            "hf -> nxdt tp4 pp2": [
                Step("shardwise", "shardwise convert --to nxdt --tp 4 --pp 2", hf / "model.safetensors", [[*cli, "convert", str(hf), str(work / "nx"), "--to", "nxdt", "--tp", "4", "--pp", "2", "-q"]], work / "nx"),
                Step("cp", "cp + sync of the same bytes", hf / "model.safetensors", [["cp", str(hf / "model.safetensors"), str(work / "cp1")], ["sync", str(work / "cp1")]], work / "cp1"),
                Step("naive", "load all, clone per rank, torch.save (NxD)", hf / "model.safetensors", [[*py, NAIVE_SHARD, str(hf), str(work / "naive1"), "4", "2"], ["sync", "-f", str(work)]], work / "naive1"),
            ],
            "archive tp2 -> tp4": [
                Step("shardwise", "shardwise reshard --tp 4", a2, [[*cli, "reshard", str(a2), str(work / "a4.nemo"), "--tp", "4", "-q"]], work / "a4.nemo"),
                Step("cp", "cp + sync of the same bytes", a2, [["cp", str(a2), str(work / "cp2")], ["sync", str(work / "cp2")]], work / "cp2"),
                Step("naive", "merge all, split, torch.save, tar (NeMo)", a2, [[*py, NAIVE_RESHARD, str(a2), str(work / "naive2.nemo"), "2", "4"], ["sync", "-f", str(work)]], work / "naive2.nemo"),
            ],
        }
        base_rss = run([*cli, "--help"]).max_rss
        bench = Bench("warm")
        results = {}
        for job, steps in jobs.items():
            log(f"{job}:")
            bench.rounds(steps, args.warmup, args.repeat, job)
            by = {s.name: s for s in steps}
            out = by["shardwise"].output
            check = run([*cli, "diff", str(hf), str(out), "-q"], check=False)
            goal = largest_file(out) + 2 * largest_tensor + 256 * MiB
            results[job] = {
                "seconds": {name: {"median": s.median, "best": s.best} for name, s in by.items()},
                "vs_cp": ratio(by["shardwise"].median, by["cp"].median),
                "vs_naive": ratio(by["shardwise"].median, by["naive"].median),
                "rss_above_baseline": {name: s.peak_rss - base_rss for name, s in by.items()},
                "rss_goal": goal,
                "rss_vs_naive": ratio(by["naive"].peak_rss - base_rss, by["shardwise"].peak_rss - base_rss),
                "bit_exact": check.returncode == 0,
            }
            log(f"  {job}: output {largest_file(out) / MiB:.0f} MiB largest file")
        print_report(args, base_rss, largest_tensor, results)
        if args.json:
            Path(args.json).write_text(json.dumps({"size_gib": args.size_gib, "baseline_rss": base_rss, "jobs": results}, indent=2))
    finally:
        close_workdir(args, work, created)
    return 0


def print_report(args, base_rss: int, largest_tensor: int, results: dict) -> None:
    print(f"reshard_bench: {args.size_gib} GiB synthetic Llama (TinyLlama shapes), bf16, warm cache, "
          f"median of {args.repeat}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("cp and the original approach include a sync of their output (shardwise fsyncs its own)")
    print(f"RSS baseline (shardwise --help): {mib(base_rss, 0)}; largest tensor {mib(largest_tensor, 0)}")
    for job, r in results.items():
        s = r["seconds"]
        print(f"\n{job}")
        print(f"  time    shardwise {s['shardwise']['median']:.2f} s | cp {s['cp']['median']:.2f} s | original approach {s['naive']['median']:.2f} s")
        print(f"          vs cp {r['vs_cp']:.2f}x (goal <= 1.5x: {'met' if r['vs_cp'] <= 1.5 else 'MISSED'}), "
              f"vs original {r['vs_naive']:.2f}x (goal < 1: {'met' if r['vs_naive'] < 1 else 'MISSED'})")
        rss = r["rss_above_baseline"]
        print(f"  memory  above baseline: shardwise {mib(rss['shardwise'], 0)} | original {mib(rss['naive'], 0)}; "
              f"goal <= {mib(r['rss_goal'], 0)}: {'met' if rss['shardwise'] <= r['rss_goal'] else 'MISSED'}; "
              f"{r['rss_vs_naive']:.1f}x below the original (goal >= 4x: {'met' if r['rss_vs_naive'] >= 4 else 'MISSED'})")
        print(f"  output  bit-exact against the HF source by shardwise diff: {r['bit_exact']}")


if __name__ == "__main__":
    sys.exit(main())
