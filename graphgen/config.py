"""Typed configuration: dataclass schemas registered with Hydra's ConfigStore.

YAML files under conf/ hold values; these classes hold the shape and the types,
so a wrong key or a wrong type is rejected when the config is composed.
Passes and executors take these dataclasses, never Hydra objects.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


def conf_dir() -> Path:
    """The Hydra config tree: graphgen/conf in an installed wheel, the top-level conf/ in a checkout."""
    here = Path(__file__).resolve().parent
    for d in (here / "conf", here.parent / "conf"):
        if (d / "config.yaml").is_file():
            return d
    raise FileNotFoundError(f"graphgen's configs (conf/config.yaml) are missing next to {here}: reinstall graphgen")


CONF_DIR = conf_dir()

TIERS = ("device", "host", "disk")


@dataclass
class ModelConfig:
    name: str = "opt-125m"
    hf_id: str = "facebook/opt-125m"  # hub id looked up in the local HF cache
    path: Optional[str] = None  # local checkpoint directory (config.json + weights)
    weights: str = "auto"  # auto: checkpoint if found, else announced dummy | hf: require | dummy
    dtype: str = "bfloat16"  # compute/storage dtype: float32 | bfloat16 | float16 (CUDA only)
    arch: Dict[str, Any] = field(default_factory=dict)  # HF config.json fields (model_type, hidden_size...)
    keep_quantized: bool = True  # GGUF Q4_0 / Q4_1 / Q8_0 matrices stay compressed in the tiers (false: dequantised)


@dataclass
class ScheduleConfig:
    name: str = "zigzag"  # traversal order registered in passes/order.py: row | zigzag


@dataclass
class CompressionConfig:
    bits: Optional[int] = None  # 4 or 8; None = off (passes/compress.py)
    group_size: int = 64  # values per group, each with its own min and scale
    group_dim: int = -1  # weights: -1 along rows, 0 along columns; cache [2, seq, B, nkv, d]: -1 = head_dim


@dataclass
class PolicyConfig:
    # FlexGen's six percents: weights, cache, activations on device / host; the rest on disk
    percent: List[float] = field(default_factory=lambda: [100.0, 0.0, 100.0, 0.0, 100.0, 0.0])
    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    cpu_attention: bool = False  # delegate decode attention to where the KV cache lives
    weight_overrides: Dict[int, str] = field(default_factory=dict)  # layer index -> tier
    compress_weight: CompressionConfig = field(default_factory=CompressionConfig)
    compress_cache: CompressionConfig = field(default_factory=CompressionConfig)
    # auto: graphgen.perf.optimize picks percent, batch sizes, cpu_attention and compression for the
    # workload and the tier budgets (the values above are then ignored)
    auto: bool = False


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: str = "cpu"  # where compute runs: cpu | cuda
    device_mem: str = "8GB"
    host_mem: str = "12GB"
    disk_mem: str = "100GB"
    pinned_mem: Optional[str] = None  # CUDA: page-locked host memory for weights; None = half of host_mem
    # disk tier files; None: $GRAPHGEN_OFFLOAD_DIR, else a private ~/.cache/graphgen/offload (docs/offload.md)
    offload_dir: Optional[str] = "${oc.env:GRAPHGEN_OFFLOAD_DIR,null}"
    # measured or published constants for the cost model (FLOP/s, bytes/s), keyed by name
    profile: Dict[str, float] = field(default_factory=dict)


@dataclass
class WorkloadConfig:
    prompt_len: int = 32
    gen_len: int = 16
    num_prompts: Optional[int] = None  # None: one block of gpu_batch_size x num_gpu_batches
    prompts_file: Optional[str] = None  # text file, one prompt per line (needs a tokenizer)
    prompts: List[str] = field(default_factory=list)  # built-in prompts (with a tokenizer), as chat turns
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class ExecutorConfig:
    name: str = "async"  # async: load / compute / store streams | reference: one op at a time (the oracle)
    prefetch: int = 1  # how many squares ahead loads are issued
    trace: bool = False
    io_threads: int = 4  # disk tier: requests in flight (each an 8 MiB chunk)
    direct_io: bool = True  # disk tier: O_DIRECT, so the page cache cannot make "disk" fast
    pin_weight: bool = True  # CUDA: host-tier weights in pinned memory (async host -> GPU copies)
    staging_buffers: int = 2  # CUDA: pinned buffers for disk -> GPU copies (reused; bounded memory)
    staging_bytes: str = "64MiB"  # CUDA: size of each staging buffer
    keep_freed_memory: bool = True  # CPU (glibc): reuse freed heap memory, no mmap + page faults per tensor
    # CPU: compressed weights computed on by torch's packed int4 / int8 kernels (executors/packed.py);
    # false: every run of a layer dequantises it (FlexGen's group-wise 8-bit instead of per-channel)
    packed_weights: bool = True


@dataclass
class VizConfig:
    schedule: bool = False  # picture of the (token, layer, batch) grid by execution step
    timeline: bool = False  # Gantt of the streams + memory per tier, and trace.json (turns on executor.trace)
    graph: bool = False  # the compiled graph as GraphML and DOT
    formats: List[str] = field(default_factory=lambda: ["png", "svg"])
    out_dir: Optional[str] = None  # None: Hydra's run directory (the current directory outside Hydra)
    # the schedule picture's detail window: [first, last] token steps / layers / GPU batches drawn
    # square by square (null: the first 2 token steps, the first 7 layers, up to 8 batches)
    detail_tokens: Optional[List[int]] = None
    detail_layers: Optional[List[int]] = None
    detail_batches: Optional[List[int]] = None


@dataclass
class ParallelConfig:
    # pipeline parallelism (passes/partition_stages.py, graphgen/distributed.py; docs/distributed.md)
    stages: Optional[int] = None  # pipeline stages; None: WORLD_SIZE under torchrun, else 1
    stage_layers: List[int] = field(default_factory=list)  # layers per stage (embedding and head count); [] = balanced
    # per stage {device_mem, host_mem, disk_mem}; [] = hardware.* for every stage (under torchrun each
    # rank's own hardware.* is gathered here at start-up)
    stage_budgets: List[Dict[str, Any]] = field(default_factory=list)
    timeout_s: float = 300.0  # a rank that answers nothing for this long is reported dead and the run stops


JOB_NAMES = ("generate", "batch", "simulate", "plan")  # the run modes (conf/job/)
BAD_INPUT_MODES = ("skip", "stop")
INPUT_FORMATS = ("auto", "jsonl", "text", "openai")


@dataclass
class JobConfig:
    # the run mode: generate: the workload's prompts, report throughput | batch: prompts file -> JSONL |
    # simulate: predict the run on the cost model, touching no weights | plan: compile and draw, run nothing
    name: str = "generate"
    input: Optional[str] = None  # batch: JSONL ({"id", "prompt"} per line) or text, one prompt a line
    output: Optional[str] = None  # batch: JSONL results, appended per block; re-run to resume
    input_format: str = "auto"  # auto (OpenAI batch file by its first line, else by extension) | jsonl | text | openai
    on_bad_input: str = "skip"  # skip: report to <output>.errors.jsonl | stop: refuse to start
    max_new_tokens: Optional[int] = None  # None: workload.gen_len
    do_sample: Optional[bool] = None  # None: workload.do_sample
    temperature: Optional[float] = None  # None: workload.temperature
    top_k: Optional[int] = None  # None: workload.top_k
    top_p: Optional[float] = None  # None: workload.top_p
    seed: Optional[int] = None  # None: the root seed
    stop: List[str] = field(default_factory=list)  # stop strings on decoded text; \\n \\t are unescaped
    logprobs: bool = False  # add per-token log-probabilities to each output line
    block_size: Optional[int] = None  # prompts per generate call; None: gpu_batch_size x num_gpu_batches
    progress: bool = True  # tqdm bar on stderr (shown only on a terminal)


@dataclass
class ReportConfig:
    json: bool = False  # print the report as JSON on stdout (text report to stderr) and write report.json
    progress: bool = True  # progress bar while generating (shown only on a terminal)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    viz: VizConfig = field(default_factory=VizConfig)
    job: JobConfig = field(default_factory=JobConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # compiler pipeline: pass names registered in passes/
    pipeline: List[str] = field(default_factory=lambda: [
        "partition_stages", "order", "place_tensors", "compress", "delegate_cpu_attention", "insert_io",
        "insert_comm", "plan_memory"])
    seed: int = 0


def package_file(package: str, name: str) -> Optional[str]:
    """${package_file:pkg,name}: a file shipped inside an installed Python package (the default
    model's GGUF), None when the package is not installed."""
    import importlib.resources

    try:
        f = importlib.resources.files(package) / name
    except ModuleNotFoundError:
        return None
    return str(f) if f.is_file() else None


def register_configs() -> None:
    """Register the root schema so YAML values are validated against it, and our resolvers."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, key: str = "value") -> int:
    """'16GB' / '512MiB' / 1e9 -> bytes; errors name the config key."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{key}={value!r} is not a size: write bytes or e.g. '16GB', '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float, digits: int = 2) -> str:
    """A size for people: GB from 10 MB up, MB below (not '0.00 GB')."""
    return f"{n / 1e9:.{digits}f} GB" if abs(n) >= 10e6 else f"{n / 1e6:.2f} MB"


def tier_budgets(hw: HardwareConfig) -> Dict[str, int]:
    return {"device": parse_bytes(hw.device_mem, "hardware.device_mem"),
            "host": parse_bytes(hw.host_mem, "hardware.host_mem"),
            "disk": parse_bytes(hw.disk_mem, "hardware.disk_mem")}


def num_stages(cfg: "Config") -> int:
    """Pipeline stages: parallel.stages, else the world size torchrun started (WORLD_SIZE), else 1."""
    return int(cfg.parallel.stages or os.environ.get("WORLD_SIZE") or 1)


def stage_budgets(cfg: "Config") -> List[Dict[str, int]]:
    """Tier budgets of each stage: parallel.stage_budgets (missing keys from hardware.*), else hardware.*."""
    n, own = num_stages(cfg), tier_budgets(cfg.hardware)
    given = cfg.parallel.stage_budgets
    if given and len(given) != n:
        raise ValueError(f"parallel.stage_budgets has {len(given)} entries for {n} stages: give one per stage "
                         f"or none")
    out = []
    for s, b in enumerate(given or [{}] * n):
        bad = set(b) - {"device_mem", "host_mem", "disk_mem"}
        if bad:
            raise ValueError(f"parallel.stage_budgets[{s}] has {sorted(bad)}: keys are device_mem, host_mem, disk_mem")
        out.append({t: parse_bytes(b[f"{t}_mem"], f"parallel.stage_budgets[{s}].{t}_mem") if f"{t}_mem" in b
                    else own[t] for t in TIERS})
    return out


def to_config(cfg: Any) -> Config:
    """OmegaConf DictConfig (from Hydra) -> plain typed Config dataclass, checked."""
    from omegaconf import OmegaConf

    if isinstance(cfg, Config):
        return check_config(cfg)
    check_keys(cfg, Config)
    return check_config(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg)))


