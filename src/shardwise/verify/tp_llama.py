"""One rank of a tensor- and pipeline-parallel Llama forward, run on a sharded checkpoint's own tensors.

Each process is one (tp_rank, pp_rank) of a ``torch.distributed`` gloo job and reads only its own
shard. The stored tensors are interpreted the way the frameworks that load them do (NxD/NxDT,
Megatron-LM, Megatron-core/NeMo), not through shardwise's tile plans, so a plan that round-trips
but puts a head, a replica or a vocabulary slice where a real TP run does not look for it gives
wrong logits here:

- embedding and lm_head: vocabulary-parallel, rank r holds rows [r*Vr, (r+1)*Vr) of the padded
  vocabulary; lookups outside the range are zeroed and summed over TP; logits are gathered over TP;
- q/k/v: column-parallel; the rank holds heads/TP query heads and (rows / head_dim) KV heads, and
  local query head j attends with local KV head j // (nq_r // nkv_r); fused forms are split as each
  framework splits them (blocked [Q_r; K_r; V_r] by head counts, Megatron's query + key_value, and
  Megatron-core's per-query-group interleave);
- o_proj and down_proj: row-parallel, partial sums all-reduced over TP; gate/up: [gate_r; up_r];
- pipeline: stage p runs its layers and sends the hidden states to the same TP rank of stage p+1.

Everything is computed in float32. :func:`main` is the launcher :mod:`shardwise.verify.logits`
starts: it imports torch once and forks the ranks; a failing rank writes ``error-<rank>.json`` in
the work folder and the launcher then kills the others.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import LayoutError, ShardwiseError
from ..layout.sharding import stored_name, style_of
from ..reshard.model import ShardedModel, open_model

__all__ = ["RankForward", "runtime_constants", "rope_inv_freq", "run_rank", "process_main", "launch_ranks", "main"]


def runtime_constants(style: str, hf_config: dict | None, nemo_config: dict | None) -> dict:
    """RMSNorm epsilon and RoPE parameters as the framework that loads ``style`` would take them.

    NeMo (mcore) runs with its model_config.yaml (``layernorm_epsilon``, ``rotary_base``); NxD and
    Megatron checkpoints are run with the HF config. RoPE scaling comes from the HF config.
    """
    hf = hf_config or {}
    nemo = nemo_config or {}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise LayoutError("the config's rope_parameters are per layer type; verify computes one RoPE for all layers (Llama)")
    hf_eps = hf.get("rms_norm_eps", 1e-5)
    hf_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if style == "mcore" and nemo:
        eps, theta = nemo.get("layernorm_epsilon", hf_eps), nemo.get("rotary_base", hf_theta)
    else:
        eps, theta = hf_eps, hf_theta
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LayoutError(f"the config's hidden_act is {act!r}; verify runs Llama's silu MLP")
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    params = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
    return {"eps": float(eps), "theta": float(theta), "rope_type": kind, "rope": params}


def rope_inv_freq(head_dim: int, theta: float, rope_type: str, rope: dict) -> torch.Tensor:
    """HF Llama's inverse frequencies (default, linear and llama3 RoPE types), float32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / rope["factor"]
    if rope_type == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise LayoutError(f"RoPE type {rope_type!r} is not one verify computes (default, linear, llama3)")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RankForward:
    """The forward pass of one (tp_rank, pp_rank) on its shard of ``model``.

    ``group`` is this pipeline stage's TP process group; global ranks are ``pp_rank * tp + tp_rank``
    (the pipeline's sends go between ranks of the same TP rank).
    """

    def __init__(self, model: ShardedModel, tp_rank: int, pp_rank: int, group, constants: dict) -> None:
        self.layout, self.dims = model.layout, model.dims
        self.style = style_of(self.layout.style)
        self.tp, self.pp = self.layout.tp, self.layout.pp
        self.tp_rank, self.pp_rank, self.group = tp_rank, pp_rank, group
        self.source = model.shards[(tp_rank, pp_rank)]
        self.label = f"{model.files[(tp_rank, pp_rank)]} (TP rank {tp_rank}, PP rank {pp_rank})"
        self.arrangement = self.style.qkv[self.layout.qkv][0]
        self.eps = constants["eps"]
        self.inv_freq = rope_inv_freq(self.dims.head_dim, constants["theta"], constants["rope_type"], constants["rope"])
        if self.dims.heads % self.tp:
            raise LayoutError(f"{self.label}: TP={self.tp} does not divide the {self.dims.heads} query heads")
        self.nq = self.dims.heads // self.tp

    # -- reading ----------------------------------------------------------------------------------
    def weight(self, role: str, layer: int | None = None) -> torch.Tensor:
        name = stored_name(self.style, self.layout, role, layer)
        if name not in self.source:
            raise LayoutError(f"{self.label}: has no {name}")
        return self.source.read(name).to(torch.float32)

    def _rows(self, w: torch.Tensor, what: str, rows: int) -> torch.Tensor:
        if w.dim() != 2 or w.shape[0] != rows or w.shape[1] != self.dims.hidden:
            raise LayoutError(f"{self.label}: {what} has shape {list(w.shape)}, a rank of this model needs [{rows}, {self.dims.hidden}]")
        return w

    # -- collectives --------------------------------------------------------------------------------
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def _rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    # -- the model --------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Run this rank's part; the last stage returns the TP-gathered logits [batch, seq, padded vocab]."""
        batch, seq = ids.shape
        if self.pp_rank == 0:
            h = self.embed(ids, self.weight("embed"))
        else:
            h = torch.empty(batch, seq, self.dims.hidden, dtype=torch.float32)
            dist.recv(h, src=self._rank(self.tp_rank, self.pp_rank - 1))
        positions = torch.arange(seq, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        first, count = self.layout.stages[self.pp_rank]
        for layer in range(first, first + count):
            h = self.layer(h, layer - first if self.style.local_layers else layer, cos, sin)
        if self.pp_rank < self.pp - 1:
            dist.send(h.contiguous(), dst=self._rank(self.tp_rank, self.pp_rank + 1))
            return None
        h = _rms_norm(h, self.weight("final_norm"), self.eps)
        local = h @ self.lm_head().T
        if self.tp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def lm_head(self) -> torch.Tensor:
        name = stored_name(self.style, self.layout, "lm_head")
        tied_here = self.dims.tied and self.pp_rank == 0 and (name not in self.source or self.style.name == "hf")
        if tied_here:
            return self.weight("embed")
        if name not in self.source:
            raise LayoutError(f"{self.label}: has no {name} and the model does not tie it to the embedding on this stage")
        return self.weight("lm_head")

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup: this rank's rows, zeros elsewhere, summed over TP."""
        rows = table.shape[0]
        start = self.tp_rank * rows
        outside = (ids < start) | (ids >= start + rows)
        out = F.embedding((ids - start).masked_fill(outside, 0), table)
        out[outside] = 0.0
        return self._all_reduce(out)

    def layer(self, h: torch.Tensor, index: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(_rms_norm(h, self.weight("input_norm", index), self.eps), index, cos, sin)
        return h + self.mlp(_rms_norm(h, self.weight("post_norm", index), self.eps), index)

    def qkv(self, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's q [b, s, nq, d], k and v [b, s, nkv, d], split as the storing framework splits them."""
        b, s, _ = x.shape
        d, nq, how = self.dims.head_dim, self.nq, self.arrangement
        if how == "separate":
            wq, wk, wv = (self.weight(r, index) for r in "qkv")
            nkv = wk.shape[0] // d
            q = x @ self._rows(wq, "q", nq * d).T
            k = x @ self._rows(wk, "k", nkv * d).T
            v = x @ self._rows(wv, "v", nkv * d).T
        elif how == "blocked":  # NxDT weight_qkv, Megatron query_key_value: [Q_r; K_r; V_r]
            w = self.weight("qkv", index)
            nkv = (w.shape[0] - nq * d) // (2 * d)
            out = x @ self._rows(w, "qkv", (nq + 2 * nkv) * d).T
            q, k, v = out.split([nq * d, nkv * d, nkv * d], dim=-1)
        elif how == "q_kv":  # Megatron GQA: query, key_value = [K_r; V_r]
            wq, wkv = self.weight("q", index), self.weight("kv", index)
            nkv = wkv.shape[0] // (2 * d)
            q = x @ self._rows(wq, "query", nq * d).T
            k, v = (x @ self._rows(wkv, "key_value", 2 * nkv * d).T).split(nkv * d, dim=-1)
        elif how == "grouped":  # Megatron-core linear_qkv: per query group [its query heads, K, V]
            w = self.weight("qkv", index)
            per = self.dims.heads // self.dims.kv_heads
            nkv = w.shape[0] // ((per + 2) * d)
            if nkv * per != nq:
                raise LayoutError(f"{self.label}: linear_qkv has {w.shape[0]} rows, {nkv} query groups of {per} heads, not the {nq} query heads a rank holds")
            out = (x @ self._rows(w, "linear_qkv", nkv * (per + 2) * d).T).view(b, s, nkv, per + 2, d)
            q, k, v = out[..., :per, :].reshape(b, s, nq, d), out[..., per, :], out[..., per + 1, :]
        else:
            raise LayoutError(f"{self.label}: unknown Q/K/V arrangement {how!r}")
        if nkv < 1 or nq % nkv:
            raise LayoutError(f"{self.label}: holds {nkv} KV heads for its {nq} query heads; query heads must split evenly over them")
        return q.reshape(b, s, nq, d), k.reshape(b, s, nkv, d), v.reshape(b, s, nkv, d)

    def attention(self, x: torch.Tensor, index: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.dims.head_dim
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, index))  # [b, heads, s, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * d**-0.5
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out = (torch.softmax(scores, dim=-1, dtype=torch.float32) @ v).transpose(1, 2).reshape(b, s, self.nq * d)
        wo = self.weight("o", index)
        if tuple(wo.shape) != (self.dims.hidden, self.nq * d):
            raise LayoutError(f"{self.label}: o_proj has shape {list(wo.shape)}, a rank needs [{self.dims.hidden}, {self.nq * d}]")
        return self._all_reduce(out @ wo.T)

    def mlp(self, x: torch.Tensor, index: int) -> torch.Tensor:
        rows = self.dims.intermediate // self.tp
        if self.style.fused_gate_up:
            gate, up = (x @ self._rows(self.weight("gate_up", index), "gate_up", 2 * rows).T).split(rows, dim=-1)
        else:
            gate = x @ self._rows(self.weight("gate", index), "gate", rows).T
            up = x @ self._rows(self.weight("up", index), "up", rows).T
        wd = self.weight("down", index)
        if tuple(wd.shape) != (self.dims.hidden, rows):
            raise LayoutError(f"{self.label}: down_proj has shape {list(wd.shape)}, a rank needs [{self.dims.hidden}, {rows}]")
        return self._all_reduce((F.silu(gate) * up) @ wd.T)


# -- the process ------------------------------------------------------------------------------------
def _store(spec: dict, rank: int, timeout: timedelta):
    """Rank 0 serves a TCPStore on a free port of 127.0.0.1 and publishes it in the work folder."""
    host, port_file = "127.0.0.1", Path(spec["work"]) / "port"
    if rank == 0:
        store = dist.TCPStore(host, 0, spec["tp"] * spec["pp"], is_master=True, timeout=timeout, wait_for_workers=False)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(store.port))
        os.replace(tmp, port_file)
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("rank 0 did not start the rendezvous store")
        time.sleep(0.01)
    return dist.TCPStore(host, int(port_file.read_text()), is_master=False, timeout=timeout)


def _fault(spec: dict, rank: int) -> None:
    which, _, mode = str(spec.get("fault") or "").partition(":")
    if which.strip() == str(rank):
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected failure on rank {rank} (SHARDWISE_VERIFY_FAULT)")


def run_rank(spec: dict, rank: int) -> None:
    tp, pp = spec["tp"], spec["pp"]
    tp_rank, pp_rank = rank % tp, rank // tp
    timeout = timedelta(seconds=spec["timeout"])
    store = _store(spec, rank, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=tp * pp, timeout=timeout)
    groups = [dist.new_group([p * tp + t for t in range(tp)]) for p in range(pp)]
    _fault(spec, rank)
    ids = torch.load(spec["tokens"], weights_only=True)
    model = open_model(spec["checkpoint"], config=spec["config"], trust_pickle=spec["trust_pickle"])
    try:
        if (model.layout.tp, model.layout.pp) != (tp, pp):
            raise LayoutError(f"{spec['checkpoint']}: changed while verify ran (now TP={model.layout.tp} PP={model.layout.pp})")
        logits = RankForward(model, tp_rank, pp_rank, groups[pp_rank], spec["constants"]).forward(ids)
    finally:
        model.close()
    if logits is not None and tp_rank == 0:
        out = Path(spec["work"]) / "logits.pt"
        torch.save(logits, out.with_suffix(".tmp"))
        os.replace(out.with_suffix(".tmp"), out)
    dist.barrier()
    dist.destroy_process_group()


def process_main(spec_path: str, rank: int) -> None:
    """One rank: run it, write ``error-<rank>.json`` on failure, and exit 0 or 1 (output to ``rank-<rank>.log``)."""
    spec_path = Path(spec_path)
    code = 0
    try:
        log = os.open(spec_path.parent / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        _die_with_parent()
        run_rank(json.loads(spec_path.read_text()), rank)
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
        code = 1
        lines = str(e).strip().splitlines()
        report = {
            "rank": rank,
            "type": type(e).__name__,
            "shardwise": isinstance(e, ShardwiseError),
            "message": lines[0] if lines else "",
            "traceback": traceback.format_exc(),
            "time": time.time(),
        }
        try:
            tmp = spec_path.parent / f"error-{rank}.tmp"
            tmp.write_text(json.dumps(report))
            os.replace(tmp, spec_path.parent / f"error-{rank}.json")
            traceback.print_exc()
        except BaseException:  # noqa: BLE001 - the exit code still tells the parent
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)  # gloo threads of a broken job must not keep the process alive


def _die_with_parent() -> None:
    """Linux: be killed when the process that started this one dies (no orphaned ranks)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch_ranks(spec_path: str, world: int) -> int:
    """Fork one process per rank from this one (torch imported once, no threads yet) and wait for them.

    When a rank fails, the others (likely blocked in a collective) are killed. Returns 0 when every
    rank exited 0, else 1; one line per failed rank goes to stderr.
    """
    import signal

    torch.set_num_threads(1)
    pids: dict[int, int] = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            process_main(spec_path, rank)  # never returns
        pids[pid] = rank
    code = 0
    while pids:
        pid, status = os.wait()
        rank = pids.pop(pid, None)
        if rank is None:
            continue
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0 and code == 0:
            code = 1
            print(f"rank {rank} exited with code {exit_code}", file=sys.stderr, flush=True)
            time.sleep(0.2)  # let ranks failing at the same moment write their reports
            for other in pids:
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return code


def main(argv: list[str] | None = None) -> None:
    """``python -c 'from shardwise.verify.tp_llama import main; main()' SPEC.json WORLD``: the rank launcher."""
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    sys.exit(launch_ranks(argv[0], int(argv[1])))
