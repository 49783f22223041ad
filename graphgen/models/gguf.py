"""GGUF checkpoints (llama.cpp's format): architecture, tokenizer and weights from one file.

The architecture config and the tokenizer come from transformers' own GGUF reader
(`from_pretrained(dir, gguf_file=...)`), so they are what transformers would build. Tensors are
read through the `gguf` package, tensor by tensor from the memory-mapped file, with
transformers' name mapping (gguf's tensor-name map) and its Q/K un-permutation (llama.cpp
permutes the rows of q and k for its rotary layout; the processor transformers applies undoes it).

Quantised blocks graphgen's compressed format holds exactly stay compressed (`stored`):
    Q4_1  d, m, 16 bytes of 4-bit codes  value = d*q + m           -> (4 bits, group 32)
    Q4_0  d, 16 bytes of 4-bit codes     value = d*(q - 8)         -> min = -8d
    Q8_0  d, 32 int8 codes               value = d*q               -> code q + 128, min = -128d
per group of 32 along the input dim; d and m are float16, kept as float16 (exact), and the
float32 arithmetic d*q + m gives the same values the gguf package's dequantisation does.
GGUF nibble order (byte j: code j low, code j + 16 high) is graphgen's 4-bit packing.
Every other type is dequantised once, at load, by the gguf package.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from . import build_spec
from .base import ModelSpec, WeightSpec
from .weights import WeightSource

Comp = Tuple[int, int, int]  # (bits, group_size, group_dim)
BLOCK = 32  # values per block of Q4_0 / Q4_1 / Q8_0
NATIVE: Dict[str, Comp] = {"Q4_0": (4, BLOCK, -1), "Q4_1": (4, BLOCK, -1), "Q8_0": (8, BLOCK, -1)}
DENSE = ("F32", "F16", "BF16")


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and what to do."""


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def _reader(path: Path):
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist: check model.path")
    return _open_reader(*_stamp(path))


@functools.lru_cache(maxsize=2)  # the reader parses every metadata field (the vocabulary: seconds)
def _open_reader(file: str, size: int, mtime: int):
    from gguf import GGUFReader  # imported where GGUF files are read

    path = Path(file)
    try:
        return GGUFReader(str(path))
    except Exception as e:  # truncated / corrupt files fail deep inside numpy's memmap parsing
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated "
                        "or corrupt: download it again, or point model.path at another checkpoint") from None


def _stamp(path: Path) -> tuple:
    """Cache key of a file's parsed metadata: the same file, unchanged."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def hf_config(path: Path):
    """The HF architecture config transformers builds from the file's metadata."""
    return copy.deepcopy(_hf_config(*_stamp(path)))


@functools.lru_cache(maxsize=4)  # parsing a GGUF's metadata (its whole vocabulary) takes seconds
def _hf_config(file: str, size: int, mtime: int):
    from transformers import AutoConfig

    path = Path(file)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as e:
        if "not supported" in str(e):
            raise GGUFError(f"{path}: {e} (transformers cannot read this GGUF architecture); graphgen runs "
                            "the llama, mistral and qwen2 families from GGUF files: convert the model's "
                            "Hugging Face checkpoint instead and set model.path to its directory") from None
        raise GGUFError(f"{path}: cannot read its metadata ({e}); download the file again") from None


def tokenizer(path: Path):
    """The tokenizer (and chat template) stored in the file, or None when it has none; shared by
    the LLMs of the process that read this file (callers set padding only, the same way)."""
    return _tokenizer(*_stamp(path))


@functools.lru_cache(maxsize=4)
def _tokenizer(file: str, size: int, mtime: int):
    from transformers import AutoTokenizer

    path = Path(file)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # a GGUF without tokenizer.ggml.* fields: ids only, as a checkpoint without one
        return None