def check_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Every key of a schema-typed node is a field of its dataclass: a key added with `+` and
    misspelt (+policy.cpu_atention=true) is an error, not silently ignored."""
    from omegaconf import OmegaConf

    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), 1)
            hint = f": did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(hints)}"
            raise ValueError(f"unknown config key {prefix}{key}{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ) and OmegaConf.is_dict(node._get_node(key)):
            check_keys(node._get_node(key), typ, f"{prefix}{key}.")


def check_config(cfg: Config) -> Config:
    """Values the schema's types let through but no run can use; errors name the key."""
    p, w = cfg.policy, cfg.workload
    for key, v in (("policy.gpu_batch_size", p.gpu_batch_size), ("policy.num_gpu_batches", p.num_gpu_batches),
                   ("workload.prompt_len", w.prompt_len), ("workload.gen_len", w.gen_len)):
        if v < 1:
            raise ValueError(f"{key}={v} must be >= 1")
    if w.num_prompts is not None and w.num_prompts < 1:
        raise ValueError(f"workload.num_prompts={w.num_prompts} must be >= 1 (or null: one block of "
                         "policy.gpu_batch_size x policy.num_gpu_batches)")
    if not cfg.pipeline:
        raise ValueError(f"pipeline=[] is empty: a run needs the compiler passes, e.g. the default "
                         f"pipeline={Config().pipeline}")
    tier_budgets(cfg.hardware)  # sizes that do not parse name their key
    return cfg


def compose(overrides: Optional[List[str]] = None) -> Config:
    """Compose conf/ with CLI-style overrides without running a Hydra app."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_config(cfg)
