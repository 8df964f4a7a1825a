#!/usr/bin/env python3
"""Benchmark: safetensors -> torch -> safetensors with the shardwise CLI, against cp and the naive route.

What is measured, in one run, on a synthetic Llama-shaped bf16 checkpoint (>= 2 GiB by default,
TinyLlama-1.1B's shapes, random finite bf16 values) written by streaming with shardwise's writer:

1. **Time against cp.** ``shardwise convert SRC model.pt --to torch`` (leg 1) and ``shardwise
   convert model.pt final.safetensors --to safetensors`` (leg 2) run as subprocesses, wall clock.
   Each leg is compared with ``cp`` of that leg's own input file (the same bytes), and the two-leg
   chain with the two cp's. shardwise fsyncs what it writes (crash safety) and plain ``cp`` does
   not, so ``cp`` followed by ``sync FILE`` ("durable cp") is the fair baseline; ratios against
   both are printed. Goal: chain <= 1.5x durable cp.
2. **Time against the naive route**: ``safetensors.torch.load_file`` + ``torch.save``, then
   ``torch.load(weights_only=True)`` + ``safetensors.torch.save_file``, each leg a subprocess. The
   naive legs fsync their output as shardwise does and report how long that took, so the naive
   time is compared both with and without its fsyncs.
3. **Peak memory.** Each command is started by a tiny middleman interpreter that reaps it with
   ``os.wait4``: its ``ru_maxrss`` is the peak RSS of exactly that process, what ``/usr/bin/time
   -v`` reports as "Maximum resident set size". (Linux carries a process's peak RSS across exec,
   so commands are not spawned straight from this larger process.) The conversion's peak RSS
   minus the RSS of ``shardwise --help`` (the interpreter and the CLI's imports) is compared with
   the largest tensor. Goal: at most 2x the largest tensor + 256 MiB. ``shardwise --help`` does
   not import torch, so ``python -c "import shardwise, torch"`` is shown as a second baseline.

Fairness: before every timed step, pending writes are flushed (``sync``, untimed) and the step's
input is read once (``--cache warm``, default) or the page cache is dropped (``--cache cold``,
root only; falls back to warm with a note). Steps are repeated (``--repeat``) in round-robin
order after an untimed warm-up round (``--warmup``), which matters on VMs where the first touch
of memory can cost as much as the copy; medians are reported. The naive route runs afterwards (its
own warm-up, then its rounds), since its multi-GiB allocations would disturb the cp/shardwise
comparison. Finally ``shardwise diff ORIGINAL FINAL`` must exit 0 (a bit-exact round trip).

    python benchmarks/convert_bench.py                       # 2 GiB, warm cache, ~3 minutes
    python benchmarks/convert_bench.py --cache cold --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from shardwise.formats.safetensors import write_safetensors
from shardwise.tensors import TensorInfo

MiB = 1024**2
GiB = 1024**3
REPO = Path(__file__).resolve().parent.parent

# TinyLlama-1.1B (Llama 2 architecture; grouped-query attention, 4 KV heads of 64).
HIDDEN, INTERMEDIATE, VOCAB, KV_DIM = 2048, 5632, 32000, 256
HEADS, KV_HEADS = 32, 4  # TinyLlama's: KV_DIM = KV_HEADS x HIDDEN / HEADS

CHUNK = 16 * MiB  # write size when building the checkpoint
POOL = 64 * MiB  # random bytes, reused from a different offset by every tensor


# -- the synthetic checkpoint ---------------------------------------------------------------------
def layer_infos(i: int) -> list[TensorInfo]:
    p = f"model.layers.{i}"
    shapes = {
        f"{p}.input_layernorm.weight": (HIDDEN,),
        f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        f"{p}.self_attn.k_proj.weight": (KV_DIM, HIDDEN),
        f"{p}.self_attn.v_proj.weight": (KV_DIM, HIDDEN),
        f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        f"{p}.post_attention_layernorm.weight": (HIDDEN,),
        f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }
    return [TensorInfo(name, shape, "bfloat16") for name, shape in shapes.items()]


def llama_infos(size_gib: float) -> list[TensorInfo]:
    """Embeddings, final norm, lm_head, and as many decoder layers as it takes to reach ``size_gib``."""
    infos = [
        TensorInfo("model.embed_tokens.weight", (VOCAB, HIDDEN), "bfloat16"),
        TensorInfo("model.norm.weight", (HIDDEN,), "bfloat16"),
        TensorInfo("lm_head.weight", (VOCAB, HIDDEN), "bfloat16"),
    ]
    per_layer = sum(t.nbytes for t in layer_infos(0))
    fixed = sum(t.nbytes for t in infos)
    layers = max(1, -(-(int(size_gib * GiB) - fixed) // per_layer))  # ceiling division
    for i in range(layers):
        infos += layer_infos(i)
    return infos


def layer_count(infos) -> int:
    """The number of decoder layers of ``llama_infos``' tensors."""
    return sum(1 for i in infos if i.name.endswith("input_layernorm.weight"))


