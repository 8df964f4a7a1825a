#!/usr/bin/env python3
"""Benchmark: reading a .nemo-style archive in place with shardwise, against NeMo's extract-then-load.

What is measured, in one run, on two archives built from one synthetic Llama-shaped bf16 checkpoint
(>= 2 GiB by default, TinyLlama-1.1B's shapes, built as in ``convert_bench.py``) with
``shardwise convert SRC model.nemo --to archive`` (an uncompressed tar holding model_config.yaml and
the weights): ``model.nemo`` with ``--weights-format safetensors`` (./model_weights.safetensors) and
``model_torch.nemo`` with the default torch weights (./model_weights.ckpt).

1. **inspect**: ``shardwise.inspect("model.nemo")`` against the way NeMo gets at the config and the
   tensor list: extract the whole tar into a temporary folder with ``tarfile`` (``filter="data"``),
   read model_config.yaml (``OmegaConf.load``, as NeMo does; PyYAML if omegaconf is missing), list
   names, shapes and dtypes with ``safetensors.safe_open``, remove the folder.
2. **restore**: ``shardwise.archive.restore_from(path)`` (no model class: a RestoredArchive whose
   state dict holds CPU tensors read in place from the tar) against extract everything, then
   ``safetensors.torch.load_file`` (or ``torch.load(map_location="cpu", weights_only=True)`` for the
   torch-weights archive), then remove the folder, for both archives.
3. **Extra disk space** during each restore: while a step runs, a thread in this process samples every
   ~5 ms the space allocated by the files under the children's TMPDIR (a folder inside the work
   folder, so both ways put their temporary files on the archive's filesystem) and the filesystem's
   free space (``os.statvfs``; noisier: anything else writing to the disk shows up there). Goal for
   shardwise: 0 bytes; extract-then-load needs about the archive's size.
4. **Peak RSS** of each step's process (``ru_maxrss`` through the middleman of ``convert_bench.py``),
   next to the bytes of tensors it returns: restoring returns every tensor, so about 1x the model is
   expected from both ways; what is above that (and above the interpreter with torch imported) shows
   extra copies.

Every step runs in a fresh interpreter (nothing cached in-process); the headline time is the
operation itself, timed inside the child after its imports, and the whole process's wall time
(interpreter start-up and imports included) is shown beside it. Before every step pending writes are
flushed (``sync``, untimed) and the archive is read once, so the page cache is **warm**, for both
ways alike. Steps run round-robin after an untimed warm-up round; medians and best-of-N are
reported. Finally (untimed) both ways' state dicts are compared tensor by tensor.

    python benchmarks/archive_bench.py                       # 2 GiB, warm cache, ~3 minutes
    python benchmarks/archive_bench.py --repeat 5 --json archive.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import (  # noqa: E402 - the sibling benchmark's checkpoint builder, middleman and options
    add_common_options,
    parse_checked,
    ratio,
    close_workdir,
    open_workdir,
    GiB,
    MiB,
    REAPER,
    Run,
    build_checkpoint,
    llama_infos,
    log,
    read_through,
    shardwise_cli,
)

# -- what the children do -------------------------------------------------------------------------
# argv: mode, archive. Prints one JSON line: import and operation seconds, tensors, bytes, VmHWM.
CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
mode, path = sys.argv[1:3]

def touch(state):
    # read every byte once (what load_state_dict's copy would do): safetensors.torch.load_file
    # returns tensors backed by an mmap of the file, whose pages are only read when first used
    for t in state.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()
out = {}
if mode == "sw-inspect":
    import shardwise
    t1 = time.perf_counter()
    info = shardwise.inspect(path)
    out.update(tensors=info["num_tensors"], bytes=info["total_bytes"], config_keys=len(info["config"] or {}))
    out["returned"] = time.perf_counter() - t1
elif mode == "sw-restore":
    import torch
    from shardwise.archive import restore_from
    t1 = time.perf_counter()
    restored = restore_from(path)
    state = restored.state_dict
    restored.close()
    t_returned = time.perf_counter()
    touch(state)
    out.update(returned=t_returned - t1, touch=time.perf_counter() - t_returned)
    out.update(tensors=len(state), bytes=sum(t.nbytes for t in state.values()), config_keys=len(restored.config))
else:  # the NeMo way: extract everything into a temporary folder, read from there, remove it
    import shutil, tarfile, tempfile
    import torch, safetensors, safetensors.torch
    try:
        from omegaconf import OmegaConf
        load_yaml = OmegaConf.load
    except ImportError:
        import yaml
        load_yaml = lambda p: yaml.safe_load(open(p))
    t1 = time.perf_counter()
    tmp = tempfile.mkdtemp()
    with tarfile.open(path, "r:") as tar:
        tar.extractall(tmp, filter="data")
    t_extract = time.perf_counter()
    config = load_yaml(os.path.join(tmp, "model_config.yaml"))
    st, ckpt = os.path.join(tmp, "model_weights.safetensors"), os.path.join(tmp, "model_weights.ckpt")
    if mode == "nemo-inspect":
        tensors = {}
        with safetensors.safe_open(st, framework="pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                tensors[k] = (s.get_shape(), s.get_dtype())
        out.update(tensors=len(tensors), bytes=0)
    else:
        if os.path.exists(st):
            state = safetensors.torch.load_file(st)
        else:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        out.update(tensors=len(state), bytes=sum(t.nbytes for t in state.values()))
    out["config_keys"] = len(config)
    t_load = time.perf_counter()
    if mode == "nemo-restore":  # NeMo uses the weights (load_state_dict) before its TemporaryDirectory goes
        touch(state)
    t_touch = time.perf_counter()
    shutil.rmtree(tmp)
    t_clean = time.perf_counter()
    out.update(extract=t_extract - t1, load=t_load - t_extract, touch=t_touch - t_load, cleanup=t_clean - t_touch)
    out["returned"] = t_clean - t1 - out["touch"]
t2 = time.perf_counter()
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
out.update(imports=t1 - t0, op=t2 - t1, vm_hwm=hwm)
print(json.dumps(out))
"""

