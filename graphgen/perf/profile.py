"""Hardware profiler: measures the constants the cost model needs and caches them per host.

`measure()` times the primitives a FlexGen-style schedule is made of (graphgen.perf.probes):
matmuls shaped like LLM layers (prefill: many tokens; decode: one token per sequence), attention,
memory bandwidth, host<->device copies and sequential disk I/O that bypasses the page cache,
saying each step as it goes; noisy probes are repeated and the result checked for consistency
(graphgen.perf.checks), and an inconsistent profile is used for the run but never cached. The result is a flat
`{key: float}` dict (keys and units in PROFILE_KEYS), the same shape as
`HardwareConfig.profile`, so a measured profile and a published one (conf/hardware/
t4-flexgen.yaml) are interchangeable. `load_or_measure()` caches it as JSON under
$GRAPHGEN_CACHE_DIR, else $XDG_CACHE_HOME/graphgen, else ~/.cache/graphgen.

    python -m graphgen.perf.profile [--device cpu] [--offload-dir DIR] [--quick] [--refresh]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from executors.offload_dir import default_offload_dir  # the runtime owns the rule

from . import checks
from .probes import probe_steps

VERSION = 4  # bump when keys or methods change: cached profiles of another version are re-measured

PROFILE_KEYS: Dict[str, str] = {
    # matmul (B*s, H) x (H, 4H): one per dtype the device computes in
    "device_flops_<dtype>": "matmul throughput on the compute device, prefill shape (B*s, H) x (H, 4H) "
                            "(FLOP/s; FlexGen mm_flops_p)",
    "device_flops_decode_<dtype>": "matmul throughput on the compute device, decode shape (B, H) x (H, 4H), "
                                   "weight-bandwidth bound (FLOP/s; FlexGen mm_flops_g)",
    "device_bmm_flops_<dtype>": "prefill causal attention (graphgen.models.base.attend) on the device, "
                                "counted as 4*B*heads*s*s*head_dim FLOPs (FLOP/s; FlexGen bmm_flops_p)",
    "cpu_flops_<dtype>": "matmul throughput on the host CPU, prefill shape (FLOP/s)",
    "cpu_flops_decode_<dtype>": "matmul throughput on the host CPU, decode shape (FLOP/s)",
    # decode attention: one query token against the whole KV cache. FlexGen charges it
    # 4*B*S*H FLOPs == the fp16 K+V bytes, so its bmm_flops_g / cpu_flops are these bandwidths
    "device_attn_bw_<dtype>": "decode attention (SDPA with an additive mask) on the device: bytes of "
                              "K+V cache processed per second (bytes/s)",
    "device_attn_bw": "device_attn_bw_<dtype> of the device's default dtype: float16 on CUDA, "
                      "bfloat16 on CPU (bytes/s; FlexGen bmm_flops_g)",
    "cpu_attn_bw_<dtype>": "decode attention on the host CPU (delegated attention) (bytes/s)",
    "cpu_attn_bw": "cpu_attn_bw_bfloat16 (bytes/s; FlexGen cpu_flops)",
    "host_memcpy_bw": "host RAM to host RAM copy of large tensors, bytes copied per second (bytes/s)",
    "h2d_bw": "host -> device copy from pinned memory; on a CPU-only machine device == host and this "
              "is host_memcpy_bw (bytes/s; FlexGen ctog_bdw)",
    "d2h_bw": "device -> host copy into pinned memory; CPU-only: host_memcpy_bw "
              "(bytes/s; FlexGen gtoc_bdw_hidden)",
    "disk_read_bw": "sequential read of a file in offload_dir, page cache bypassed, 4 threads x 4 MiB "
                    "requests (bytes/s; FlexGen dtoc_bdw)",
    "disk_write_bw": "sequential write of a new file in offload_dir incl. fsync, page cache bypassed "
                     "(bytes/s; FlexGen ctod_bdw_hidden_p / ctod_bdw_g)",
    "disk_o_direct": "1 if the disk figures used O_DIRECT, 0 if buffered I/O + fsync + "
                     "posix_fadvise(DONTNEED) (or no bypass at all where fadvise is missing) (flag)",
    "device_is_host": "1 if there is no separate device (CPU-only): h2d/d2h are memcpy (flag)",
    # memory levels: every compute part is priced no faster than streaming its bytes through them
    "device_mem_bw": "bytes/s a kernel on the compute device reads from its memory: a sum over a buffer "
                     "larger than the caches (CPU-only: the same memory as host_mem_bw) (bytes/s)",
    "host_mem_bw": "bytes/s a kernel on the host CPU reads from RAM, as device_mem_bw (bytes/s)",
    # executor-level costs (graphgen.perf.costmodel treats each as absent = free)
    "device_mm_bw_<dtype>": "weight bytes/s a decode matmul (8, H) x (H, 4H) streams (8 sequences, one "
                            "token each), weights cycling over a set larger than the caches: the floor of a "
                            "decode layer's matmuls (bytes/s)",
    "compute_overhead_s": "seconds of one decode square of a tiny layer (H=64, B=1) through graphgen's layer "
                          "code, mean of attention and MLP: the fixed cost of a square's kernels (s)",
    "disk_latency_s": "seconds of one 4 KiB read from offload_dir, page cache bypassed, file opened and "
                      "closed as the disk tier does per request (s); calibrated: the median 4 KiB read "
                      "through the disk tier's own read path (graphgen.perf.probes.small_read_times)",
    "dequant_bw": "dense bytes/s of dequantising 4-bit group-wise weights (executors.quant) on the "
                  "device, the compute dtype being the default one (bytes/s)",
    "attn_overhead_s": "optional, fitted by graphgen.perf.calibrate: what an attention square costs beyond "
                       "compute_overhead_s and its FLOPs and bytes (s)",
    "calibrated": "optional: 1 when graphgen.perf.calibrate fitted the executor-level keys to traced runs (flag)",
    "plain_weight_bw_<dtype>": "optional, fitted by graphgen.perf.calibrate: CPU, bytes/s of the reorder a decode "
                               "matmul pays on dense weights loaded from the host or disk tier (not prepacked "
                               "into oneDNN's layout as the device tier's are) (bytes/s)",
    "plain_flops_<dtype>": "optional, fitted by graphgen.perf.calibrate: CPU, the extra FLOP rate a prefill matmul "
                           "on weights that are not prepacked pays (oneDNN's plain, unfused path) (FLOP/s)",
    "inline_io_s": "optional, fitted by graphgen.perf.calibrate: seconds of a load or store within RAM run "
                   "inline on the compute stream (CPU), beyond the slice a store writes at host_memcpy_bw (s)",
    "kv_join_bw_<dtype>": "optional, fitted by graphgen.perf.calibrate: cache bytes/s of the copy a decode attention "
                          "square makes of a prefix loaded from another tier (and its new slice) into a head-major "
                          "scratch buffer before attending (executors/attention.py joined); a cache read in place "
                          "pays none (bytes/s)",
    "compute_io_contention": "optional, fitted by graphgen.perf.calibrate: seconds a compute square runs longer "
                             "per second of disk I/O beside it (I/O threads taking cores from compute) (s/s)",
    # optional refinements, present in published profiles only; consumers fall back to the key in ()
    "d2h_cache_bw": "optional: device -> host copy of KV cache slices, slower than whole "
                    "activations (bytes/s; FlexGen gtoc_bdw_cache; else d2h_bw)",
    "disk_write_latency_s": "optional: seconds per disk write request, fitted by graphgen.perf.calibrate "
                            "(the cache's slice writes are buffered; else disk_latency_s)",
    "disk_read_cache_bw": "optional: disk -> host read of KV cache, a prefix of a file written slice by slice "
                          "(fitted by graphgen.perf.calibrate from the cache reads; bytes/s; else disk_read_bw)",
    "disk_write_cache_bw": "optional: host -> disk write of prefill KV cache "
                           "(bytes/s; FlexGen ctod_bdw_cache_p; else disk_write_bw)",
    "cpu_attn_c1": "optional: FlexGen's fitted correction of cpu_attn_bw for small GPU batches gbs and "
                   "hidden sizes h: factor max(0.1, 1 + c1*a*b - c2*a - c3*b), a = max(0, log2(64/gbs)), "
                   "b = max(0, log2(4096/h)) (dimensionless)",
    "cpu_attn_c2": "optional: see cpu_attn_c1 (dimensionless)",
    "cpu_attn_c3": "optional: see cpu_attn_c1 (dimensionless)",
}


def _resolve(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"hardware.device={device!r} but no CUDA GPU is visible to torch "
                         f"{torch.__version__}: use hardware=cpu (or hardware=auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"hardware.device={device!r}: the profiler knows 'cpu' and 'cuda[:N]'")
    return dev


def detect_memory(device: str = "cpu", offload_dir: Optional[str] = None) -> Dict[str, int]:
    """Sizes in bytes: device (GPU total; 0 on CPU-only), host RAM total/available, free disk."""
    dev = _resolve(device)
    page = os.sysconf("SC_PAGE_SIZE")
    available = os.sysconf("SC_AVPHYS_PAGES") * page
    try:  # MemAvailable counts reclaimable page cache, SC_AVPHYS_PAGES does not
        with open("/proc/meminfo") as f:
            available = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    disk = os.path.abspath(offload_dir or default_offload_dir())
    while not os.path.exists(disk):  # the filesystem it will be made on: nothing is created to ask
        disk = os.path.dirname(disk)
    return {"device_total": torch.cuda.mem_get_info(dev)[1] if dev.type == "cuda" else 0,
            "host_total": os.sysconf("SC_PHYS_PAGES") * page, "host_available": available,
            "disk_free": shutil.disk_usage(disk).free}


Say = Callable[[str], None]


def stderr_say(msg: str) -> None:
    """Progress of a measurement, on stderr (stdout may carry a JSON report)."""
    print(f"graphgen: {msg}", file=sys.stderr, flush=True)


def measure(device: str = "cpu", offload_dir: Optional[str] = None, quick: bool = False,
            say: Optional[Say] = None) -> Dict[str, float]:
    """Measure every key of PROFILE_KEYS that this machine has (~25 s idle; quick: ~6 s)."""
    return measure_record(device, offload_dir, quick, say)["profile"]


def measure_record(device: str = "cpu", offload_dir: Optional[str] = None, quick: bool = False,
                   say: Optional[Say] = None) -> Dict[str, object]:
    """{'profile', 'problems', 'tries'}: every probe step, the noisy ones checks.TRIES times (median
    kept, more tries while they disagree); then check_profile, the steps a problem names measured
    once more; the problems left stand."""
    say = say or (lambda msg: None)
    steps = probe_steps(_resolve(device), quick, offload_dir or default_offload_dir())
    out, tries, keys = {}, {}, {}
    for i, (what, fn) in enumerate(steps, 1):
        say(f"measuring {what} ({i}/{len(steps)})")
        t0 = time.perf_counter()
        runs = checks.settle([fn() for _ in range(checks.TRIES)], fn) if what in checks.NOISY else [fn()]
        out.update(checks.median(runs))
        keys[what] = list(runs[0])
        if what in checks.NOISY:
            tries.update({k: [r[k] for r in runs] for k in runs[0]})
        say(f"  {what}: {time.perf_counter() - t0:.1f} s")
    problems = checks.check_profile(out)
    if problems:
        say("inconsistent, measuring again: " + "; ".join(problems))
        for what, fn in steps:
            if checks.implicated(problems, keys[what]):
                out.update(checks.median([fn() for _ in range(checks.TRIES)]))
        problems = checks.check_profile(out)
    return {"profile": dict(sorted(out.items())), "problems": problems, "tries": tries}


# ---------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$GRAPHGEN_CACHE_DIR, else $XDG_CACHE_HOME/graphgen, else ~/.cache/graphgen."""
    if os.environ.get("GRAPHGEN_CACHE_DIR"):
        return Path(os.environ["GRAPHGEN_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "graphgen"


def cache_path(device: str = "cpu") -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
    return cache_dir() / f"hardware-{socket.gethostname()}-{safe}.json"


def _fs_type(path: str) -> str:
    """Filesystem type holding path, from /proc/mounts (longest mount-point prefix); '?' elsewhere."""
    path, best = os.path.realpath(path), ("", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                mnt, fstype = line.split()[1:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, fstype)
    except OSError:
        pass
    return best[1]


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "cpu"


def _meta(device: str, offload_dir: str, quick: bool, seconds: float,
          profile: Dict[str, float]) -> Dict[str, object]:
    dev = torch.device(device)
    return {
        "version": VERSION, "hostname": socket.gethostname(), "device": device,
        "device_name": _device_name(dev), "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "quick": quick,
        "offload_dir": os.path.realpath(offload_dir), "offload_fs": _fs_type(offload_dir),
        "disk_method": ("O_DIRECT" if profile.get("disk_o_direct") else
                        "buffered + fsync + posix_fadvise(DONTNEED)"
                        if hasattr(os, "posix_fadvise") else "buffered (page cache NOT bypassed)"),
        "links": ("memcpy: no separate device, h2d/d2h = host RAM copy"
                  if profile.get("device_is_host") else "pinned host <-> device copies"),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 2),
        "load_average": round(os.getloadavg()[0], 2),  # other processes slow every probe down
    }


def measure_and_cache(device: str = "cpu", offload_dir: Optional[str] = None, quick: bool = False,
                      say: Optional[Say] = stderr_say) -> Dict[str, object]:
    """Measure and write the cache file atomically, unless the measurement is inconsistent (then it
    is returned for this run only: meta['cached'] = False); return {'profile': ..., 'meta': ...}."""
    say = say or (lambda msg: None)
    offload_dir = offload_dir or default_offload_dir()
    path = cache_path(device)
    say(f"measuring this machine for the cost model ({'~6' if quick else '~25'} s idle, more when busy; "
        f"once: cached in {path})")
    t0 = time.perf_counter()
    m = measure_record(device, offload_dir, quick, say)
    meta = _meta(device, offload_dir, quick, time.perf_counter() - t0, m["profile"])
    meta.update(tries=m["tries"], problems=m["problems"], cached=not m["problems"])
    record = {"profile": m["profile"], "meta": meta}
    if m["problems"]:
        say("WARNING: the measurement is inconsistent (" + "; ".join(m["problems"]) + "), probably "
            f"disturbed by other load: used for this run only, NOT cached. {remeasure_hint(device)}")
        return record
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    say(f"measured in {meta['seconds']} s (load average {meta['load_average']}), cached in {path}")
    return record


def remeasure_hint(device: str = "cpu") -> str:
    return (f"Re-measure on a quieter machine with `python -m graphgen.perf.profile --refresh --device "
            f"{device}` (cache: {cache_path(device)})")


def load_cached(device: str = "cpu") -> Optional[Dict[str, object]]:
    """The cached {'profile', 'meta'} record for this host and device, or None."""
    try:
        record = json.loads(cache_path(device).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("profile"), dict) \
        and isinstance(record.get("meta"), dict)
    return record if ok else None


def _usable(record: Optional[Dict[str, object]], offload_dir: str, quick: bool) -> bool:
    """Same version, same offload directory, and never a quick profile where a full one is asked."""
    if record is None:
        return False
    meta = record["meta"]
    return (meta.get("version") == VERSION and (quick or not meta.get("quick"))
            and meta.get("offload_dir") == os.path.realpath(offload_dir))


def load_or_measure_record(device: str = "cpu", offload_dir: Optional[str] = None,
                           refresh: bool = False, quick: bool = False) -> Dict[str, object]:
    offload_dir = offload_dir or default_offload_dir()
    here = (device, os.path.realpath(offload_dir))
    record = None if refresh else _THIS_RUN.get(here) or load_cached(device)  # this process's newest first
    if _usable(record, offload_dir, quick):
        return record
    record = measure_and_cache(device, offload_dir, quick)
    keep_for_this_run(record, device)
    return record


def keep_for_this_run(record: Dict[str, object], device: str) -> None:
    """A profile not cached on disk is kept for this process (not measured twice); a cached one
    replaces what this process kept."""
    here = (device, record["meta"]["offload_dir"])
    if record["meta"].get("cached", True):
        _THIS_RUN.pop(here, None)
    else:
        _THIS_RUN[here] = record


_THIS_RUN: Dict[Tuple[str, str], Dict[str, object]] = {}


def load_or_measure(device: str = "cpu", offload_dir: Optional[str] = None,
                    refresh: bool = False, quick: bool = False) -> Dict[str, float]:
    """The cached profile for this host/device/offload_dir; measured (and cached) if absent."""
    return dict(load_or_measure_record(device, offload_dir, refresh, quick)["profile"])


# ---------------------------------------------------------------- CLI


# the interconnect between pipeline stages, not this machine: added to a measured profile
LINK_KEYS = ("net_bw", "net_latency_s")


def hardware_profile(cfg) -> Dict[str, float]:
    """The configured profile; `hardware=auto` (or a profile with none but LINK_KEYS) measures this
    machine and adds the link's keys."""
    hw = cfg.hardware
    given = dict(hw.profile)
    if any(k not in LINK_KEYS for k in given):
        return given
    return {**load_or_measure(hw.device, hw.offload_dir), **given}


def format_table(profile: Dict[str, float], meta: Optional[Dict[str, object]] = None) -> str:
    """Human units: GFLOP/s for *flops*, GB/s (1e9 bytes/s) for *_bw*, us for *_s, raw for flags."""
    rows = []
    for key, value in profile.items():
        if "flops" in key:
            rows.append((key, f"{value / 1e9:12.1f}", "GFLOP/s"))
        elif "_bw" in key:
            rows.append((key, f"{value / 1e9:12.2f}", "GB/s"))
        elif key.endswith("_s"):
            rows.append((key, f"{value * 1e6:12.1f}", "us"))
        else:
            rows.append((key, f"{value:12.4g}", ""))
    width = max(len(k) for k, _, _ in rows)
    lines = [f"{k:<{width}} {v} {u}" for k, v, u in rows]
    for key, value in (meta or {}).items():
        lines.append(f"# {key}: {value}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m graphgen.perf.profile", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--offload-dir", default=None,
                   help="directory for the disk test (default: $GRAPHGEN_OFFLOAD_DIR or ~/.cache/graphgen/offload)")
    p.add_argument("--quick", action="store_true", help="small sizes, ~3 s (noisier)")
    p.add_argument("--refresh", action="store_true", help="re-measure even if a cached profile exists")
    args = p.parse_args(argv)
    record = load_or_measure_record(args.device, args.offload_dir, args.refresh, args.quick)
    print(format_table(record["profile"], record["meta"]))
    print(f"# cache: {cache_path(args.device)}")


if __name__ == "__main__":
    main()