def write_llama_config(folder: Path, infos) -> None:
    """The HF ``config.json`` of the checkpoint ``llama_infos`` describes (what layout conversions need)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": layer_count(infos), "vocab_size": VOCAB,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def random_pool(seed: int) -> memoryview:
    """POOL + CHUNK random bytes whose bf16 values are all finite (|x| < 2: exponent's top bit cleared)."""
    pool = bytearray(random.Random(seed).randbytes(POOL + CHUNK))
    clear_bit = bytes(b & 0xBF for b in range(256))
    pool[1::2] = pool[1::2].translate(clear_bit)  # little-endian: odd bytes hold sign and exponent
    return memoryview(pool)


def build_checkpoint(path: Path, infos: list[TensorInfo], seed: int = 0) -> None:
    """Stream a safetensors file with shardwise's own writer; memory stays at one random pool."""
    pool = random_pool(seed)
    starts = {info.name: (i * 7919 * 128) % POOL for i, info in enumerate(infos)}  # even: bf16 aligned

    def write_tensor(info: TensorInfo, f: BinaryIO) -> None:
        pos, remaining = starts[info.name], info.nbytes
        while remaining:
            n = min(remaining, CHUNK)
            f.write(pool[pos : pos + n])
            remaining -= n
            pos = (pos + n) % POOL

    with open(path, "wb") as f:
        write_safetensors(f, infos, write_tensor, metadata={"format": "pt"})
        f.flush()
        os.fsync(f.fileno())


# -- running and measuring commands ---------------------------------------------------------------
@dataclass
class Run:
    """One command: wall seconds, peak RSS in bytes, exit code and output."""

    cmd: list[str]
    seconds: float
    max_rss: int
    returncode: int
    stdout: str = ""
    stderr: str = ""


# Spawns the command, reaps it with wait4 and writes "seconds max_rss_bytes" to argv[1]. Being a
# small fresh process, it passes no inflated peak RSS on to the command (see module docstring),
# and timing here leaves out the middleman's own start-up.
REAPER = r"""
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{seconds} {usage.ru_maxrss * 1024}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str], *, check: bool = True) -> Run:
    """Run ``cmd`` to completion through REAPER; raise on a non-zero exit when ``check``."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, stats = (Path(tmp) / name for name in ("stdout", "stderr", "stats"))
        with open(out, "wb") as o, open(err, "wb") as e:
            code = subprocess.call([sys.executable, "-I", "-S", "-c", REAPER, str(stats), *cmd], stdout=o, stderr=e)
        seconds, max_rss = stats.read_text().split() if stats.exists() else ("nan", "0")
        result = Run(cmd, float(seconds), int(max_rss), code, out.read_text(errors="replace"), err.read_text(errors="replace"))
    if check and code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{result.stderr or result.stdout}")
    return result


def shardwise_cli() -> list[str]:
    """The ``shardwise`` console script of this interpreter's environment (else ``python -m shardwise``).

    The package's modules are byte-compiled first, as a regular ``pip install`` does: an editable
    install under ``PYTHONDONTWRITEBYTECODE`` would otherwise compile every module again in every
    timed run (about 0.1 s).
    """
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("shardwise")
    if spec is not None and spec.origin:
        compileall.compile_dir(Path(spec.origin).parent, quiet=1)
    script = Path(sys.executable).parent / "shardwise"
    if script.exists():
        return [str(script)]
    found = shutil.which("shardwise")
    return [found] if found else [sys.executable, "-m", "shardwise"]


def drop_caches() -> bool:
    os.sync()  # dirty pages cannot be dropped
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_through(path: Path) -> None:
    """Read a file once so that it sits in the page cache."""
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@dataclass
class Step:
    """A timed step: its commands run back to back; its output is removed before each repetition."""

    name: str
    label: str
    source: Path
    commands: list[list[str]]
    output: Path
    runs: list[Run] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def peak_rss(self) -> int:
        return max(r.max_rss for r in self.runs)


class Bench:
    """Runs steps from the same cache state: flushed writes, then the input warm or everything cold."""

    def __init__(self, cache: str) -> None:
        self.cache, self.note = cache, ""
        if cache == "cold" and not drop_caches():
            self.cache = "warm"
            self.note = "could not drop the page cache (needs root): measured with a warm cache instead"

    def prepare(self, source: Path) -> None:
        os.sync()  # untimed: earlier steps' dirty pages must not be written back during this one
        if self.cache == "cold":
            drop_caches()
        else:
            read_through(source)

    def measure(self, step: Step, *, record: bool = True) -> None:
        remove(step.output)
        self.prepare(step.source)
        runs = [run(cmd) for cmd in step.commands]
        if record:
            step.runs += runs
            step.seconds.append(sum(r.seconds for r in runs))

    def rounds(self, steps: list[Step], warmup: int, repeat: int, what: str) -> None:
        for i in range(warmup + repeat):
            for step in steps:
                self.measure(step, record=i >= warmup)
            stage = f"warm-up {i + 1}/{warmup}" if i < warmup else f"round {i + 1 - warmup}/{repeat}"
            log(f"  {what}: {stage} done")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the naive route ------------------------------------------------------------------------------
NAIVE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch, safetensors.torch
t1 = time.perf_counter()
mode, src, dst = sys.argv[1:4]
if mode == "to-torch":
    state = safetensors.torch.load_file(src)
    t2 = time.perf_counter()
    torch.save(state, dst)
else:
    state = torch.load(src, weights_only=True)
    t2 = time.perf_counter()
    safetensors.torch.save_file(state, dst, metadata={"format": "pt"})
t3 = time.perf_counter()
fd = os.open(dst, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "save": t3 - t2, "fsync": t4 - t3}))
"""


def have_safetensors() -> bool:
    return run([sys.executable, "-c", "import safetensors.torch"], check=False).returncode == 0


def fsync_seconds(step: Step) -> float:
    """The median time a naive step spent in its final fsync (as it reported)."""
    return statistics.median(json.loads(r.stdout)["fsync"] for r in step.runs)


# -- the benchmark --------------------------------------------------------------------------------
def main_steps(cli: list[str], work: Path, src: Path) -> list[Step]:
    pt, final, copy = work / "model.pt", work / "final.safetensors", work / "copy.bin"
    convert = cli + ["convert", "--quiet"]
    return [
        Step("cp1", "cp SRC (safetensors)", src, [["cp", str(src), str(copy)]], copy),
        Step("cp1_sync", "cp SRC + sync (durable)", src, [["cp", str(src), str(copy)], ["sync", str(copy)]], copy),
        Step("leg1", "shardwise safetensors -> torch (leg 1)", src, [convert + [str(src), str(pt), "--to", "torch"]], pt),
        Step("cp2", "cp model.pt", pt, [["cp", str(pt), str(copy)]], copy),
        Step("cp2_sync", "cp model.pt + sync (durable)", pt, [["cp", str(pt), str(copy)], ["sync", str(copy)]], copy),
        Step("leg2", "shardwise torch -> safetensors (leg 2)", pt,
             [convert + [str(pt), str(final), "--to", "safetensors"]], final),
    ]


def naive_steps(work: Path, src: Path) -> list[Step]:
    pt, final = work / "naive.pt", work / "naive.safetensors"
    naive = [sys.executable, "-c", NAIVE]
    return [
        Step("naive1", "naive load_file + torch.save (+fsync)", src, [naive + ["to-torch", str(src), str(pt)]], pt),
        Step("naive2", "naive torch.load + save_file (+fsync)", pt, [naive + ["to-safetensors", str(pt), str(final)]], final),
    ]


def baselines(cli: list[str]) -> dict:
    helps = [run(cli + ["--help"]) for _ in range(3)]
    imports = [run([sys.executable, "-c", "import shardwise, torch"]) for _ in range(3)]
    return {
        "help_rss": max(r.max_rss for r in helps),
        "help_seconds": statistics.median(r.seconds for r in helps),
        "torch_rss": max(r.max_rss for r in imports),
        "torch_seconds": statistics.median(r.seconds for r in imports),
    }


def inspect_seconds(cli: list[str], path: Path) -> float:
    """Wall time of ``shardwise inspect PATH --json`` (headers only: the goal is well under a second)."""
    return statistics.median(run(cli + ["inspect", str(path), "--json"]).seconds for _ in range(3))


def verify(cli: list[str], src: Path, final: Path) -> dict:
    result = run(cli + ["diff", str(src), str(final), "--quiet"], check=False)
    identical = run(["cmp", "-s", str(src), str(final)], check=False).returncode == 0
    return {"diff_exit_code": result.returncode, "diff_seconds": result.seconds, "byte_identical": identical,
            "diff_output": (result.stdout + result.stderr).strip()}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def time_ratios(steps: dict[str, Step], statistic: str) -> dict:
    """Every time ratio, from each step's median or best (minimum) time."""
    t = {name: getattr(s, statistic) for name, s in steps.items()}
    chain = t["leg1"] + t["leg2"]
    times = {
        "chain_vs_durable_cp": ratio(chain, t["cp1_sync"] + t["cp2_sync"]),
        "chain_vs_plain_cp": ratio(chain, t["cp1"] + t["cp2"]),
        "leg1_vs_durable_cp": ratio(t["leg1"], t["cp1_sync"]),
        "leg1_vs_plain_cp": ratio(t["leg1"], t["cp1"]),
        "leg2_vs_durable_cp": ratio(t["leg2"], t["cp2_sync"]),
        "leg2_vs_plain_cp": ratio(t["leg2"], t["cp2"]),
    }
    if "naive1" in steps:
        naive = t["naive1"] + t["naive2"]
        naive_no_fsync = naive - fsync_seconds(steps["naive1"]) - fsync_seconds(steps["naive2"])
        times["chain_vs_naive"] = ratio(chain, naive)
        times["chain_vs_naive_no_fsync"] = ratio(chain, naive_no_fsync)
        times["leg1_vs_naive"] = ratio(t["leg1"], t["naive1"])
        times["leg2_vs_naive"] = ratio(t["leg2"], t["naive2"])
    return times


