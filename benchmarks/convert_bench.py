#!/usr/bin/env python3
"""Benchmark: safetensors -> torch -> safetensors with the shardwise CLI, against cp and the naive route.

What is measured, all in one run and on the same machine state:

1. **Time against cp.** A synthetic Llama-shaped bf16 checkpoint (>= 2 GiB by default) is converted
   with ``shardwise convert SRC model.pt --to torch`` (leg 1) and back with ``shardwise convert
   model.pt model.safetensors --to safetensors`` (leg 2), each as a subprocess, wall clock. Each
   leg is compared with ``cp`` of that leg's own input file (same bytes). shardwise fsyncs what it
   writes (crash safety) and plain ``cp`` does not, so ``cp`` followed by ``sync FILE`` ("durable
   cp") is the fair baseline; ratios against both are printed. The two-leg chain is compared with
   the two cp's. Goal: chain <= 1.5x durable cp.
2. **Time against the naive route**: ``safetensors.torch.load_file`` + ``torch.save``, then
   ``torch.load(weights_only=True)`` + ``safetensors.torch.save_file``, each leg a subprocess. The
   naive script fsyncs its output too (as shardwise does) and reports how long that took, so the
   naive time is shown both durable (wall clock) and without the fsync.
3. **Peak memory.** Every command is started by a tiny middleman interpreter that reaps it with
   ``os.wait4``, whose ``ru_maxrss`` is the peak RSS of exactly that process (what ``/usr/bin/time
   -v`` reports as "Maximum resident set size"). The conversion's peak RSS minus
   the RSS of ``shardwise --help`` (the interpreter and the CLI's imports) is compared with the
   largest tensor. Goal: at most 2x the largest tensor + 256 MiB. Because ``shardwise --help`` does
   not import torch, the RSS of ``python -c "import shardwise, torch"`` is shown as a second baseline.

Cache state: before every timed step, pending writes are flushed (``sync``, untimed) and the step's
input is read once (``--cache warm``, the default), or the page cache is dropped (``--cache cold``,
needs root; falls back to warm with a note). cp and shardwise therefore start from the same state.
Every measurement is repeated (``--repeat``, default 3) in round-robin order, after one untimed
round (``--warmup``) that brings the page cache and the machine's memory to a steady state (on
VMs, the first touch of memory can cost more than the copy itself); medians are reported.
At the end ``shardwise diff ORIGINAL FINAL`` must exit 0 (bit-exact round trip).

    python benchmarks/convert_bench.py                 # 2 GiB, warm cache, 3 repeats
    python benchmarks/convert_bench.py --cache cold --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from shardwise.formats.safetensors import write_safetensors
from shardwise.tensors import TensorInfo

MiB = 1024**2
GiB = 1024**3
REPO = Path(__file__).resolve().parent.parent

# TinyLlama-1.1B's shape (Llama 2 architecture, grouped-query attention with 4 KV heads of 64).
HIDDEN, INTERMEDIATE, VOCAB, KV_DIM = 2048, 5632, 32000, 256
BF16 = 2

CHUNK = 16 * MiB  # write size when building the checkpoint
POOL = 64 * MiB  # random bytes reused, at a different offset for every tensor


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
    """Embeddings, final norm, lm_head, and as many decoder layers as reach ``size_gib``."""
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


def random_pool(seed: int) -> memoryview:
    """POOL + CHUNK random bytes, every bf16 value finite (exponent's top bit cleared: |x| < 2)."""
    import torch

    buf = bytearray(POOL + CHUNK)
    pool = torch.frombuffer(buf, dtype=torch.uint8)
    pool.random_(generator=torch.Generator().manual_seed(seed))
    pool.view(torch.int16).bitwise_and_(~0x4000)  # little-endian: bit 14 is the exponent's top bit
    return memoryview(buf)


def build_checkpoint(path: Path, infos: list[TensorInfo], seed: int = 0) -> None:
    """Stream a safetensors file with shardwise's writer; memory stays at one random pool."""
    pool = random_pool(seed)
    offsets = {info.name: (i * 7919 * 2 * 64) % POOL for i, info in enumerate(infos)}  # even: bf16-aligned

    def write_tensor(info: TensorInfo, f: BinaryIO) -> None:
        pos, remaining = offsets[info.name], info.nbytes
        while remaining:
            n = min(remaining, CHUNK)
            f.write(pool[pos : pos + n])
            remaining -= n
            pos = (pos + n) % POOL

    with open(path, "wb") as f:
        write_safetensors(f, infos, write_tensor, metadata={"format": "pt"})
        f.flush()
        os.fsync(f.fileno())


# -- running and measuring subprocesses ----------------------------------------------------------
@dataclass
class Run:
    """One subprocess: wall seconds, peak RSS in bytes (its own ru_maxrss), exit code and output."""

    cmd: list[str]
    seconds: float
    max_rss: int
    returncode: int
    stdout: str = ""
    stderr: str = ""


# A small middleman between this (large) process and each measured command. Linux carries a
# process's peak RSS across exec, so a command spawned directly from here would report at least
# this process's own RSS (torch, the random pool); spawned from a fresh, tiny interpreter, its
# ru_maxrss (from wait4, as /usr/bin/time -v gets it) is its own.
REAPER = r"""
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str], *, check: bool = True) -> Run:
    """Run ``cmd`` through REAPER; wall seconds are measured here, around the whole middleman."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err, rss = (Path(tmp) / name for name in ("stdout", "stderr", "maxrss"))
        with open(out, "wb") as o, open(err, "wb") as e:
            start = time.perf_counter()
            code = subprocess.call([sys.executable, "-I", "-S", "-c", REAPER, str(rss), *cmd], stdout=o, stderr=e)
            seconds = time.perf_counter() - start
        result = Run(cmd, seconds, int(rss.read_text() or 0) if rss.exists() else 0, code,
                     out.read_text(errors="replace"), err.read_text(errors="replace"))
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr or result.stdout}")
    return result