class GGUFWeights(WeightSource):
    """Tensors of a GGUF file, by the HF names the model specs use."""

    kind = "gguf"

    def __init__(self, path):
        self.path = Path(path)
        r = _reader(self.path)
        self.arch = str(r.fields["general.architecture"].contents())
        self.tensors = {t.name: t for t in r.tensors}
        self.hf_config = hf_config(self.path)
        self._names = self._name_map(self.hf_config.num_hidden_layers)
        self._processor = self._make_processor(self.hf_config)

    def _name_map(self, n_layers: int):
        import gguf

        arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch), None)
        if arch is None:
            raise GGUFError(f"{self.path}: architecture {self.arch!r} is unknown to the gguf package; "
                            "graphgen runs llama, mistral and qwen2 GGUF files")
        return gguf.get_tensor_name_map(arch, n_layers)

    def _make_processor(self, hf_cfg):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        cls = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)
        return cls(config={"num_attention_heads": hf_cfg.num_attention_heads,
                           "num_key_value_heads": getattr(hf_cfg, "num_key_value_heads", None)
                           or hf_cfg.num_attention_heads})

    # --- names and types -------------------------------------------------------------
    def gguf_name(self, spec: WeightSpec) -> str:
        base, suffix = spec.source.rsplit(".", 1)
        name = self._names.get_name(base)
        if name is None or f"{name}.{suffix}" not in self.tensors:
            raise KeyError(f"GGUF file {self.path} has no tensor for {spec.source!r} "
                           f"({name}.{suffix} in GGUF names); is this the right model family?")
        return f"{name}.{suffix}"

    def type_name(self, spec: WeightSpec) -> str:
        return self.tensors[self.gguf_name(spec)].tensor_type.name

    def check(self, spec: ModelSpec) -> None:
        """Every tensor the model needs is in the file, in a type the gguf package can read."""
        from gguf.quants import _type_traits  # the block types gguf can dequantise

        for layer in spec.layers:
            for w in layer.weights:
                t = self.tensors[self.gguf_name(w)]
                if t.tensor_type.name not in DENSE and t.tensor_type not in _type_traits:
                    raise GGUFError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which graphgen "
                                    "cannot read; re-quantise the model to Q8_0, Q4_0, Q4_1 or F16 (llama.cpp's "
                                    "llama-quantize) or use its Hugging Face checkpoint")

    def _permuted(self, a: np.ndarray, name: str) -> np.ndarray:
        """transformers' un-permutation of q / k rows (works on any trailing shape: blocks too)."""
        return self._processor.process(weights=a, name=name).weights

    # --- reading ---------------------------------------------------------------------
    def get(self, spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        from gguf import dequantize

        name = self.gguf_name(spec)
        t = self.tensors[name]
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, which the gguf package "
                            "cannot dequantise; re-quantise the model to Q8_0, Q4_0, Q4_1 or F16") from None
        a = self._permuted(a, name)
        if tuple(a.shape) != tuple(spec.shape):
            raise ValueError(f"{self.path}: {name} has shape {tuple(a.shape)}, the model needs {spec.shape}")
        a = np.asarray(a, dtype=np.float32)
        return torch.from_numpy(a if a.flags.writeable else a.copy()).to(dtype)

    def stored(self, spec: WeightSpec, comp: Comp) -> Optional[Dict[str, torch.Tensor]]:
        """The tensor as graphgen's compressed parts {data, mins, scales} when the file holds it
        in exactly that compression (comp = (bits, group_size, group_dim)), else None."""
        name = self.gguf_name(spec)
        t = self.tensors[name]
        kind = t.tensor_type.name
        if NATIVE.get(kind) != comp or len(spec.shape) != 2 or comp[2] not in (-1, 1):
            return None
        blocks = np.asarray(t.data).reshape(spec.shape[0], spec.shape[1] // BLOCK, -1)  # (rows, ng, bytes)
        blocks = self._permuted(blocks, name)
        return _block_parts(blocks, kind)


def _block_parts(blocks: np.ndarray, kind: str) -> Optional[Dict[str, torch.Tensor]]:
    """(rows, ng, block bytes) uint8 -> data (rows, ng, 16|32) uint8, mins / scales (rows, ng, 1) f16."""
    b = torch.from_numpy(np.array(blocks))  # a copy in process memory, not pages of the file
    d = b[..., 0:2].contiguous().view(torch.float16)
    if kind == "Q4_1":
        m, data = b[..., 2:4].contiguous().view(torch.float16), b[..., 4:]
    elif kind == "Q4_0":
        m, data = d * -8, b[..., 2:]
    else:  # Q8_0: int8 codes -> uint8 code + 128
        m, data = d * -128, (b[..., 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    if not torch.isfinite(m).all():  # -8d / -128d overflows float16: keep it dense (dequantised)
        return None
    return {"data": data.contiguous(), "mins": m.contiguous(), "scales": d}


def mark_stored(spec, source: GGUFWeights, keep: bool = True) -> str:
    """Set each layer's `stored` compression (when every matrix of it is Q4_0 / Q4_1 / Q8_0 alike
    and `keep`); returns a notice naming the quantised types dequantised at load ("" if none)."""
    dequantised: Dict[str, int] = {}
    for layer in spec.layers:
        kinds = [source.type_name(w) for w in layer.weights if w.compressible and len(w.shape) >= 2]
        comps = {NATIVE.get(k) for k in kinds}
        layer.stored = comps.pop() if keep and len(comps) == 1 and None not in comps else None
        for k in kinds:
            if layer.stored is None and k not in DENSE:
                dequantised[k] = dequantised.get(k, 0) + 1
    if not dequantised:
        return ""
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(dequantised.items()))
    why = ("model.keep_quantized=false" if not keep else
           "graphgen keeps Q4_0, Q4_1 and Q8_0 compressed when all matrices of a layer share one of them")
    return f"graphgen: NOTE {source.path.name}: dequantising {kinds} matrices once at load ({why})"


def load(path, name: str, keep_quantized: bool = True) -> Tuple[ModelSpec, GGUFWeights, str]:
    """A GGUF file -> (model spec, weight source, notice): the architecture from its metadata, the
    layers marked with the compression they are stored in (keep_quantized), every tensor checked."""
    source = GGUFWeights(path)
    try:
        spec = build_spec(source.hf_config, name)
    except (ValueError, NotImplementedError) as e:
        raise GGUFError(f"{source.path}: {e}") from None
    source.check(spec)
    return spec, source, mark_stored(spec, source, keep_quantized)
