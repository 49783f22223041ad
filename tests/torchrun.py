"""Launching real process groups for the tests (gloo on CPU): under torchrun, or rank by rank as
torchrun starts them, so a test can stop or kill one rank."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return e


def torchrun(n: int, args, timeout: float = 300, cwd=ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port())] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def launch(rank_args, timeout_s: float, tmp_path):
    """`python -m graphgen` on each rank as torchrun starts it (RANK / WORLD_SIZE / MASTER_* in the
    environment), each with its own arguments."""
    port, procs = free_port(), []
    for rank, args in enumerate(rank_args):
        e = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(rank_args)),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "graphgen", f"parallel.timeout_s={timeout_s}",
                                       f"hydra.run.dir={tmp_path}/run{rank}"] + [str(a) for a in args],
                                      cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs
