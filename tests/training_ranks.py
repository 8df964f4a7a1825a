"""Real multi-rank training for the distributed checkpoint tests (gloo, CPU), run as a script.

    python tests/training_ranks.py SPEC.json

SPEC holds ``world`` and a list of ``phases``; the script imports torch once, forks one process
per rank, and each rank runs the phases in order on one process group, writing
``result-<rank>.json`` (the losses each phase recorded) into the SPEC's folder. A failing rank
makes the script kill the others and exit 1.

The model is a tensor- and pipeline-parallel MLP as Megatron builds one: per stage a replicated
input norm-free projection on the first stage, then a column-parallel and a row-parallel linear
(f/g conjugate all-reduces over TP), a replicated head on the last stage; activations and their
gradients travel between stages with send/recv; gradients are averaged over DP. The optimizer
is Adam, replicated, or ZeRO-1 in NxD's state layout (per-parameter dim-0 padding and chunks).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

HIDDEN, FFN, BATCH = 8, 16, 4


class _CopyToTP(torch.autograd.Function):  # Megatron's f: identity forward, all-reduce backward
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):  # Megatron's g: all-reduce forward, identity backward
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Stage(torch.nn.Module):
    """One pipeline stage's part of the model, on one TP rank."""

    def __init__(self, coords, tp_group, seed: int) -> None:
        super().__init__()
        self.coords, self.tp_group = coords, tp_group
        first, last = coords.pp_rank == 0, coords.pp_rank == coords.pp_size - 1
        g = torch.Generator().manual_seed(seed * 100 + coords.pp_rank)  # replicated over TP and DP
        if first:
            self.inp = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) * 0.3)
        full_up = torch.randn(FFN, HIDDEN, generator=g) * 0.3
        full_down = torch.randn(HIDDEN, FFN, generator=g) * 0.3
        part = FFN // coords.tp_size
        self.up = torch.nn.Parameter(full_up[coords.tp_rank * part:(coords.tp_rank + 1) * part].clone())  # column-parallel
        self.down = torch.nn.Parameter(full_down[:, coords.tp_rank * part:(coords.tp_rank + 1) * part].clone())  # row-parallel
        if last:
            self.head = torch.nn.Parameter(torch.randn(1, HIDDEN, generator=g) * 0.3)

    def forward(self, x):
        if hasattr(self, "inp"):
            x = torch.tanh(x @ self.inp.T)
        h = torch.nn.functional.gelu(_CopyToTP.apply(x, self.tp_group) @ self.up.T)
        x = x + _ReduceFromTP.apply(h @ self.down.T, self.tp_group)
        return x @ self.head.T if hasattr(self, "head") else x


class Zero1Adam:
    """Adam with ZeRO-1 sharding over DP in NxD's state layout: each parameter padded on dim 0 to a
    multiple of DP and chunked; this rank keeps chunk dp_rank of the fp32 master weight and moments."""

    def __init__(self, params, coords, lr=0.01, betas=(0.9, 0.999), eps=1e-8) -> None:
        self.params, self.coords = list(params), coords
        self.lr, self.betas, self.eps = lr, betas, eps
        self.step_count = 0
        self.master = [self._chunk(p.detach()).clone() for p in self.params]
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]

    def _chunk(self, t):
        dp = self.coords.dp_size
        pad = (-t.shape[0]) % dp
        padded = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else t
        return padded.chunk(dp)[self.coords.dp_rank]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            g = self._chunk(p.grad)
            self.exp_avg[i].mul_(b1).add_(g, alpha=1 - b1)
            self.exp_avg_sq[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = self.exp_avg[i] / (1 - b1 ** self.step_count)
            v_hat = self.exp_avg_sq[i] / (1 - b2 ** self.step_count)
            self.master[i].sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))
            chunks = [torch.empty_like(self.master[i]) for _ in range(self.coords.dp_size)]
            dist.all_gather(chunks, self.master[i], group=self.coords.dp_group)
            with torch.no_grad():
                p.copy_(torch.cat(chunks)[: p.shape[0]])

    def state_dict(self):
        return {
            "param_groups": [{"lr": self.lr, "betas": self.betas, "eps": self.eps, "params": list(range(len(self.params)))}],
            "state": {},
            "base_state": {
                i: {"step": torch.tensor(float(self.step_count)), "exp_avg": self.exp_avg[i], "exp_avg_sq": self.exp_avg_sq[i]}
                for i in range(len(self.params))
            },
            "shape_info": {i: p.shape for i, p in enumerate(self.params)},
            "sharded_master_weights": {i: m for i, m in enumerate(self.master)},
        }

    def load_state_dict(self, state):
        for i in range(len(self.params)):
            assert tuple(state["shape_info"][i]) == tuple(self.params[i].shape)
            self.exp_avg[i] = state["base_state"][i]["exp_avg"].clone()
            self.exp_avg_sq[i] = state["base_state"][i]["exp_avg_sq"].clone()
            self.master[i] = state["sharded_master_weights"][i].clone()
        self.step_count = int(state["base_state"][0]["step"].item())


def _data(step: int, coords):
    """This DP rank's part of the global batch of ``step`` (the same for any DP size)."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH * 4, HIDDEN, generator=g), torch.randn(BATCH * 4, 1, generator=g)
    part = x.shape[0] // coords.dp_size
    rows = slice(coords.dp_rank * part, (coords.dp_rank + 1) * part)
    return x[rows], y[rows]


def train(model, optimizer, scheduler, coords, steps: range) -> list[float]:
    """Pipeline-parallel steps; the last stage returns the DP-averaged losses (other stages an empty list)."""
    rank, stride = dist.get_rank(), coords.tp_size * coords.dp_size
    first, last = coords.pp_rank == 0, coords.pp_rank == coords.pp_size - 1
    losses = []
    for step in steps:
        x, y = _data(step, coords)
        if not first:
            x = torch.empty(x.shape[0], HIDDEN)
            dist.recv(x, src=rank - stride)
            x.requires_grad_(True)
        out = model(x)
        if last:
            loss = torch.nn.functional.mse_loss(out, y)
            loss.backward()
            report = loss.detach().clone()
            dist.all_reduce(report, group=coords.dp_group)
            losses.append(report.item() / coords.dp_size)
        else:
            dist.send(out.detach(), dst=rank + stride)
            grad = torch.empty_like(out)
            dist.recv(grad, src=rank + stride)
            out.backward(grad)
        if not first:
            dist.send(x.grad, dst=rank - stride)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=coords.dp_group)
            p.grad /= coords.dp_size
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return losses


def build(coords, tp_group, seed: int, zero1: bool):
    model = Stage(coords, tp_group, seed)
    if zero1:
        optimizer = Zero1Adam(model.parameters(), coords)
        scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), lambda s: 1.0)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def llama_phase(phase: dict, coords) -> dict:
    """Save this rank's shard of an engine-written nxdt Llama (``src``), or load one at this run's layout into ``out``."""
    import shardwise

    name = f"dp_rank_00_tp_rank_{coords.tp_rank:02d}_pp_rank_{coords.pp_rank:02d}.pt"
    if phase["kind"] == "llama_save":
        state = torch.load(Path(phase["src"]) / "model" / name, weights_only=True)
        shardwise.save_checkpoint(phase["root"], "llama", model=state, model_config=json.loads(Path(phase["config"]).read_text()))
    else:
        state: dict = {}
        shardwise.load_checkpoint(phase["root"], model=state)
        if coords.dp_rank == 0:
            torch.save(state, Path(phase["out"]) / name)
    return {"losses": []}


def failing_phase(phase: dict, coords) -> dict:
    """One rank's ZeRO-1 state cannot be pickled: every rank must raise, then a new save must work."""
    import shardwise

    shard = {"base_state": {}, "shape_info": {}, "bad": (lambda: 0) if coords.dp_rank == phase["failing_dp_rank"] else 0}
    try:
        shardwise.save_checkpoint(phase["root"], "broken", model={"w": torch.ones(2)}, optimizer=shard, async_save=phase.get("async", False))
        shardwise.finalize_checkpoint()
        error = None
    except Exception as e:  # noqa: BLE001 - the test looks at what each rank saw
        error = f"{type(e).__name__}: {e}"
    shardwise.save_checkpoint(phase["root"], "after", model={"w": torch.ones(2)})
    return {"losses": [], "error": error}


def run_phase(phase: dict, coords, tp_group) -> dict:
    import shardwise

    if phase.get("kind") == "fail":
        return failing_phase(phase, coords)
    if phase.get("kind", "train") != "train":
        return llama_phase(phase, coords)
    zero1 = phase.get("zero1", False)
    model, optimizer, scheduler = build(coords, tp_group, phase.get("seed", 0), zero1)
    start = 0
    if phase.get("load"):
        user = shardwise.load_checkpoint(phase["root"], phase.get("tag"), model=model, optimizer=optimizer, scheduler=scheduler)
        start = user["step"]
    losses = train(model, optimizer, scheduler, coords, range(start, start + phase.get("steps_before", 0)))
    if phase.get("save"):
        step = start + phase.get("steps_before", 0)
        shardwise.save_checkpoint(
            phase["root"], phase.get("tag"), model=model, optimizer=optimizer, scheduler=scheduler, user_content={"step": step},
            async_save=bool(phase.get("async")), async_staging=phase.get("async") == "staged", num_kept_ckpts=phase.get("keep"), encoding=phase.get("encoding", "pt"),
        )
    step = start + phase.get("steps_before", 0)
    losses += train(model, optimizer, scheduler, coords, range(step, step + phase.get("steps_after", 0)))
    shardwise.finalize_checkpoint()
    state = {k: v.tolist() for k, v in model.state_dict().items()}
    return {"losses": losses, "model": state}


def rank_main(spec: dict, rank: int) -> None:
    import shardwise.distributed as sd

    out = Path(spec["folder"])
    try:
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=spec["world"])
        results = []
        for phase in spec["phases"]:
            coords = sd.initialize_model_parallel(phase["tp"], phase["pp"])
            tp_group = _tp_group(coords)
            results.append(run_phase(phase, coords, tp_group))
            dist.barrier()
        (out / f"result-{rank}.json").write_text(json.dumps({"rank": rank, "tp": coords.tp_rank, "pp": coords.pp_rank, "dp": coords.dp_rank, "phases": results}))
        dist.destroy_process_group()
    except BaseException:
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


_tp_groups: dict = {}


def _tp_group(coords):
    """The TP group of this rank (Megatron order: consecutive ranks); created collectively once per layout."""
    key = (coords.tp_size, coords.pp_size)
    if key not in _tp_groups:
        world = dist.get_world_size()
        mine = None
        for start in range(0, world, coords.tp_size):
            members = list(range(start, start + coords.tp_size))
            group = dist.new_group(members)
            if dist.get_rank() in members:
                mine = group
        _tp_groups[key] = mine
    return _tp_groups[key]


def main() -> None:
    import signal

    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    pids = {}
    for rank in range(spec["world"]):
        pid = os.fork()
        if pid == 0:
            rank_main(spec, rank)
        pids[pid] = rank
    code = 0
    while pids:
        pid, status = os.wait()
        pids.pop(pid, None)
        if os.waitstatus_to_exitcode(status) != 0 and code == 0:
            code = 1
            for other in pids:
                os.kill(other, signal.SIGKILL)
    sys.exit(code)


if __name__ == "__main__":
    main()
