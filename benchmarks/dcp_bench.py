#!/usr/bin/env python3
"""Benchmark: a torch distributed checkpoint (DCP) converted to HF safetensors by shardwise and by torch.

One synthetic Llama-shaped bf16 model (>= 2 GiB by default, TinyLlama shapes, built as in
``convert_bench.py``) is saved by ``torch.distributed.checkpoint.save`` under 4 gloo ranks as a
tensor-parallel model would be: column-parallel weights and the embeddings sharded on dim 0,
row-parallel weights (``o_proj``, ``down_proj``) on dim 1, norms replicated (untimed). Then, each in
a fresh process, warm page cache, ``--repeat`` rounds after a warm-up, medians:

- ``shardwise convert DCP OUT --to hf`` (streams chunk by chunk, fsyncs its output);
- torch's own tool, ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` (the whole
  model loaded into one process, then ``torch.save``), followed by ``sync``;
- the same load followed by ``safetensors.torch.save_file`` instead, to reach the same HF output
  format, followed by ``sync``;
- ``cp -r`` of the DCP folder followed by ``sync``, for scale.

Reported in one run: time ratios against both torch approaches (goal: no more time than
``dcp_to_torch_save``) and peak RSS (``ru_maxrss``) ratios (goal: at least 4x less memory than
``dcp_to_torch_save``), raw and above each program's own start-up (``shardwise --help``; python
with torch imported). The output is checked bit-exact against the source model by ``shardwise diff``.

    python benchmarks/dcp_bench.py                  # 2 GiB, ~4 minutes
    python benchmarks/dcp_bench.py --repeat 1 --size-gib 0.5
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
    read_through,
    run,
    shardwise_cli,
)

WORLD = 4

# argv: safetensors file, DCP folder, world. Each rank saves its tensor-parallel shards with DCP.
SAVE_DCP = r"""
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
src, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rank_main(rank):
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = {}
    with safe_open(src, "pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            shape = part.get_shape()
            if len(shape) == 1:
                state[name] = DTensor.from_local(part[:], mesh, [Replicate()])
            else:
                dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
                size = shape[dim] // world
                local = part[:, rank * size:(rank + 1) * size] if dim else part[rank * size:(rank + 1) * size]
                state[name] = DTensor.from_local(local.contiguous(), mesh, [Shard(dim)])
    dcp.save({"model": state}, checkpoint_id=out)
    dist.barrier()
    dist.destroy_process_group()
pids = []
for rank in range(world):
    pid = os.fork()
    if pid == 0:
        try:
            rank_main(rank)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    pids.append(pid)
sys.exit(max(os.waitpid(p, 0)[1] for p in pids) != 0)
"""

# argv: DCP folder, output .pt. torch's documented offline conversion.
TORCH_TOOL = r"""
import sys
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
dcp_to_torch_save(sys.argv[1], sys.argv[2])
"""

# argv: DCP folder, output folder. What dcp_to_torch_save does, then the HF file instead of torch.save.
TORCH_TO_HF = r"""
import os, shutil, sys
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
state = {}
_load_state_dict(state, storage_reader=FileSystemReader(sys.argv[1]), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
os.makedirs(sys.argv[2])
save_file(state["model"], os.path.join(sys.argv[2], "model.safetensors"), metadata={"format": "pt"})
shutil.copy(os.path.join(sys.argv[1], "config.json"), sys.argv[2])
"""

TORCH_IMPORT = "import torch.distributed.checkpoint"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(p)
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    args = parse_checked(p, argv)
    cli = shardwise_cli()
    py = [sys.executable, "-c"]
    work, created = open_workdir(args, "dcp-")
    try:
        infos = llama_infos(args.size_gib)
        source = work / "model.safetensors"
        total = sum(i.nbytes for i in infos)
        log(f"building {total / GiB:.2f} GiB in {source}, then saving it as DCP under {WORLD} gloo ranks")
        build_checkpoint(source, infos)
        folder = work / "dcp"
        run([*py, SAVE_DCP, str(source), str(folder), str(WORLD)])
        write_llama_config(folder, infos)
        metadata = folder / ".metadata"
        steps = [
            Step("shardwise", "shardwise convert --to hf", metadata, [[*cli, "convert", str(folder), str(work / "hf"), "--to", "hf", "-q"]], work / "hf"),
            Step("torch", "dcp_to_torch_save + sync", metadata, [[*py, TORCH_TOOL, str(folder), str(work / "torch.pt")], ["sync", "-f", str(work)]], work / "torch.pt"),
            Step("torch_hf", "torch's load + safetensors save_file + sync", metadata, [[*py, TORCH_TO_HF, str(folder), str(work / "torch_hf")], ["sync", "-f", str(work)]], work / "torch_hf"),
            Step("cp", "cp -r + sync of the DCP folder", metadata, [["cp", "-r", str(folder), str(work / "cp")], ["sync", "-f", str(work)]], work / "cp"),
        ]
        for path in folder.iterdir():  # the warm cache: every data file read once (the steps' source is only the metadata)
            read_through(path)
        bench = Bench("warm")
        bench.rounds(steps, args.warmup, args.repeat, "dcp -> hf")
        by = {s.name: s for s in steps}
        exact = run([*cli, "diff", str(source), str(work / "hf"), "-q"], check=False).returncode == 0
        base = {"shardwise": run([*cli, "--help"]).max_rss, "torch": run([*py, TORCH_IMPORT]).max_rss}
        result = {
            "size_bytes": total,
            "seconds": {name: {"median": s.median, "best": s.best, "runs": s.seconds} for name, s in by.items()},
            "peak_rss": {name: s.peak_rss for name, s in by.items()},
            "startup_rss": base,
            "time_vs_torch_tool": ratio(by["shardwise"].median, by["torch"].median),
            "time_vs_torch_hf": ratio(by["shardwise"].median, by["torch_hf"].median),
            "time_vs_cp": ratio(by["shardwise"].median, by["cp"].median),
            "rss_ratio_torch_tool": ratio(by["torch"].peak_rss, by["shardwise"].peak_rss),
            "rss_ratio_above_startup": ratio(by["torch"].peak_rss - base["torch"], by["shardwise"].peak_rss - base["shardwise"]),
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
    print(f"dcp_bench: {r['size_bytes'] / GiB:.2f} GiB Llama-shaped bf16 DCP saved by torch at {WORLD} gloo ranks, warm cache, "
          f"median of {args.repeat}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("torch's outputs and cp are followed by a sync (shardwise fsyncs its own)")
    for name, label in (("shardwise", "shardwise convert --to hf"), ("torch", "dcp_to_torch_save"), ("torch_hf", "torch load + save_file"), ("cp", "cp -r")):
        print(f"  {label:28s} {s[name]['median']:6.2f} s (best {s[name]['best']:.2f})   peak RSS {mib(rss[name], 0)}")
    print(f"time    shardwise / dcp_to_torch_save {r['time_vs_torch_tool']:.2f}x (goal <= 1: {'met' if r['time_vs_torch_tool'] <= 1 else 'MISSED'}); "
          f"/ torch load + save_file {r['time_vs_torch_hf']:.2f}x; / cp {r['time_vs_cp']:.2f}x")
    print(f"memory  dcp_to_torch_save uses {r['rss_ratio_torch_tool']:.1f}x shardwise's peak RSS (goal >= 4x: "
          f"{'met' if r['rss_ratio_torch_tool'] >= 4 else 'MISSED'}); {r['rss_ratio_above_startup']:.1f}x above each one's start-up "
          f"(shardwise --help {mib(r['startup_rss']['shardwise'], 0)}, python + torch {mib(r['startup_rss']['torch'], 0)})")
    print(f"output  bit-exact against the source model by shardwise diff: {r['bit_exact']}")


if __name__ == "__main__":
    sys.exit(main())
