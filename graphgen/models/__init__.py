"""Model registry: HF `model_type` -> architecture spec class."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Type

from .base import LayerSpec, ModelSpec, WeightSpec, positions_from_mask  # noqa: F401
from .opt import OPTSpec
from .llama import LlamaSpec, MistralSpec, Qwen2Spec
from .bloom import BloomSpec
from .gpt_neox import GPTNeoXSpec

FAMILIES: Dict[str, Type[ModelSpec]] = {"opt": OPTSpec, "llama": LlamaSpec, "mistral": MistralSpec,
                                         "qwen2": Qwen2Spec, "bloom": BloomSpec, "gpt_neox": GPTNeoXSpec}


def register_family(model_type: str, cls: Type[ModelSpec]) -> None:
    FAMILIES[model_type] = cls


def spec_class(model_type: str) -> Type[ModelSpec]:
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"model_type {model_type!r} is not supported; supported model types: {known}")
    return FAMILIES[model_type]


# config.json keys that transformers v5 still accepts but no longer keeps as attributes
LEGACY_KEYS = {"rope_theta", "rope_scaling", "rotary_pct", "rotary_emb_base"}


def hf_config_from_arch(arch: Dict[str, Any]):
    """YAML architecture numbers (HF config.json field names) -> transformers config object."""
    from transformers import AutoConfig

    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ValueError("model.arch needs a model_type (e.g. opt); "
                         f"supported model types: {', '.join(sorted(FAMILIES))}")
    spec_class(model_type)
    defaults = AutoConfig.for_model(model_type)
    unknown = [k for k in arch if not hasattr(defaults, k) and k not in LEGACY_KEYS]
    if unknown:
        raise ValueError(f"model.arch has keys unknown to {model_type}'s HF config: {unknown}")
    return AutoConfig.for_model(model_type, **arch)


def hf_config_from_dir(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def build_spec(hf_config: Any, name: str = "") -> ModelSpec:
    return spec_class(hf_config.model_type)(hf_config, name)