def shardwise_cli() -> list[str]:
    """The ``shardwise`` console script of this interpreter's environment (or ``python -m shardwise``)."""
    script = Path(sys.executable).parent / "shardwise"
    if script.exists():
        return [str(script)]
    found = shutil.which("shardwise")
    return [found] if found else [sys.executable, "-m", "shardwise"]


def drop_caches() -> bool:
    os.sync()
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


def remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@dataclass
class Step:
    """A timed step: commands run back to back from one cache state; outputs removed beforehand."""

    name: str
    source: Path
    commands: list[list[str]]
    outputs: list[Path]
    runs: list[Run] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak_rss(self) -> int:
        return max(r.max_rss for r in self.runs)


class Bench:
    def __init__(self, cache: str) -> None:
        self.cache = cache
        if cache == "cold" and not drop_caches():
            self.cache = "warm"
            self.note = "could not drop the page cache (not root?): measured with a warm cache instead"
        else:
            self.note = ""

    def prepare(self, source: Path) -> None:
        os.sync()  # untimed: earlier steps' dirty pages must not be written back during this one
        if self.cache == "cold":
            drop_caches()
        else:
            read_through(source)

    def measure(self, step: Step, *, record: bool = True) -> None:
        remove(*step.outputs)
        self.prepare(step.source)
        start = time.perf_counter()
        runs = [run(cmd) for cmd in step.commands]
        seconds = time.perf_counter() - start
        if record:
            step.runs += runs
            step.seconds.append(seconds)


# -- the naive route --------------------------------------------------------------------------------
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


def naive_fsync_seconds(step: Step) -> float:
    return statistics.median(json.loads(r.stdout)["fsync"] for r in step.runs)


# -- the benchmark ---------------------------------------------------------------------------------
def baselines(cli: list[str]) -> dict:
    helps = [run(cli + ["--help"]) for _ in range(3)]
    torch_imports = [run([sys.executable, "-c", "import shardwise, torch"]) for _ in range(3)]
    return {
        "help_rss": max(r.max_rss for r in helps),
        "help_seconds": statistics.median(r.seconds for r in helps),
        "torch_rss": max(r.max_rss for r in torch_imports),
        "torch_seconds": statistics.median(r.seconds for r in torch_imports),
    }


def make_steps(cli: list[str], work: Path, src: Path, naive: bool) -> dict[str, Step]:
    pt, final, copy = work / "model.pt", work / "final.safetensors", work / "copy.bin"
    npt, nfinal = work / "naive.pt", work / "naive.safetensors"
    quiet = ["--quiet"]
    steps = [
        Step("cp1", src, [["cp", str(src), str(copy)]], [copy]),
        Step("cp1_sync", src, [["cp", str(src), str(copy)], ["sync", str(copy)]], [copy]),
        Step("leg1", src, [cli + ["convert", str(src), str(pt), "--to", "torch"] + quiet], [pt]),
        Step("cp2", pt, [["cp", str(pt), str(copy)]], [copy]),
        Step("cp2_sync", pt, [["cp", str(pt), str(copy)], ["sync", str(copy)]], [copy]),
        Step("leg2", pt, [cli + ["convert", str(pt), str(final), "--to", "safetensors"] + quiet], [final]),
    ]
    if naive:
        steps += [
            Step("naive1", src, [[sys.executable, "-c", NAIVE, "to-torch", str(src), str(npt)]], [npt]),
            Step("naive2", npt, [[sys.executable, "-c", NAIVE, "to-safetensors", str(npt), str(nfinal)]], [nfinal]),
        ]
    return {s.name: s for s in steps}