# Untimed check: both ways give the same tensors. argv: archive.
VERIFY = r"""
import json, os, sys, shutil, tarfile, tempfile
import torch, safetensors.torch
from shardwise.archive import restore_from
path = sys.argv[1]
ours = restore_from(path).state_dict
tmp = tempfile.mkdtemp()
try:
    with tarfile.open(path, "r:") as tar:
        tar.extractall(tmp, filter="data")
    st = os.path.join(tmp, "model_weights.safetensors")
    if os.path.exists(st):
        theirs = safetensors.torch.load_file(st)
    else:
        theirs = torch.load(os.path.join(tmp, "model_weights.ckpt"), map_location="cpu", weights_only=True)
finally:
    shutil.rmtree(tmp)
bad = [k for k in theirs if k not in ours or ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
print(json.dumps({"same_keys": sorted(ours) == sorted(theirs), "mismatched": bad[:5], "tensors": len(ours)}))
"""


# -- running children and watching the disk -------------------------------------------------------
def run_child(cmd: list[str], env: dict, logs: Path, *, check: bool = True) -> Run:
    """Run ``cmd`` through convert_bench's REAPER middleman (its own peak RSS, wall time) with ``env``.

    The capture files go to ``logs``, not to the children's TMPDIR, which is being measured.
    """
    out, err, stats = logs / "stdout", logs / "stderr", logs / "stats"
    stats.unlink(missing_ok=True)
    with open(out, "wb") as o, open(err, "wb") as e:
        code = subprocess.call([sys.executable, "-I", "-S", "-c", REAPER, str(stats), *cmd], stdout=o, stderr=e, env=env)
    seconds, max_rss = stats.read_text().split() if stats.exists() else ("nan", "0")
    result = Run(cmd, float(seconds), int(max_rss), code, out.read_text(errors="replace"), err.read_text(errors="replace"))
    if check and code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {code}:\n{result.stderr or result.stdout}")
    return result


