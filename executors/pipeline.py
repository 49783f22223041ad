"""A pipeline stage: one process (rank r) runs stage r's ops of the compiled graph with its own
tiers, and exchanges activations and token ids with the other stages over torch.distributed
(gloo on CPU, NCCL on CUDA; the process group is set up by graphgen/distributed.py).

The graph's send / recv nodes (passes/insert_comm.py) are ops like loads and stores: a send
takes the activation out of the device tier (or the sampled ids out of the block state) and
posts it (isend: the op returns at once); a receive waits for its message, at most
parallel.timeout_s, and puts it where the square reads it. The async executor runs them on
its comm stream, beside load / compute / store. Each rank runs its ops in the global order,
which is a topological order of the whole graph, so no rank waits for a message that is sent
after something it has not done yet. After a block, the last stage broadcasts the tokens (and
log-probabilities) so every rank returns the same result.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist

from .async_streams import AsyncExecutor
from .reference import ReferenceExecutor


class PeerError(ConnectionError):
    """Another rank died or stopped answering; the message names it."""


class Stage:
    """Mixin over an executor: run only this rank's stage, with send / recv ops."""

    def setup_stage(self, cfg) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.timeout = timedelta(seconds=float(cfg.parallel.timeout_s))
        self._sends, self._mine = [], (None, None)
        self._stage_lock = threading.Lock()

    def runs_layer(self, graph, j: int) -> bool:
        return graph.graph["stage_of_layer"][j] == self.rank

    def planned_peaks(self, graph):
        return graph.graph["stage_peak_bytes"][self.rank]

    def run_ops(self, ops) -> None:
        if self._mine[0] is not ops:  # this rank's ops, in the global order
            A = self.A
            self._mine = (ops, [m for m in ops if A[m].get("stage", 0) == self.rank])
        self._busy_stage, self._sent = defaultdict(float), defaultdict(int)
        t0 = time.perf_counter()
        try:
            super().run_ops(self._mine[1])
            for work, _, peer in self._sends:
                self.wait(work, f"rank {peer}", "receive what this rank sent it")
        finally:
            self._sends = []
        wall = time.perf_counter() - t0
        self.share_results()
        # this block's figures; graphgen/api.py sums a call's blocks, graphgen/distributed.py gathers them
        g = self._stage_graph.graph
        self.stats["stage"] = {"rank": self.rank, "layers": g["stage_layers"][self.rank], "wall_s": wall,
                               "busy_s": dict(self._busy_stage), "sent_bytes": dict(self._sent),
                               "planned_peak_bytes": dict(g["stage_peak_bytes"][self.rank]),
                               "budget_bytes": dict(g["stage_budgets"][self.rank])}

    def _run_block(self, graph, inputs):
        self._stage_graph = graph
        return super()._run_block(graph, inputs)

    def record(self, node, b, op, t0, t1) -> None:
        with self._stage_lock:
            self._busy_stage[op] += t1 - t0
            if op == "send":
                self._sent[f"{b['src']}->{b['dst']}"] += b["bytes"]
        super().record(node, b, op, t0, t1)

    # --- ops ----------------------------------------------------------------------------------
    def send(self, node, b) -> None:
        i, _, k = b["square"]
        if b["tensor"][0] == "tok":
            value = self.state.tokens[k][i]
        else:
            value = self.tiers["device"].pop(b["buf"])
        value = value.to(self.comm_device).contiguous()
        try:
            work = dist.isend(value, dst=b["peer"], tag=b["tag"])
        except RuntimeError as e:  # the connection is gone: the peer exited
            raise PeerError(f"rank {self.rank}: cannot send to rank {b['peer']}: it died (see its log); ({e})") from None
        self._sends.append((work, value, b["peer"]))  # the value kept alive until sent

    def recv(self, node, b) -> None:
        dtype = self.dtype if b["dtype"] == "model" else torch.int64
        buf = torch.empty(b["shape"], dtype=dtype, device=self.comm_device)
        i, j, k = b["tensor"][1:]
        what = f"layer {j}'s activation" if b["tensor"][0] == "act" else "the sampled token ids"
        who, what = f"rank {b['peer']}", f"send {what} of step {i}, GPU batch {k}"
        self.wait(lambda: dist.irecv(buf, src=b["peer"], tag=b["tag"]), who, what)
        if b["tensor"][0] == "tok":
            self.state.tokens[b["square"][2]].append(buf.cpu())
        else:
            self.tiers["device"].put(b["buf"], buf.to(self.device))

    def wait(self, work, who: str, what: str) -> None:
        """Wait for a message (work, or a function posting it), at most parallel.timeout_s; a peer that
        died or hung is reported by rank."""
        try:
            ok = (work() if callable(work) else work).wait(self.timeout)
        except RuntimeError as e:
            raise PeerError(f"rank {self.rank}: {who} did not {what} within parallel.timeout_s="
                            f"{self.timeout.total_seconds():g} s: it died or hung (see its log); ({e})") from None
        if ok is False:
            raise PeerError(f"rank {self.rank}: {who} did not {what} within parallel.timeout_s="
                            f"{self.timeout.total_seconds():g} s: it died or hung (see its log)")

    def share_results(self) -> None:
        """The last stage's tokens (and log-probabilities) to every rank."""
        st, last = self.state, self.world - 1
        nb, B = st.inputs.input_ids.shape[:2]
        gen = self._stage_graph.graph["num_tokens"]
        out = [("tokens", torch.int64)] + ([("logprobs", torch.float32)] if st.inputs.return_logprobs else [])
        for name, dtype in out:
            rows = getattr(st, name)
            t = (torch.stack([torch.stack(r, -1) for r in rows]) if self.rank == last
                 else torch.empty(nb, B, gen, dtype=dtype)).to(self.comm_device)
            try:
                dist.broadcast(t, src=last)
            except RuntimeError as e:
                raise PeerError(f"rank {self.rank}: the last stage (rank {last}) did not share the block's "
                                f"{name} within parallel.timeout_s: it died or hung ({e})") from None
            setattr(st, name, [list(t[k].cpu().unbind(-1)) for k in range(nb)])


def check_launched(cfg, stages: int) -> None:
    """A pipeline runs one process per stage, started by torchrun (or another launcher)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != stages:
        raise ValueError(f"parallel.stages={stages} runs one process per stage, but this is {world} process(es): "
                         f"launch with torchrun --nproc-per-node {stages} -m graphgen ... (docs/distributed.md), "
                         f"or set parallel.stages={world}")


class StageReference(Stage, ReferenceExecutor):
    name = "reference"

    def __init__(self, spec, weights, cfg):
        super().__init__(spec, weights, cfg)
        self.setup_stage(cfg)


class StageAsync(Stage, AsyncExecutor):
    name = "async"

    def __init__(self, spec, weights, cfg):
        super().__init__(spec, weights, cfg)
        self.setup_stage(cfg)


STAGE_EXECUTORS = {"reference": StageReference, "async": StageAsync}
