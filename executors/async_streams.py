"""Async executor: three streams, load / compute / store, overlapping the next squares' loads
and the previous square's stores with the current compute (FlexGen's zig-zag loop), driven by
the compiled schedule instead of hand-written loops.

Each stream runs its ops in schedule order on its own thread (compute on the caller's, so
Ctrl-C lands there). An op starts when
- its producers have finished: the graph's edges (load -> square, square -> store,
  store -> load), plus the cache store that a square reads in place (no load between them);
- (a load) the compute of the slot before its own has finished: the memory plan counts a
  slot's loads beside that slot's compute, so the tiers stay within the plan;
- (a compute) the stores of STORE_LAG slots back have finished: stores in flight are bounded;
- (a store) the loads issued up to its slot have finished: an activation a load takes out of
  host or disk leaves before the next one lands there, as in the plan.
A pipeline stage's sends and receives (passes/insert_comm.py) run on a fourth stream, comm; a
receive, like a load, waits for the compute of the slot before its own.
A square's stores take their values out of the device tier right after it computes, as the
reference executor does, so the tiers' accounting follows the plan exactly; the write
itself runs on the store stream.
On a GPU each thread issues on its own CUDA stream (executors/cuda.py). What an op does is
Executor.load / compute / store, shared with the reference executor: outputs are
bit-identical to it; only *when* ops run differs.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Dict, Tuple

from graphgen.streams import STREAMS, StreamPlan, plan_streams

from .base import Executor

class _Abort(Exception):
    """Another stream failed: stop without running more ops."""


class AsyncExecutor(Executor):
    name = "async"

    def __init__(self, spec, weights, cfg):
        super().__init__(spec, weights, cfg)
        self.cuda = None
        if self.device.type == "cuda":
            from .cuda import CudaStreams  # only on a GPU machine: the CUDA-specific module

            self.cuda = CudaStreams(self.device, STREAMS)
            self.cuda.attach_staging(self.tiers["disk"], cfg.executor)
        self._plan_for = (None, None)  # (graph, StreamPlan): plans are reused across blocks

    def _run_block(self, graph, inputs):
        self._graph = graph
        return super()._run_block(graph, inputs)

    def stream_plan(self, ops) -> StreamPlan:
        if self._plan_for[0] is not self._graph:
            self._plan_for = (self._graph, plan_streams(self._graph, ops))
        return self._plan_for[1]

    # --- running ------------------------------------------------------------------------
    def run_ops(self, ops) -> None:
        plan = self.stream_plan(ops)
        if self.cuda is not None:  # weights and caches were set up on the default stream
            self.cuda.synchronize()
        self._stores_of, self._taken = plan.stores_of, {}
        self._progress = [0] * len(STREAMS)
        self._cv = threading.Condition()
        self._lock = threading.Lock()
        self._error = None
        self._aborted = False
        self._busy: Dict[str, float] = defaultdict(float)
        self._wall: Dict[str, float] = defaultdict(float)
        self._mark = time.perf_counter()
        self._last_kind = "prefill"
        workers = [threading.Thread(target=self._worker, args=(s, plan), name=f"graphgen-{s}", daemon=True)
                   for s in STREAMS if s != "compute" and plan.ops[s]]
        self._alone = not workers  # (e.g. everything at home on the device): no one to notify
        for w in workers:
            w.start()
        try:
            self._stream("compute", plan)
        except BaseException as e:  # noqa: B902 (KeyboardInterrupt too: stop the other streams first)
            self._fail(e)
        finally:
            for w in workers:
                w.join()
        self._wall[self._last_kind] += time.perf_counter() - self._mark  # the last stores
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        self.stats["time"] = defaultdict(float, self._wall)  # wall clock, split at compute ends
        self.stats["busy"] = dict(self._busy)

    # --- ops: a store's value is taken when its square finishes, written by the store stream ----
    def compute(self, n, a) -> None:
        super().compute(n, a)
        for st in self._stores_of.get(n, ()):
            b = self.A[st]
            self._taken[st] = self.tiers[b["src"]].pop(b["buf"])

    def store(self, node, b) -> None:
        if node in self._taken:  # on the store stream: its value was taken when its square finished
            self.put_stored(b, self._taken.pop(node))
        else:  # run inline on the compute stream (a CPU copy within RAM): as the reference executor
            super().store(node, b)

    def _worker(self, stream: str, plan: StreamPlan) -> None:
        try:
            self._stream(stream, plan)
        except BaseException as e:  # noqa: B902
            self._fail(e)

    def _stream(self, stream: str, plan: StreamPlan) -> None:
        s = STREAMS.index(stream)
        for idx, node in enumerate(plan.ops[stream]):
            self._wait(plan.waits[node])
            if self.cuda is None:
                self.execute(node)
            else:
                with self.cuda.stream(stream):
                    self.execute(node)
                    self.cuda.after(self, stream, self.A[node])
            if self._alone:
                self._progress[s] = idx + 1
                continue
            with self._cv:
                self._progress[s] = idx + 1
                self._cv.notify_all()

    def _wait(self, need: Tuple[int, ...]) -> None:
        p = self._progress
        if all(x >= y for x, y in zip(p, need)) and not self._aborted:
            return
        with self._cv:
            while not self._aborted and any(x < y for x, y in zip(p, need)):
                self._cv.wait(0.5)
            if self._aborted:
                raise _Abort()

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            if self._error is None and not isinstance(e, _Abort):
                self._error = e
            self._aborted = True
            self._cv.notify_all()

    def record(self, node, b, op, t0, t1) -> None:
        with self._lock:
            super().record(node, b, op, t0, t1)
            self._busy[op] += t1 - t0
            if op == "compute":  # the wall clock since the previous compute ended goes to this step
                self._wall[b["step_kind"]] += t1 - self._mark
                self._mark, self._last_kind = t1, b["step_kind"]
