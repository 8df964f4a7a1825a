"""Rich rendering of ``inspect`` and ``diff`` results for people (JSON output bypasses this)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from .units import format_bytes

__all__ = ["render_inspect", "render_diff"]

_TABLE_ROWS = 40


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True, markup=False)  # names and values come from files: never markup


def render_inspect(summary: dict, *, show_all: bool = False) -> None:
    console = _console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")
    head.add_row("path", summary["path"])
    fmt = summary["format"] + (f" ({summary['weights_format']} weights)" if summary["format"] == "hf" else "")
    head.add_row("format", fmt)
    head.add_row("files", str(len(summary["files"])))
    head.add_row("tensors", f"{summary['num_tensors']:,}")
    head.add_row("parameters", f"{summary['num_params']:,}")
    head.add_row("size", f"{format_bytes(summary['total_bytes'])} ({summary['total_bytes']:,} bytes)")
    head.add_row("dtypes", ", ".join(f"{d} x{n}" for d, n in summary["dtypes"].items()) or "-")
    head.add_row("layout", "unsharded" if summary["layout"] is None else json.dumps(summary["layout"]))
    config = summary.get("config")
    if config:
        keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        shown = {k: config[k] for k in keys if k in config}
        head.add_row("config", ", ".join(f"{k}={v}" for k, v in shown.items()) or f"{len(config)} keys")
    if summary.get("tokenizer_files"):
        head.add_row("tokenizer", ", ".join(summary["tokenizer_files"]))
    if summary.get("companion_files"):
        head.add_row("other files", ", ".join(f for f in summary["companion_files"] if f not in summary["tokenizer_files"]))
    state = summary.get("training_state") or {}
    for key in ("epoch", "global_step", "pytorch-lightning_version"):
        if key in state:
            head.add_row(key, str(state[key]))
    for key in ("optimizer_states", "optimizer"):
        if key in state:
            value = state[key] if isinstance(state[key], list) else [state[key]]
            head.add_row(key, "; ".join(f"{o.get('num_tensors', 0)} tensors, {format_bytes(o.get('total_bytes', 0))} (not weights)" for o in value))
    if "lr_schedulers" in state:
        head.add_row("lr_schedulers", str(len(state["lr_schedulers"])))
    if "hyper_parameters" in state:
        head.add_row("hyper_parameters", f"{len(state['hyper_parameters'] or {})} keys (see --json)")
    parallel = summary.get("parallel")
    if parallel:
        if "error" in parallel:
            head.add_row("parallel", f"not resolved: {parallel['error']}")
        else:
            options = f"qkv {parallel['qkv']}" + (f", KV heads x{parallel['kv_size_multiplier']}" if parallel["kv_size_multiplier"] > 1 else "")
            vocab = f"vocab {parallel['vocab']}" + (f" padded to {parallel['padded_vocab']}" if parallel["padded_vocab"] != parallel["vocab"] else "")
            head.add_row("parallel", f"{parallel['container']} ({parallel['encoding']}), style {parallel['style']}, TP={parallel['tp']} PP={parallel['pp']}, {options}, {vocab}"
                         + ("" if parallel["has_manifest"] else " (inferred: no shardwise manifest)"))
            for stage in parallel["stages"]:
                last = stage["first_layer"] + stage["num_layers"] - 1
                head.add_row("", f"pp_rank {stage['pp_rank']}: layers {stage['first_layer']}-{last}")
    archive = summary.get("archive")
    if archive:
        files = [m for m in archive["members"] if m["kind"] == "file"]
        head.add_row("members", f"{len(files)} files{' (gzip-compressed)' if archive['compressed'] else ''}")
        for artifact in archive["artifacts"]:
            used = ", ".join(artifact["referenced_by"]) or "not referenced by the config"
            size = "MISSING" if artifact["kind"] == "missing" else f"{artifact['files']} file(s), {format_bytes(artifact['size'])}"
            head.add_row("artifact", f"{artifact['name']} ({size}) <- {used}")
        manifest = archive["manifest"]
        head.add_row("manifest", f"{manifest['format']} v{manifest['version']} ({manifest['created_by']})" if manifest else "none (not written by shardwise)")
    if summary.get("integrity"):
        head.add_row("integrity", summary["integrity"])
    console.print(head)

    tensors = summary["tensors"]
    shown = tensors if show_all else tensors[:_TABLE_ROWS]
    table = Table(title=None, show_lines=False)
    table.add_column("tensor", overflow="fold")
    table.add_column("shape")
    table.add_column("dtype")
    for t in shown:
        table.add_row(t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"])
    console.print(table)
    if len(shown) < len(tensors):
        console.print(f"... {len(tensors) - len(shown)} more tensors (--all lists them, --json gives everything)")


def render_diff(report) -> None:
    console = _console()
    mode = "bit-exact" if report.atol is None and report.rtol is None else f"atol={report.atol or 0}, rtol={report.rtol or 0}"
    if report.equal:
        console.print(f"equal ({mode}): {report.compared} tensors, {format_bytes(report.compared_bytes)} compared")
        return
    table = Table()
    table.add_column("tensor", overflow="fold")
    table.add_column("difference")
    for name in report.missing:
        table.add_row(name, f"only in {report.a}")
    for name in report.extra:
        table.add_row(name, f"only in {report.b}")
    for m in report.mismatches:
        if m.reason == "values":
            detail = f"values: {m.mismatched_elements:,} elements differ, max |a-b| = {m.max_abs_diff:.6g}"
            if m.a["dtype"] != m.b["dtype"]:
                detail += f" ({m.a['dtype']} vs {m.b['dtype']})"
        else:
            detail = f"{m.reason}: {m.a[m.reason]} vs {m.b[m.reason]}"
        table.add_row(m.name, detail)
    console.print(table)
    console.print(
        f"DIFFERENT ({mode}): {len(report.missing)} missing, {len(report.extra)} extra, "
        f"{len(report.mismatches)} mismatched of {report.compared} compared"
    )
