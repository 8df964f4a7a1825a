#!/usr/bin/env python3
"""Benchmark: shardwise.save_checkpoint / load_checkpoint against torch.save, torch DCP and torch.load.

One process, one training state of at least 1.5 GiB by default: a stack of fp32 linear layers
plus Adam's two moments after one step (model : optimizer bytes = 1 : 2). Measured, in round-robin
order after an untimed warm-up round, medians of ``--repeat`` rounds:

1. **sync save**: ``shardwise.save_checkpoint(model=, optimizer=)`` (every file fsynced, manifest,
   ``done``, atomic rename) against ``torch.save`` of the same two state dicts into two files, with
   and without an fsync of those files, and against ``torch.distributed.checkpoint.save`` of
   ``{"model": ..., "optim": ...}`` (single process; DCP does not fsync either), again with and
   without an fsync of its files. Goal: shardwise no slower than torch.save and DCP. Ratios against
   the un-fsynced baselines are printed as well as against the fsynced ones: the fair comparison
   for a save that survives a power cut, which is what shardwise's save is.
2. **async stall**: the time until ``save_checkpoint(async_save=True)`` returns (the state copied to
   CPU memory), against the sync save. Goal: at most 10%. The background write is then waited for
   (``finalize_checkpoint``) and its total time shown. Snapshot buffers are reused from save to
   save; the first save's stall (fresh buffers, page faults included; the warm-up round) is shown
   on its own line. The same with ``async_staging=True`` (the copy of parameters and Adam states
   moved to the writer thread, the next ``optimizer.step()`` waiting for it): its stall, and how
   long an ``optimizer.step()`` called at once afterwards waits (the worst case, nothing to overlap
   the copy with; a real training step's forward and backward would hide it).
3. **load**: ``shardwise.load_checkpoint(model=, optimizer=)`` (CRC-32 of every byte checked, and
   with ``verify=False``) against ``torch.load`` of the torch.save files + ``load_state_dict``,
   all from the page cache.

Before every timed step pending writes are flushed (``os.sync``, untimed) and earlier outputs are
removed, so no step pays for another's writeback.

    python benchmarks/save_bench.py                  # 1.6 GiB, 3 rounds, ~2 minutes
    python benchmarks/save_bench.py --size-gib 3 --repeat 5 --json save.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import shardwise
from shardwise.atomic import fsync_file

GiB = 1024**3
WIDTH = 4096


def build_state(size_gib: float):
    """A model of 4096x4096 fp32 layers and an Adam optimizer after one step: >= ``size_gib`` in all."""
    layers = max(1, round(size_gib * GiB / (3 * WIDTH * WIDTH * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad()
    total = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    return model, optimizer, total


def fsync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def steps(model, optimizer, work: Path) -> dict:
    """name -> function running one timed step (setup done outside the timing)."""
    import torch.distributed.checkpoint as dcp

    def torch_save(durable: bool):
        def run():
            out = work / ("torch_durable" if durable else "torch")
            out.mkdir()
            torch.save(model.state_dict(), out / "model.pt")
            torch.save(optimizer.state_dict(), out / "optim.pt")
            if durable:
                fsync_files(out)
        return run

    def dcp_save(durable: bool):
        def run():
            out = work / ("dcp_durable" if durable else "dcp")
            dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(out))
            if durable:
                fsync_files(out)
        return run

    def shardwise_sync():
        shardwise.save_checkpoint(work / "sw", "sync", model=model, optimizer=optimizer)

    return {
        "torch.save": torch_save(False),
        "torch.save + fsync": torch_save(True),
        "dcp.save": dcp_save(False),
        "dcp.save + fsync": dcp_save(True),
        "shardwise sync save": shardwise_sync,
    }


STAGED = ("staging async stall", "staging: wait in an immediate step()", "staging async total")


def measure_saves(model, optimizer, work: Path, repeat: int, warmup: int) -> dict[str, list[float]]:
    funcs = steps(model, optimizer, work)
    outputs = {"torch.save": "torch", "torch.save + fsync": "torch_durable", "dcp.save": "dcp", "dcp.save + fsync": "dcp_durable", "shardwise sync save": "sw"}
    times: dict[str, list[float]] = {name: [] for name in [*funcs, "shardwise async stall", "shardwise async total", *STAGED]}
    for round_ in range(warmup + repeat):
        for name, fn in funcs.items():
            fresh(work / outputs[name])
            seconds = timed(fn)
            if round_ >= warmup:
                times[name].append(seconds)
        fresh(work / "sw")
        start = time.perf_counter()
        shardwise.save_checkpoint(work / "sw", "async", model=model, optimizer=optimizer, async_save=True)
        stall = time.perf_counter() - start
        shardwise.finalize_checkpoint()
        total = time.perf_counter() - start
        if round_ >= warmup:
            times["shardwise async stall"].append(stall)
            times["shardwise async total"].append(total)
        elif round_ == 0:
            times["first async stall (fresh buffers)"] = [stall]
        fresh(work / "sw")
        start = time.perf_counter()
        shardwise.save_checkpoint(work / "sw", "staged", model=model, optimizer=optimizer, async_save=True, async_staging=True)
        stall = time.perf_counter() - start
        step_wait = timed(optimizer.step)  # no gradients: the step itself does nothing, its pre-hook waits for the copy
        shardwise.finalize_checkpoint()
        if round_ >= warmup:
            for name, value in zip(STAGED, (stall, step_wait, time.perf_counter() - start)):
                times[name].append(value)
        log(f"round {round_ + 1}/{warmup + repeat}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v and round_ >= warmup))
    return times


def measure_loads(model, optimizer, work: Path, repeat: int) -> dict[str, list[float]]:
    fresh(work / "sw")
    shardwise.save_checkpoint(work / "sw", "load", model=model, optimizer=optimizer)
    fresh(work / "torch")
    steps(model, optimizer, work)["torch.save"]()
    times: dict[str, list[float]] = {"torch.load + load_state_dict": [], "shardwise load (CRC checked)": [], "shardwise load (verify=False)": []}

    def torch_load():
        model.load_state_dict(torch.load(work / "torch/model.pt", weights_only=True))
        optimizer.load_state_dict(torch.load(work / "torch/optim.pt", weights_only=True))

    runs = {
        "torch.load + load_state_dict": torch_load,
        "shardwise load (CRC checked)": lambda: shardwise.load_checkpoint(work / "sw", model=model, optimizer=optimizer),
        "shardwise load (verify=False)": lambda: shardwise.load_checkpoint(work / "sw", model=model, optimizer=optimizer, verify=False),
    }
    for round_ in range(repeat + 1):
        for name, fn in runs.items():
            seconds = timed(fn)
            if round_:
                times[name].append(seconds)
    return times


def log(message: str) -> None:
    print(f"[save_bench] {message}", file=sys.stderr, flush=True)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def report(total: int, times: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    sync = med["shardwise sync save"]
    ratios = {
        "sync save / torch.save": ratio(sync, med["torch.save"]),
        "sync save / (torch.save + fsync)": ratio(sync, med["torch.save + fsync"]),
        "sync save / dcp.save": ratio(sync, med["dcp.save"]),
        "sync save / (dcp.save + fsync)": ratio(sync, med["dcp.save + fsync"]),
        "async stall / sync save": ratio(med["shardwise async stall"], sync),
        "staging async stall / sync save": ratio(med["staging async stall"], sync),
        "staging stall + immediate step wait / sync save": ratio(med["staging async stall"] + med["staging: wait in an immediate step()"], sync),
        "first async stall / sync save": ratio(med["first async stall (fresh buffers)"], sync) if "first async stall (fresh buffers)" in med else float("nan"),
        "load (CRC checked) / torch.load": ratio(med["shardwise load (CRC checked)"], med["torch.load + load_state_dict"]),
        "load (verify=False) / torch.load": ratio(med["shardwise load (verify=False)"], med["torch.load + load_state_dict"]),
    }
    goals = {
        "sync save / torch.save": 1.0, "sync save / dcp.save": 1.0, "async stall / sync save": 0.10,
        "staging async stall / sync save": 0.10,
    }
    print(f"state: {total / GiB:.2f} GiB (model + Adam), {len(times['shardwise sync save'])} rounds, medians")
    for name, values in times.items():
        print(f"  {name:40s} {med[name]:7.2f} s   ({total / GiB / max(med[name], 1e-9):6.2f} GiB/s)   runs: {', '.join(f'{v:.2f}' for v in values)}")
    print("ratios:")
    for name, value in ratios.items():
        goal = goals.get(name)
        verdict = "" if goal is None else ("  goal <= %.2f: %s" % (goal, "met" if value <= goal else "MISSED"))
        print(f"  {name:48s} {value:6.2f}x{verdict}")
    return {"bytes": total, "seconds": times, "medians": med, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=1.6, help="model + Adam state size (default 1.6)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder, removed after)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.size_gib <= 0 or args.repeat < 1 or args.warmup < 0:
        p.error("--size-gib must be > 0, --repeat >= 1, --warmup >= 0")
    work = Path(tempfile.mkdtemp(prefix="save_bench-", dir=args.workdir))
    try:
        model, optimizer, total = build_state(args.size_gib)
        log(f"state of {total / GiB:.2f} GiB built; writing under {work}")
        times = measure_saves(model, optimizer, work, args.repeat, args.warmup)
        times.update(measure_loads(model, optimizer, work, args.repeat))
        result = report(total, times)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
