"""Small graphs for pass tests, compiled from plain dataclass configs (no Hydra): the paper's
figure, 3 tokens x 4 layers (embed, attn, mlp, head) x 4 GPU batches of 2, on a tiny OPT."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence, Union

from graphgen.build import build_graph, squares
from graphgen.config import CompressionConfig, Config, ExecutorConfig, HardwareConfig, PolicyConfig, ScheduleConfig
from graphgen.models import build_spec, hf_config_from_arch
from passes import run_pipeline

TINY = {"model_type": "opt", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "ffn_dim": 32,
        "num_attention_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 16}

ALL_HOST = [0.0, 100.0, 0.0, 100.0, 100.0, 0.0]  # weights and cache on the host, activations on the device


def config(schedule: str = "zigzag", percent: Optional[Sequence[float]] = None, cpu_attention: bool = False,
           device_mem: str = "8GB", prefetch: int = 1, weight_bits: Optional[int] = None,
           cache_bits: Optional[int] = None, **policy) -> Config:
    """A Config built from its dataclasses: the knobs the pass tests turn, the rest at defaults."""
    p = PolicyConfig(cpu_attention=cpu_attention, compress_weight=CompressionConfig(bits=weight_bits),
                     compress_cache=CompressionConfig(bits=cache_bits), **policy)
    if percent is not None:
        p = replace(p, percent=list(percent))
    return Config(schedule=ScheduleConfig(schedule), policy=p, hardware=HardwareConfig(device_mem=device_mem),
                  executor=ExecutorConfig(prefetch=prefetch))


def tiny_spec(**arch):
    return build_spec(hf_config_from_arch(dict(TINY, **arch)))


def compiled(cfg: Union[Config, None] = None, names: Optional[Sequence[str]] = None, tokens: int = 3,
             batches: int = 4, prompt_len: int = 4):
    """(graph after `names` (default: cfg.pipeline), cfg)."""
    cfg = cfg or config()
    g = build_graph(tiny_spec(), batch=2, num_batches=batches, prompt_len=prompt_len, gen_len=tokens)
    return run_pipeline(g, cfg, None if names is None else list(names)), cfg


def order_of(g):
    """Squares in execution order."""
    return sorted(squares(g), key=lambda n: g.nodes[n]["order"])
