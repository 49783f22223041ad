"""Shared pieces of the side-by-side benchmarks: the machine's matmul peak, a dummy-weight
Hugging Face model built like graphgen's dummy weights, timing of HF generate (prefill
apart), page-cache dropping, and the graphgen side of a run."""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graphgen import LLM  # noqa: E402
from graphgen.config import compose  # noqa: E402
from graphgen.models import hf_config_from_arch  # noqa: E402


@dataclass
class Run:
    """One generate call: who, batch, seconds, tokens."""

    who: str
    batch: int
    prompt_len: int
    gen_len: int
    prefill_s: float
    total_s: float
    note: str = ""
    extra: Dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:  # FlexGen's metric: generated tokens / (prefill + decode) time
        return self.batch * self.gen_len / self.total_s

    def row(self) -> str:
        return (f"{self.who:<10} batch {self.batch:>3}   prefill {self.prefill_s:8.2f} s   total {self.total_s:8.2f} s"
                f"   {self.tok_s:8.3f} tok/s   {self.note}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")


def matmul_peak(dtype=torch.bfloat16, device="cpu", reps: int = 8, shapes=((4096, 4096, 4096),
                                                                           (2048, 2048, 8192))) -> float:
    """Best FLOP/s of [M, K] x [K, N] matmuls in `dtype`: the machine's measured peak."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(n, k, device=device).to(dtype)
        F.linear(a, b)
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            F.linear(a, b)
            _sync(device)
            best = max(best, 2.0 * m * k * n / (time.perf_counter() - t))
    return best


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def hf_config(model: str):
    """The transformers config of a conf/model entry (architecture numbers only)."""
    return hf_config_from_arch(compose([f"model={model}"]).model.arch)


def hf_dummy_model(model: str, dtype=torch.bfloat16, device="cpu", std: float = 0.02):
    """transformers' model with random weights (normal(0, std), LayerNorm 1/0), built on meta first."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    m = m.to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std, generator=g)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    m.tie_weights()
    return m


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (= end of prefill)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(model, ids: torch.Tensor, gen_len: int, **kw) -> Run:
    """Time HF greedy generate of exactly gen_len tokens (no early eos stop)."""
    s = _FirstToken()
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                       do_sample=False, streamer=s, pad_token_id=1, **kw)
        total = time.perf_counter() - t0
    return Run("HF", ids.shape[0], ids.shape[1], gen_len, (s.first or t0 + total) - t0, total)


def graphgen_generate(llm: LLM, ids: torch.Tensor, gen_len: int, who: str = "graphgen") -> Run:
    """Time a graphgen generate: the total is the call's wall time, as hf_generate's; prefill is
    graphgen's own clock of its prefill squares (the time to the first token)."""
    t0 = time.perf_counter()
    llm.generate(ids, max_new_tokens=gen_len)
    wall = time.perf_counter() - t0
    st = llm.last_stats
    return Run(who, ids.shape[0], ids.shape[1], gen_len, st["prefill_s"], wall,
               note=f"(ops {st['prefill_s'] + st['decode_s']:.2f} s of the wall)", extra=dict(st))


def prompts(batch: int, prompt_len: int, vocab: int = 50000, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


def prefill_flops(graph) -> float:
    """Matmul + attention FLOPs of one block's prefill (step 0), from the graph's cost attributes."""
    return sum(a["flops"] for n, a in graph.nodes(data=True) if "kind" in a and n[0] == 0)


def drop_page_cache() -> str:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "page cache dropped"
    except OSError as e:
        return f"page cache NOT dropped ({e.strerror}: run as root for honest disk numbers)"


def free(*objs) -> None:
    """Collect what the caller no longer references (objs: the last references it hands over) and
    give freed heap memory back to the OS (glibc malloc_trim), so the next run's memory is
    measured from a clean base."""
    del objs
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def parse_ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def best_ms(fn, repeats: int) -> float:
    """Milliseconds of the fastest of `repeats` timed calls of fn, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def best(runs: Sequence[Run]) -> Optional[Run]:
    return max(runs, key=lambda r: r.tok_s) if runs else None