def summarize(steps: dict[str, Step], base: dict, largest: int) -> dict:
    # medians are the headline; on a shared VM single runs are bimodal (memory reclaim, flushes),
    # so best-of-N, the least disturbed run of every step, is reported beside them
    times = time_ratios(steps, "median")
    best = time_ratios(steps, "best")
    peak = max(steps["leg1"].peak_rss, steps["leg2"].peak_rss)
    memory = {
        "largest_tensor": largest,
        "conversion_peak_rss": peak,
        "limit": 2 * largest + 256 * MiB,
        "over_help": peak - base["help_rss"],
        "over_torch_import": peak - base["torch_rss"],
    }
    memory["over_help_vs_largest"] = ratio(memory["over_help"], largest)
    memory["over_torch_import_vs_largest"] = ratio(memory["over_torch_import"], largest)
    goals = {
        "time_chain_le_1.5x_durable_cp": times["chain_vs_durable_cp"] <= 1.5,
        "time_chain_le_1.5x_plain_cp": times["chain_vs_plain_cp"] <= 1.5,
        "time_chain_le_1.5x_durable_cp_best_of_n": best["chain_vs_durable_cp"] <= 1.5,
        "memory_over_help_le_limit": memory["over_help"] <= memory["limit"],
        "memory_over_torch_import_le_limit": memory["over_torch_import"] <= memory["limit"],
    }
    return {"ratios": times, "ratios_best_of_n": best, "memory": memory, "goals": goals}


# -- reporting ------------------------------------------------------------------------------------
def mib(n: float, decimals: int = 1) -> str:
    return f"{n / MiB:,.{decimals}f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_report(ctx: dict, steps: dict[str, Step], base: dict, summary: dict, check: dict, out=sys.stdout) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

    r, b, m, g = summary["ratios"], summary["ratios_best_of_n"], summary["memory"], summary["goals"]
    say(f"\nshardwise convert benchmark: {ctx['size_bytes'] / GiB:.2f} GiB Llama-shaped bf16 safetensors, "
        f"{ctx['layers']} layers, {ctx['num_tensors']} tensors, largest tensor {mib(ctx['largest_tensor'])}")
    say(f"{ctx['cache']} page cache; median of {ctx['repeat']} after {ctx['warmup']} warm-up round(s); {ctx['machine']}")
    if ctx["notes"]:
        say("note: " + "; ".join(ctx["notes"]))

    say(f"\n{'step':<42}{'median s':>9}{'GiB/s':>7}{'peak RSS':>13}   runs (s)")
    for s in steps.values():
        runs = " ".join(f"{x:.2f}" for x in s.seconds)
        say(f"{s.label:<42}{s.median:>9.2f}{s.source.stat().st_size / GiB / s.median:>7.2f}{mib(s.peak_rss):>13}   {runs}")
    if "naive1" in steps:
        say(f"  (the naive route's final fsyncs took {fsync_seconds(steps['naive1']) + fsync_seconds(steps['naive2']):.2f} s)")
    say(f"start-up alone: `shardwise --help` {base['help_seconds']:.2f} s, "
        f"`python -c 'import shardwise, torch'` {base['torch_seconds']:.2f} s")
    say(f"`shardwise inspect --json` of the {ctx['size_bytes'] / GiB:.2f} GiB input: {base['inspect_seconds']:.2f} s "
        f"(goal: well under 1 s)")

    say(f"\n{'time ratio (shardwise / baseline; lower is better)':<52}{'median':>7}{'best':>8}   goal")
    rows = [
        ("chain vs 2 durable cp's (the fair baseline)", "chain_vs_durable_cp",
         f"<= 1.5x  median {verdict(g['time_chain_le_1.5x_durable_cp'])}, "
         f"best {verdict(g['time_chain_le_1.5x_durable_cp_best_of_n'])}"),
        ("chain vs 2 plain cp's (no fsync)", "chain_vs_plain_cp", f"<= 1.5x  {verdict(g['time_chain_le_1.5x_plain_cp'])}"),
        ("leg 1 (-> torch) vs durable cp", "leg1_vs_durable_cp", ""),
        ("leg 1 (-> torch) vs plain cp", "leg1_vs_plain_cp", ""),
        ("leg 2 (-> safetensors) vs durable cp", "leg2_vs_durable_cp", ""),
        ("leg 2 (-> safetensors) vs plain cp", "leg2_vs_plain_cp", ""),
        ("chain vs naive route (both fsync)", "chain_vs_naive", ""),
        ("chain vs naive route without its fsyncs", "chain_vs_naive_no_fsync", ""),
        ("leg 1 vs naive leg 1", "leg1_vs_naive", ""),
        ("leg 2 vs naive leg 2", "leg2_vs_naive", ""),
    ]
    for label, key, goal in rows:
        if key in r:
            say(f"{label:<52}{r[key]:>6.2f}x{b[key]:>7.2f}x   {goal}".rstrip())

    say("\npeak memory (ru_maxrss of each process)")
    say(f"  baseline `shardwise --help`                     {mib(base['help_rss']):>13}")
    say(f"  baseline `python -c 'import shardwise, torch'`  {mib(base['torch_rss']):>13}")
    say(f"  shardwise convert, max of both legs             {mib(m['conversion_peak_rss']):>13}")
    if "naive1" in steps:
        say(f"  naive route, leg 1 / leg 2                      {mib(steps['naive1'].peak_rss):>13} / "
            f"{mib(steps['naive2'].peak_rss)}")
    say(f"  largest tensor                                  {mib(m['largest_tensor']):>13}")
    say(f"  goal: conversion - baseline <= 2 x largest + 256 MiB = {mib(m['limit'])}")
    say(f"  conversion - `shardwise --help`           = {mib(m['over_help']):>11} = "
        f"{m['over_help_vs_largest']:5.2f}x largest   {verdict(g['memory_over_help_le_limit'])}")
    say(f"  conversion - `import shardwise, torch`    = {mib(m['over_torch_import']):>11} = "
        f"{m['over_torch_import_vs_largest']:5.2f}x largest   {verdict(g['memory_over_torch_import_le_limit'])}")

    ok = check["diff_exit_code"] == 0
    say(f"\ncorrectness: `shardwise diff original final` exited {check['diff_exit_code']} "
        f"({'bit-exact' if ok else 'NOT EQUAL'}, {check['diff_seconds']:.1f} s); "
        f"final file byte-identical to the original: {'yes' if check['byte_identical'] else 'no'}")
    if not ok:
        say(check["diff_output"])
    say(f"total benchmark time {ctx['total_seconds']:.0f} s")