def verify(cli: list[str], src: Path, final: Path) -> dict:
    result = run(cli + ["diff", str(src), str(final), "--quiet"], check=False)
    identical = run(["cmp", "-s", str(src), str(final)], check=False).returncode == 0
    return {"diff_exit_code": result.returncode, "diff_seconds": result.seconds, "byte_identical": identical,
            "diff_output": result.stdout.strip()}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(steps: dict[str, Step], base: dict, largest: int) -> dict:
    t = {name: s.median for name, s in steps.items()}
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
        naive_no_fsync = naive - naive_fsync_seconds(steps["naive1"]) - naive_fsync_seconds(steps["naive2"])
        times["chain_vs_naive"] = ratio(chain, naive)
        times["chain_vs_naive_no_fsync"] = ratio(chain, naive_no_fsync)
        times["leg1_vs_naive"] = ratio(t["leg1"], t["naive1"])
        times["leg2_vs_naive"] = ratio(t["leg2"], t["naive2"])
    peak = max(steps["leg1"].peak_rss, steps["leg2"].peak_rss)
    limit = 2 * largest + 256 * MiB
    memory = {
        "largest_tensor": largest,
        "conversion_peak_rss": peak,
        "limit": limit,
        "over_help": peak - base["help_rss"],
        "over_torch_import": peak - base["torch_rss"],
    }
    memory["over_help_vs_largest"] = ratio(memory["over_help"], largest)
    memory["over_torch_import_vs_largest"] = ratio(memory["over_torch_import"], largest)
    goals = {
        "time_chain_le_1.5x_durable_cp": times["chain_vs_durable_cp"] <= 1.5,
        "time_chain_le_1.5x_plain_cp": times["chain_vs_plain_cp"] <= 1.5,
        "memory_over_help_le_limit": memory["over_help"] <= limit,
        "memory_over_torch_import_le_limit": memory["over_torch_import"] <= limit,
    }
    return {"ratios": times, "memory": memory, "goals": goals}


# -- printing --------------------------------------------------------------------------------------
LABELS = {
    "cp1": "cp SRC (safetensors)",
    "cp1_sync": "cp SRC + sync (durable)",
    "leg1": "shardwise safetensors -> torch (leg 1)",
    "cp2": "cp model.pt",
    "cp2_sync": "cp model.pt + sync (durable)",
    "leg2": "shardwise torch -> safetensors (leg 2)",
    "naive1": "naive load_file + torch.save (+fsync)",
    "naive2": "naive torch.load + save_file (+fsync)",
}


def mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_report(ctx: dict, steps: dict[str, Step], base: dict, summary: dict, check: dict) -> None:
    print(f"\nshardwise convert benchmark: {ctx['size_bytes'] / GiB:.2f} GiB Llama-shaped bf16 checkpoint, "
          f"{ctx['layers']} layers, {ctx['num_tensors']} tensors, largest tensor {mib(ctx['largest_tensor'])}")
    print(f"{ctx['cache']} page cache, median of {ctx['repeat']} after {ctx['warmup']} warm-up round(s); {ctx['machine']}")
    if ctx["note"]:
        print(f"note: {ctx['note']}")

    print(f"\n{'step':<42}{'median s':>9}{'GiB/s':>8}{'peak RSS':>13}   runs (s)")
    for name, s in steps.items():
        size = s.source.stat().st_size
        runs = " ".join(f"{x:.2f}" for x in s.seconds)
        print(f"{LABELS[name]:<42}{s.median:>9.2f}{size / GiB / s.median:>8.2f}{mib(s.peak_rss):>13}   {runs}")
    if "naive1" in steps:
        fsync = naive_fsync_seconds(steps["naive1"]) + naive_fsync_seconds(steps["naive2"])
        print(f"  (of the naive route's time, {fsync:.2f} s is its final fsyncs)")
    print(f"startup: `shardwise --help` {base['help_seconds']:.2f} s, `python -c 'import shardwise, torch'` "
          f"{base['torch_seconds']:.2f} s")

    r, m, g = summary["ratios"], summary["memory"], summary["goals"]
    print(f"\n{'time ratio (lower is better)':<52}{'ratio':>8}   goal")
    rows = [
        ("chain vs 2 durable cp's (fair baseline)", "chain_vs_durable_cp", f"<= 1.5x  {verdict(g['time_chain_le_1.5x_durable_cp'])}"),
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
            print(f"{label:<52}{r[key]:>7.2f}x   {goal}")

    print(f"\nmemory (peak RSS = ru_maxrss of the process)")
    print(f"  baseline `shardwise --help`                 {mib(base['help_rss']):>13}")
    print(f"  baseline `python -c 'import shardwise, torch'` {mib(base['torch_rss']):>10}")
    print(f"  shardwise conversion peak (max of legs)     {mib(m['conversion_peak_rss']):>13}")
    if "naive1" in steps:
        print(f"  naive route peak (leg 1 / leg 2)            {mib(steps['naive1'].peak_rss):>13} / "
              f"{mib(steps['naive2'].peak_rss)}")
    print(f"  largest tensor                              {mib(m['largest_tensor']):>13}")
    print(f"  goal: peak - baseline <= 2 x largest + 256 MiB = {mib(m['limit'])}")
    print(f"  peak - `shardwise --help`     = {mib(m['over_help']):>12} = {m['over_help_vs_largest']:5.2f}x largest   "
          f"{verdict(g['memory_over_help_le_limit'])}")
    print(f"  peak - `import shardwise, torch` = {mib(m['over_torch_import']):>9} = "
          f"{m['over_torch_import_vs_largest']:5.2f}x largest   {verdict(g['memory_over_torch_import_le_limit'])}")

    ok = check["diff_exit_code"] == 0
    print(f"\ncorrectness: `shardwise diff original final` exit {check['diff_exit_code']} "
          f"({'bit-exact' if ok else 'DIFFERENT'}, {check['diff_seconds']:.1f} s); "
          f"final file byte-identical to the original: {'yes' if check['byte_identical'] else 'no'}")
    if not ok:
        print(check["diff_output"])


def json_report(ctx: dict, steps: dict[str, Step], base: dict, summary: dict, check: dict) -> dict:
    return {
        "context": {k: v for k, v in ctx.items()},
        "steps": {
            name: {"label": LABELS[name], "median_seconds": s.median, "seconds": s.seconds, "peak_rss": s.peak_rss,
                   "input_bytes": s.source.stat().st_size}
            for name, s in steps.items()
        },
        "baselines": base,
        **summary,
        "verification": {k: v for k, v in check.items() if k != "diff_output"},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size to reach, at least (default 2.0)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench-output",
                   help="parent folder for the run's files (default: bench-output/ in the repository)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of all steps first (default 1)")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="warm: read each step's input first (default); cold: drop the page cache (root)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive load-everything route")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="also write the numbers as JSON (- or no PATH: stdout)")
    p.add_argument("--check", action="store_true", help="exit 3 when a goal (durable cp, --help baseline) is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli = shardwise_cli()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    try:
        infos = llama_infos(args.size_gib)
        src = work / "original.safetensors"
        started = time.perf_counter()
        build_checkpoint(src, infos)
        built = time.perf_counter() - started
        bench = Bench(args.cache)
        naive = not args.no_naive and have_safetensors()
        ctx = {
            "size_bytes": src.stat().st_size,
            "num_tensors": len(infos),
            "layers": sum(1 for t in infos if t.name.endswith("q_proj.weight")),
            "largest_tensor": max(t.nbytes for t in infos),
            "cache": bench.cache,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "note": bench.note if naive or args.no_naive else (bench.note + "; safetensors missing: naive route skipped").lstrip("; "),
            "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
            "workdir": str(work),
            "build_seconds": built,
            "shardwise": " ".join(cli),
        }
        print(f"built {src} ({ctx['size_bytes'] / GiB:.2f} GiB, {len(infos)} tensors) in {built:.1f} s; "
              f"measuring ({args.cache} cache, {args.repeat} repeats)...", file=sys.stderr)
        base = baselines(cli)
        steps = make_steps(cli, work, src, naive)
        for i in range(args.warmup + args.repeat):
            for step in steps.values():
                bench.measure(step, record=i >= args.warmup)
            what = f"warm-up {i + 1}/{args.warmup}" if i < args.warmup else f"repeat {i + 1 - args.warmup}/{args.repeat}"
            print(f"  {what} done", file=sys.stderr)
        check = verify(cli, src, work / "final.safetensors")
        summary = summarize(steps, base, ctx["largest_tensor"])
        print_report(ctx, steps, base, summary, check)
        if args.json:
            text = json.dumps(json_report(ctx, steps, base, summary, check), indent=2)
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
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
            with_parent = args.workdir
            if with_parent.exists() and not any(with_parent.iterdir()):
                with_parent.rmdir()


if __name__ == "__main__":
    sys.exit(main())
