#!/usr/bin/env python3
"""Benchmark: a ViT-B/32-sized CLIP through shardwise's CLIP commands, against cp and NeMo's converter approach.

The model is a random transformers ``CLIPModel`` with ``CLIPConfig()``'s defaults, which are
OpenAI's ViT-B/32 (151 M parameters, 605 MB in fp32), saved by ``save_pretrained``, with the tests'
tiny tokenizer and a generated image (no Hub). Each command runs in a fresh process; its wall time
and peak RSS (``ru_maxrss``) come from the reaper of ``convert_bench.py``:

- ``convert HF clip.nemo`` (TP 1), ``convert HF clip2.nemo --tp 2``, ``reshard clip2.nemo
  clip4.nemo --tp 4``, ``convert clip4.nemo back --to hf``, ``clip-infer clip2.nemo``;
- ``cp`` of ``model.safetensors`` followed by ``sync`` (shardwise fsyncs what it writes);
- NeMo's approach (``convert_clip_hf_to_nemo.py`` without building the Megatron model, so a lower
  bound on its cost): ``CLIPModel.from_pretrained``, fuse Q/K/V per head with ``torch.cat`` for the
  whole state dict, ``torch.save`` it.

Two baselines are printed with them: ``shardwise --help`` (the interpreter and the CLI's imports;
conversions between layouts never import torch) and ``python -c "import shardwise, torch"``
(clip-infer runs torch). The round trip is checked bit-exact with ``shardwise diff`` (untimed).

    PYTHONPATH=src python benchmarks/clip_bench.py            # about a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from convert_bench import MiB, log, read_through, run  # noqa: E402 - the sibling benchmark's reaper

NEMO_APPROACH = r"""
import sys, torch, transformers
src, dst = sys.argv[1:3]
model = transformers.CLIPModel.from_pretrained(src)
state, config = model.state_dict(), model.config
out = {}
for key, value in state.items():
    if "k_proj" in key or "v_proj" in key or "position_ids" in key:
        continue
    if "q_proj" in key:
        tower = config.vision_config if key.startswith("vision") else config.text_config
        heads, width = tower.num_attention_heads, tower.hidden_size
        parts = [state[key.replace("q_proj", p)].reshape(heads, width // heads, -1) for p in ("q_proj", "k_proj", "v_proj")]
        value = torch.cat([torch.cat([p[h:h + 1] for p in parts]) for h in range(heads)]).reshape(3 * width, -1).squeeze(-1)
    out[key] = value
torch.save(out, dst)
"""


def build(work: Path) -> tuple[Path, Path]:
    import torch
    import transformers

    from clip_builders import make_image, tiny_tokenizer

    torch.manual_seed(0)
    hf = work / "vit-b-32"
    transformers.CLIPModel(transformers.CLIPConfig()).save_pretrained(hf)
    tiny_tokenizer().save_pretrained(hf)
    return hf, make_image(work / "image.png", 320, 240)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where to build the model (default: a temporary folder).")
    args = parser.parse_args(argv)
    cli = [sys.executable, "-m", "shardwise"]
    with tempfile.TemporaryDirectory(prefix="clip-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        log("building a random ViT-B/32 CLIPModel ...")
        hf, image = build(work)
        weights = hf / "model.safetensors"
        steps = [
            ("cp model.safetensors + sync", ["sh", "-c", f"cp {weights} {work}/copy && sync {work}/copy"]),
            ("NeMo approach (load, fuse, torch.save)", [sys.executable, "-c", NEMO_APPROACH, str(hf), str(work / "nemo.pt")]),
            ("convert HF -> archive TP 1", [*cli, "convert", str(hf), str(work / "clip.nemo"), "--quiet"]),
            ("convert HF -> archive TP 2", [*cli, "convert", str(hf), str(work / "clip2.nemo"), "--tp", "2", "--quiet"]),
            ("reshard TP 2 -> TP 4", [*cli, "reshard", str(work / "clip2.nemo"), str(work / "clip4.nemo"), "--tp", "4", "--quiet"]),
            ("convert archive TP 4 -> HF", [*cli, "convert", str(work / "clip4.nemo"), str(work / "back"), "--to", "hf", "--quiet"]),
            ("clip-infer TP 2 (1 image, 3 texts)", [*cli, "clip-infer", str(work / "clip2.nemo"), "--image", str(image), "--texts", "a dog", "a cat", "a car"]),
        ]
        cli_base, torch_base = run([*cli, "--help"]).max_rss, run([sys.executable, "-c", "import shardwise, torch"]).max_rss
        print(f"ViT-B/32 CLIP, fp32, {weights.stat().st_size / MiB:.0f} MiB of weights; "
              f"baseline RSS: shardwise --help {cli_base / MiB:.0f} MiB, import shardwise, torch {torch_base / MiB:.0f} MiB")
        print(f"{'step':42} {'seconds':>8} {'peak RSS':>10}")
        for name, cmd in steps:
            os.sync()
            read_through(weights)
            result = run(cmd)
            print(f"{name:42} {result.seconds:8.2f} {result.max_rss / MiB:6.0f} MiB")
        check = run([*cli, "diff", str(hf), str(work / "back")], check=False)
        print(f"HF -> archive TP 2 -> TP 4 -> HF bit-exact: {'yes' if check.returncode == 0 else 'NO'}")
        return check.returncode


if __name__ == "__main__":
    sys.exit(main())
