"""Distributed checkpoints written by torch itself under several gloo ranks, for the DCP tests.

    python tests/dcp_ranks.py save OUT WORLD        # DCP of a sharded state, and OUT/reference.safetensors
    python tests/dcp_ranks.py load DCP WORLD        # torch.distributed.checkpoint.load at WORLD ranks; prints OK

``save`` builds the same full state on every rank (fixed seed), shards it with DTensor over a 1-D
mesh of WORLD ranks, or a 2 x (WORLD / 2) mesh when WORLD is 4 (row shards, uneven row shards,
column shards, a cut through an inner dimension, a 2-D grid, replicated tensors, a 0-d tensor, an
optimizer-like subtree and a plain object), and saves ``{"model": ..., "optim": ...}`` with
``torch.distributed.checkpoint.save``. Rank 0 also writes the full model tensors to
``reference.safetensors``. ``load`` reads a DCP folder into DTensors sharded at WORLD ranks and
compares every local shard with the same slice of the folder's ``reference.safetensors``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist


def full_model_state() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(37, 16, generator=g),
        "layers.0.qkv.weight": torch.randn(48, 16, generator=g).to(torch.bfloat16),
        "layers.0.o.weight": torch.randn(16, 48, generator=g),
        "layers.0.conv.weight": torch.randn(6, 5, 4, 3, generator=g).half(),
        "layers.0.grid.weight": torch.randn(12, 10, generator=g),
        "norm.weight": torch.rand(16, generator=g),
        "scale": torch.tensor(0.125, dtype=torch.float64),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
    }


def placements(name: str, mesh_dims: int):
    from torch.distributed.tensor import Replicate, Shard

    one = {"embed.weight": Shard(0), "layers.0.qkv.weight": Shard(0), "layers.0.o.weight": Shard(1), "layers.0.conv.weight": Shard(2), "layers.0.grid.weight": Shard(0)}.get(name, Replicate())
    if mesh_dims == 1:
        return [one]
    if name == "layers.0.grid.weight":
        return [Shard(0), Shard(1)]
    return [one, Replicate()]


def distributed(state: dict, mesh) -> dict:
    from torch.distributed.tensor import distribute_tensor

    return {name: distribute_tensor(t, mesh, placements(name, mesh.ndim)) for name, t in state.items()}


def make_mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, world // 2) if world == 4 else (world,))


def save(out: Path, world: int) -> None:
    import torch.distributed.checkpoint as dcp

    mesh = make_mesh(world)
    model = distributed(full_model_state(), mesh)
    optim = {"state": {"embed.weight": {"exp_avg": distributed({"embed.weight": torch.ones(37, 16)}, mesh)["embed.weight"]}}, "step": 5}
    dcp.save({"model": model, "optim": optim}, checkpoint_id=str(out))
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file(full_model_state(), str(out / "reference.safetensors"))


def load(folder: Path, world: int) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    mesh = make_mesh(world)
    reference = load_file(str(folder / "reference.safetensors"))
    target = distributed({name: torch.zeros_like(t) for name, t in reference.items()}, mesh)
    dcp.load(target, checkpoint_id=str(folder))
    for name, tensor in target.items():
        expected = distributed({name: reference[name]}, mesh)[name]
        if not torch.equal(tensor.to_local(), expected.to_local()):
            raise AssertionError(f"rank {dist.get_rank()}: {name} differs after load")


def run_ranks(world: int, rendezvous: str, work: Callable[[], None]) -> int:
    """Fork ``world`` processes that join one gloo group (file rendezvous at ``rendezvous``) and run
    ``work()`` each; prints OK or FAILED (a failing rank prints its traceback) and returns the exit code."""
    rendezvous = os.path.abspath(rendezvous)
    if os.path.exists(rendezvous):
        os.remove(rendezvous)
    children = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            _rank_main(work, world, rank, rendezvous)
        children.append(pid)
    failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    if os.path.exists(rendezvous):
        os.remove(rendezvous)
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


def _rank_main(work: Callable[[], None], world: int, rank: int, rendezvous: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
        work()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def main(argv: list[str]) -> int:
    command, path, world = argv[0], Path(argv[1]), int(argv[2])
    return run_ranks(world, f"{path}.rendezvous", lambda: (save if command == "save" else load)(path, world))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
