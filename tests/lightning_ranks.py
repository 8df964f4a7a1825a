"""A Lightning ModelParallelStrategy run on 2 CPU ranks (gloo) that saves one state twice, for the
tests of resuming from a distributed checkpoint:

    python tests/lightning_ranks.py OUT STEP

trains test_lightning_io's Tiny, its layers sharded over both ranks with FSDP2's ``fully_shard``,
and at the end of step STEP saves ``OUT/sharded.ckpt`` (Lightning's own DCP folder: ``.metadata``,
one ``__R_0.distcp`` per rank, ``meta.pt``) and then the same state as ``OUT/full.ckpt``, the single
file the strategy writes with ``save_distributed_checkpoint=False``. The ranks are forked from this
process once Lightning is imported, with the environment a launcher such as torchrun gives them
(``LOCAL_RANK`` and a rendezvous port), so Lightning does not start them again itself; prints OK
when both succeed.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy

from test_lightning_io import Tiny

WORLD = 2


class ShardedTiny(Tiny):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


class SaveBothWays(pl.Callback):
    """At the end of step ``step``: the sharded checkpoint, then the single file of the same state.
    The strategy takes the format from ``save_distributed_checkpoint``, fixed at construction; the
    private flag it is kept in is switched for the second save and back."""

    def __init__(self, out: Path, step: int) -> None:
        self.out, self.step = out, step

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.global_step != self.step:
            return
        strategy = trainer.strategy
        assert strategy._save_distributed_checkpoint is True  # fails loudly should Lightning rename it
        trainer.save_checkpoint(self.out / "sharded.ckpt")
        strategy._save_distributed_checkpoint = False
        try:
            trainer.save_checkpoint(self.out / "full.ckpt")
        finally:
            strategy._save_distributed_checkpoint = True


def rank_main(out: Path, step: int) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=step, accelerator="cpu", devices=WORLD, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=out, callbacks=[SaveBothWays(out, step)],
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
    )
    trainer.fit(ShardedTiny())


def main(out: Path, step: int) -> int:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for rank in range(WORLD):
        pid = os.fork()
        if pid == 0:
            try:
                os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                rank_main(out, step)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        children.append(pid)
    failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