def json_report(ctx: dict, steps: dict[str, Step], base: dict, summary: dict, check: dict) -> dict:
    return {
        "context": ctx,
        "steps": {
            name: {"label": s.label, "median_seconds": s.median, "seconds": s.seconds, "peak_rss": s.peak_rss,
                   "input_bytes": s.source.stat().st_size}
            for name, s in steps.items()
        },
        "baselines": base,
        **summary,
        "verification": {k: v for k, v in check.items() if k != "diff_output"},
    }


# -- command line ---------------------------------------------------------------------------------
def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options every benchmark here takes: size, work folder, repetitions."""
    p.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size to reach, at least (default 2.0)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench-output",
                   help="folder for the run's files, in a fresh subfolder (default: bench-output/ in the repository)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of each step (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of all steps first (default 1)")


def parse_checked(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with ``p`` (which has :func:`add_common_options`) and refuse impossible repetitions."""
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")
    return args


def open_workdir(args: argparse.Namespace, prefix: str) -> tuple[Path, bool]:
    """A fresh subfolder of ``--workdir`` for this run, and whether ``--workdir`` itself was created."""
    created = not args.workdir.exists()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir)), created


def close_workdir(args: argparse.Namespace, work: Path, created: bool) -> None:
    """Remove the run's files unless ``--keep``, and ``--workdir`` too if this run created it empty."""
    if args.keep:
        log(f"kept {work}")
        return
    shutil.rmtree(work, ignore_errors=True)
    if created and not any(args.workdir.iterdir()):
        args.workdir.rmdir()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for details.")
    add_common_options(p)
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="warm: read each step's input first (default); cold: drop the page cache first (root)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive load-everything route")
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON to PATH ('-': stdout, report to stderr)")
    p.add_argument("--check", action="store_true", help="exit 3 when the time or memory goal is missed")
    return parse_checked(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cli = shardwise_cli()
    work, created_workdir = open_workdir(args, "convert-bench-")
    try:
        infos = llama_infos(args.size_gib)
        src = work / "original.safetensors"
        build_checkpoint(src, infos)
        log(f"built {src} ({src.stat().st_size / GiB:.2f} GiB, {len(infos)} tensors) in "
            f"{time.perf_counter() - started:.1f} s")
        bench = Bench(args.cache)
        notes = [bench.note] if bench.note else []
        naive = not args.no_naive and have_safetensors()
        if not args.no_naive and not naive:
            notes.append("the safetensors package is missing: naive route skipped")

        base = baselines(cli)
        base["inspect_seconds"] = inspect_seconds(cli, src)
        steps = main_steps(cli, work, src)
        bench.rounds(steps, args.warmup, args.repeat, "cp and shardwise")
        if naive:
            extra = naive_steps(work, src)
            bench.rounds(extra, args.warmup, args.repeat, "naive route")
            steps += extra
        check = verify(cli, src, work / "final.safetensors")

        by_name = {s.name: s for s in steps}
        ctx = {
            "size_bytes": src.stat().st_size,
            "num_tensors": len(infos),
            "layers": sum(t.name.endswith("q_proj.weight") for t in infos),
            "largest_tensor": max(t.nbytes for t in infos),
            "cache": bench.cache,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "notes": notes,
            "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
            "shardwise": " ".join(cli),
            "workdir": str(work),
            "total_seconds": time.perf_counter() - started,
        }
        summary = summarize(by_name, base, ctx["largest_tensor"])
        print_report(ctx, by_name, base, summary, check, out=sys.stderr if args.json == "-" else sys.stdout)
        if args.json:
            text = json.dumps(json_report(ctx, by_name, base, summary, check), indent=2)
            if args.json == "-":
                print(text)
            else:
                Path(args.json).write_text(text + "\n")
        if check["diff_exit_code"] != 0:
            return 1
        goals = summary["goals"]
        if args.check and not (goals["time_chain_le_1.5x_durable_cp"] and goals["memory_over_help_le_limit"]):
            return 3
        return 0
    finally:
        close_workdir(args, work, created_workdir)


if __name__ == "__main__":
    sys.exit(main())