def allocated_bytes(folder: Path) -> int:
    """Disk space allocated to the files under ``folder`` (st_blocks; folders and vanishing files are skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class DiskWatch:
    """Samples, every ``interval`` s in a thread, the bytes under ``folder`` and the drop in free space."""

    def __init__(self, folder: Path, interval: float = 0.005) -> None:
        self.folder, self.interval = folder, interval
        self.peak_tree = self.peak_drop = self.samples = 0
        self._stop = threading.Event()

    def _free(self) -> int:
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_tree = max(self.peak_tree, allocated_bytes(self.folder))
            self.peak_drop = max(self.peak_drop, self.start_free - self._free())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "DiskWatch":
        self.start_free = self._free()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Step:
    """One timed step: a CHILD mode on one archive."""

    name: str
    label: str
    mode: str
    archive: Path
    runs: list[Run] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    disk_tree: list[int] = field(default_factory=list)
    disk_drop: list[int] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.results]

    def median(self, key: str = "op") -> float:
        """Median of a time the child reported: "returned" (the call returns) or "op" (+ every byte read)."""
        return statistics.median(self.values(key))

    def best(self, key: str = "op") -> float:
        return min(self.values(key))

    @property
    def process_median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max(r.max_rss for r in self.runs)


class Bench:
    def __init__(self, work: Path) -> None:
        self.tmp, self.logs = work / "tmp", work / "logs"
        self.tmp.mkdir()
        self.logs.mkdir()
        self.env = {**os.environ, "TMPDIR": str(self.tmp)}

    def measure(self, step: Step, *, record: bool = True) -> None:
        os.sync()  # untimed: earlier steps' dirty pages must not be written back during this one
        read_through(step.archive)  # warm page cache, the same for both ways
        with DiskWatch(self.tmp) as watch:
            result = run_child([sys.executable, "-c", CHILD, step.mode, str(step.archive)], self.env, self.logs)
        leftover = list(self.tmp.iterdir())
        if leftover:
            raise RuntimeError(f"{step.label} left {', '.join(p.name for p in leftover)} in {self.tmp}")
        if record:
            step.runs.append(result)
            step.results.append(json.loads(result.stdout.strip().splitlines()[-1]))
            step.disk_tree.append(watch.peak_tree)
            step.disk_drop.append(watch.peak_drop)

    def rounds(self, steps: list[Step], warmup: int, repeat: int) -> None:
        for i in range(warmup + repeat):
            for step in steps:
                self.measure(step, record=i >= warmup)
            stage = f"warm-up {i + 1}/{warmup}" if i < warmup else f"round {i + 1 - warmup}/{repeat}"
            log(f"  {stage} done")

    def baseline_rss(self) -> int:
        """Peak RSS of an interpreter that imports what the restoring children import."""
        code = "import torch, safetensors.torch, shardwise.archive, tarfile"
        return max(run_child([sys.executable, "-c", code], self.env, self.logs).max_rss for _ in range(3))

    def verify(self, archive: Path) -> dict:
        result = run_child([sys.executable, "-c", VERIFY, str(archive)], self.env, self.logs, check=False)
        if result.returncode:
            return {"ok": False, "error": (result.stderr or result.stdout)[-2000:]}
        out = json.loads(result.stdout.strip().splitlines()[-1])
        out["ok"] = out["same_keys"] and not out["mismatched"]
        return out


# -- building the archives ------------------------------------------------------------------------
def hparams_yaml(layers: int) -> str:
    """A TinyLlama-like NeMo model config, so model_config.yaml is not empty."""
    return f"""\
target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel
num_layers: {layers}
hidden_size: 2048
ffn_hidden_size: 5632
num_attention_heads: 32
num_query_groups: 4
max_position_embeddings: 2048
normalization: rmsnorm
activation: fast-swiglu
position_embedding_type: rope
precision: bf16-mixed
tokenizer:
  library: huggingface
  type: TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
"""


def build_archives(cli: list[str], work: Path, size_gib: float) -> tuple[dict, Path, Path]:
    started = time.perf_counter()
    infos = llama_infos(size_gib)
    layers = sum(t.name.endswith("q_proj.weight") for t in infos)
    src, hparams = work / "model.safetensors", work / "hparams.yaml"
    build_checkpoint(src, infos)
    hparams.write_text(hparams_yaml(layers))
    log(f"built {src.name} ({src.stat().st_size / GiB:.2f} GiB, {len(infos)} tensors) in "
        f"{time.perf_counter() - started:.1f} s")
    st_archive, pt_archive = work / "model.nemo", work / "model_torch.nemo"
    for dst, extra in ((st_archive, ["--weights-format", "safetensors"]), (pt_archive, [])):
        t = time.perf_counter()
        cmd = cli + ["convert", "--quiet", str(src), str(dst), "--to", "archive", "--hparams-file", str(hparams), *extra]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr}")
        log(f"built {dst.name} ({dst.stat().st_size / GiB:.2f} GiB) in {time.perf_counter() - t:.1f} s")
    src.unlink()  # not needed any more; keeps the page cache for the archives
    ctx = {
        "num_tensors": len(infos),
        "layers": layers,
        "tensor_bytes": sum(t.nbytes for t in infos),
        "largest_tensor": max(t.nbytes for t in infos),
        "archive_bytes": st_archive.stat().st_size,
        "torch_archive_bytes": pt_archive.stat().st_size,
        "build_seconds": time.perf_counter() - started,
    }
    return ctx, st_archive, pt_archive


def make_steps(st_archive: Path, pt_archive: Path) -> list[Step]:
    return [
        Step("inspect_sw", "inspect: shardwise.inspect", "sw-inspect", st_archive),
        Step("inspect_nemo", "inspect: extract all + yaml + safe_open", "nemo-inspect", st_archive),
        Step("restore_st_sw", "restore safetensors: shardwise", "sw-restore", st_archive),
        Step("restore_st_nemo", "restore safetensors: extract + load_file", "nemo-restore", st_archive),
        Step("restore_pt_sw", "restore torch: shardwise", "sw-restore", pt_archive),
        Step("restore_pt_nemo", "restore torch: extract + torch.load", "nemo-restore", pt_archive),
    ]


# -- reporting ------------------------------------------------------------------------------------
PAIRS = [  # (label, shardwise step, NeMo-way step)
    ("inspect (safetensors archive)", "inspect_sw", "inspect_nemo"),
    ("restore (safetensors weights)", "restore_st_sw", "restore_st_nemo"),
    ("restore (torch weights)", "restore_pt_sw", "restore_pt_nemo"),
]


def summarize(steps: dict[str, Step], base_rss: int) -> dict:
    ratios = {}
    for label, ours, theirs in PAIRS:
        a, b = steps[ours], steps[theirs]
        r = {"label": label, "process_median": ratio(a.process_median, b.process_median)}
        for key in ("returned", "op"):
            r[f"{key}_median"] = ratio(a.median(key), b.median(key))
            r[f"{key}_best"] = ratio(a.best(key), b.best(key))
        ratios[ours.removesuffix("_sw")] = r
    memory = {}
    for name, s in steps.items():
        if name.startswith("restore"):
            tensors = s.results[0]["bytes"]
            memory[name] = {"peak_rss": s.peak_rss, "over_imports": s.peak_rss - base_rss, "tensor_bytes": tensors,
                            "over_imports_vs_tensors": ratio(s.peak_rss - base_rss, tensors)}
    disk = {name: {"peak_tree": max(s.disk_tree), "peak_free_drop": max(s.disk_drop)} for name, s in steps.items()}
    goals = {"shardwise_restore_extra_disk_zero": all(disk[n]["peak_tree"] == 0 for n in ("restore_st_sw", "restore_pt_sw"))}
    return {"ratios": ratios, "memory": memory, "disk": disk, "goals": goals}


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def print_report(ctx: dict, steps: dict[str, Step], summary: dict, checks: dict, out=sys.stdout) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

    say(f"\nshardwise archive benchmark: {ctx['archive_bytes'] / GiB:.2f} GiB archive (uncompressed tar), "
        f"Llama-shaped bf16, {ctx['layers']} layers, {ctx['num_tensors']} tensors, {mib(ctx['tensor_bytes'])} of tensors")
    say(f"warm page cache (archive read before each step); fresh process per step; median of {ctx['repeat']} "
        f"after {ctx['warmup']} warm-up round(s); {ctx['machine']}")
    say(f"children's TMPDIR: {ctx['tmpdir_note']}; NeMo way reads the config with {ctx['yaml']}")

    say(f"\n{'step':<42}{'returned s':>11}{'best':>7}{'+touch s':>10}{'best':>7}{'process s':>10}{'peak RSS':>10}"
        f"{'extra disk':>12}")
    for s in steps.values():
        say(f"{s.label:<42}{s.median('returned'):>11.3f}{s.best('returned'):>7.3f}{s.median():>10.3f}{s.best():>7.3f}"
            f"{s.process_median:>10.2f}{mib(s.peak_rss):>10}{mib(max(s.disk_tree)):>12}")
    say("  returned = until the call returns (NeMo way: extract, load, remove the folder); +touch = until every byte of")
    say("  every tensor has been read once (NeMo way: before removing the folder, as load_state_dict would); process =")
    say("  whole child wall time incl. interpreter start-up and imports; all medians. Runs of the +touch time:")
    for s in steps.values():
        say(f"    {s.label:<42}{' '.join(f'{x:.2f}' for x in s.values('op'))}")
    for name in ("inspect_nemo", "restore_st_nemo", "restore_pt_nemo"):
        s = steps[name]
        keys = ("extract", "load", "touch", "cleanup") if name.startswith("restore") else ("extract", "load", "cleanup")
        say(f"  {s.label}: " + ", ".join(f"{k} {s.median(k):.2f} s" for k in keys))
    for name in ("restore_st_sw", "restore_pt_sw"):
        s = steps[name]
        say(f"  {s.label}: restore_from {s.median('returned'):.2f} s, touch {s.median('touch'):.2f} s")

    say(f"\n{'time ratio shardwise / NeMo way (lower is better)':<54}{'median':>8}{'best':>8}{'process':>9}")
    for r in summary["ratios"].values():
        say(f"{r['label'] + ', returned':<54}{r['returned_median']:>7.3f}x{r['returned_best']:>7.3f}x{r['process_median']:>8.2f}x")
        if not r["label"].startswith("inspect"):
            say(f"{r['label'] + ', +touch (tensors used)':<54}{r['op_median']:>7.3f}x{r['op_best']:>7.3f}x")

    d = summary["disk"]
    say("\nextra disk during restore: peak bytes of files under TMPDIR / peak drop of the filesystem's free space")
    for name in ("restore_st_sw", "restore_st_nemo", "restore_pt_sw", "restore_pt_nemo"):
        say(f"  {steps[name].label:<42}{d[name]['peak_tree']:>14,} B / {d[name]['peak_free_drop']:>14,} B")
    say(f"  archive sizes: {ctx['archive_bytes']:,} B (safetensors), {ctx['torch_archive_bytes']:,} B (torch); "
        f"goal for shardwise: 0 bytes  {'PASS' if summary['goals']['shardwise_restore_extra_disk_zero'] else 'FAIL'}")

    say(f"\npeak RSS of each restore (ru_maxrss); baseline: interpreter + imports = {mib(ctx['base_rss'])}")
    for name, m in summary["memory"].items():
        say(f"  {steps[name].label:<42}{mib(m['peak_rss']):>10}  - baseline = {mib(m['over_imports']):>9} = "
            f"{m['over_imports_vs_tensors']:.2f}x the {mib(m['tensor_bytes'])} of tensors returned")

    verdicts = ", ".join(f"{name}: {'identical' if c['ok'] else 'DIFFERENT ' + str(c)}" for name, c in checks.items())
    say(f"\ncorrectness (shardwise state dict vs extract-then-load, every tensor): {verdicts}")
    say(f"total benchmark time {ctx['total_seconds']:.0f} s (building the archives {ctx['build_seconds']:.0f} s)")


def json_report(ctx: dict, steps: dict[str, Step], summary: dict, checks: dict) -> dict:
    return {
        "context": ctx,
        "steps": {
            name: {"label": s.label, "archive": s.archive.name,
                   "returned_median_seconds": s.median("returned"), "returned_best_seconds": s.best("returned"),
                   "touched_median_seconds": s.median(), "touched_best_seconds": s.best(),
                   "process_seconds": [r.seconds for r in s.runs], "peak_rss": s.peak_rss,
                   "disk_peak_tree": s.disk_tree, "disk_peak_free_drop": s.disk_drop, "child": s.results}
            for name, s in steps.items()
        },
        **summary,
        "verification": checks,
    }


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for details.")
    add_common_options(p)
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON to PATH ('-': stdout, report to stderr)")
    return parse_checked(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cli = shardwise_cli()
    work, created_workdir = open_workdir(args, "archive-bench-")
    try:
        ctx, st_archive, pt_archive = build_archives(cli, work, args.size_gib)
        bench = Bench(work)
        ctx["base_rss"] = bench.baseline_rss()
        steps = make_steps(st_archive, pt_archive)
        bench.rounds(steps, args.warmup, args.repeat)
        checks = {"safetensors": bench.verify(st_archive), "torch": bench.verify(pt_archive)}
        try:
            import omegaconf  # noqa: F401
            yaml_reader = "OmegaConf.load"
        except ImportError:
            yaml_reader = "yaml.safe_load"
        same_fs = os.stat(bench.tmp).st_dev == os.stat(st_archive).st_dev
        ctx.update({
            "repeat": args.repeat,
            "warmup": args.warmup,
            "cache": "warm",
            "yaml": yaml_reader,
            "tmpdir": str(bench.tmp),
            "tmpdir_note": f"{bench.tmp} ({'same filesystem as the archives' if same_fs else 'NOT the archives filesystem'})",
            "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
            "workdir": str(work),
            "total_seconds": time.perf_counter() - started,
        })
        by_name = {s.name: s for s in steps}
        summary = summarize(by_name, ctx["base_rss"])
        print_report(ctx, by_name, summary, checks, out=sys.stderr if args.json == "-" else sys.stdout)
        if args.json:
            text = json.dumps(json_report(ctx, by_name, summary, checks), indent=2)
            if args.json == "-":
                print(text)
            else:
                Path(args.json).write_text(text + "\n")
        return 0 if all(c["ok"] for c in checks.values()) else 1
    finally:
        close_workdir(args, work, created_workdir)


if __name__ == "__main__":
    sys.exit(main())
