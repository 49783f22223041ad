"""Weight sources: read one checkpoint tensor at a time (safetensors, .bin) or synthesise it.

Never holds the whole checkpoint in RAM: safetensors are opened lazily and read tensor
by tensor; .bin files are memory-mapped (torch.load(mmap=True)).
"""
from __future__ import annotations

import json
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .base import WeightSpec

_PREFIXES = ("", "model.", "decoder.", "transformer.", "gpt_neox.")


class WeightSource:
    """Yields tensors for WeightSpecs in the requested dtype."""

    kind = "abstract"

    def get(self, spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def locate(self, spec: WeightSpec) -> Optional[Tuple[str, int, torch.dtype]]:
        """(file, byte offset, stored dtype) when the tensor lies raw in a file (read in place)."""
        return None

    def stored(self, spec: WeightSpec, comp) -> Optional[Dict[str, torch.Tensor]]:
        """The tensor as compressed parts {data, mins, scales} when the checkpoint holds it in
        exactly that compression ((bits, group_size, group_dim)), else None."""
        return None

    def close(self) -> None:
        pass


class DummyWeights(WeightSource):
    """Deterministic random weights (FlexGen's dummy mode), seeded by tensor name."""

    kind = "dummy"

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def get(self, spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        if spec.init == "ones":
            return torch.ones(spec.shape, dtype=dtype)
        if spec.init == "zeros":
            return torch.zeros(spec.shape, dtype=dtype)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(spec.source.encode()))
        return (torch.randn(spec.shape, generator=g) * self.std).to(dtype)


class CheckpointWeights(WeightSource):
    """A local Hugging Face checkpoint directory (*.safetensors or pytorch_model*.bin)."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: Dict[str, Path] = {}  # tensor name -> file
        self._open: Dict[Path, object] = {}
        self._headers: Dict[Path, Dict[str, tuple]] = {}  # safetensors file -> name -> (offset, dtype, shape)
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        files = [f for f in files if not f.name.startswith("training_args")]
        if not files:
            raise FileNotFoundError(f"no *.safetensors or *.bin weights in {self.path}")
        for f in files:
            for name in self._names(f):
                self._where[name] = f

    def _names(self, f: Path) -> List[str]:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with unreadable(f):
                with safe_open(str(f), "pt") as h:
                    return list(h.keys())
        return list(self._handle(f).keys())

    def _handle(self, f: Path):
        if f not in self._open:
            with unreadable(f):
                if f.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open[f] = safe_open(str(f), "pt")
                else:
                    self._open[f] = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        return self._open[f]

    def resolve(self, source: str) -> Optional[str]:
        """Checkpoint name for a spec name, tolerating 'model.'/'decoder.' prefix differences."""
        stripped = source
        for p in _PREFIXES[1:]:
            if stripped.startswith(p):
                stripped = stripped[len(p):]
                break
        for cand in [source] + [p + stripped for p in _PREFIXES] + [p + source for p in _PREFIXES]:
            if cand in self._where:
                return cand
        return None

    def get(self, spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
        name = self.resolve(spec.source)
        if name is None:
            raise KeyError(f"checkpoint {self.path} has no tensor {spec.source!r} "
                           f"(needed for {spec.name}); is this the right model family?")
        f = self._where[name]
        h = self._handle(f)
        with unreadable(f):
            t = h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]
        if tuple(t.shape) != tuple(spec.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != spec shape {spec.shape}")
        if not t.is_floating_point():  # an integer tensor cast to floats would be garbage
            raise ValueError(f"{f}: tensor {name} is stored as {t.dtype}; graphgen reads floating-point weights "
                             "(float32, bfloat16, float16): is this a quantised format it does not read?")
        # a copy in process memory: safetensors / mmap tensors are pages of the checkpoint file,
        # which dropping the page cache would turn back into disk reads
        return t.to(dtype, copy=True)

    def locate(self, spec: WeightSpec) -> Optional[Tuple[str, int, torch.dtype]]:
        name = self.resolve(spec.source)
        if name is None or self._where[name].suffix != ".safetensors":
            return None
        f = self._where[name]
        if f not in self._headers:
            self._headers[f] = safetensors_index(f)
        off, dtype, shape = self._headers[f].get(name, (None, None, None))
        if off is None or dtype is None or tuple(shape) != tuple(spec.shape):
            return None
        return str(f), off, dtype

    def close(self) -> None:
        self._open.clear()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_index(path: Path) -> Dict[str, tuple]:
    """name -> (absolute byte offset, dtype or None if unknown, shape), from the file's JSON header."""
    with unreadable(path), open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
    tensors = {name: h for name, h in header.items() if name != "__metadata__"}
    end = 8 + n + max((h["data_offsets"][1] for h in tensors.values()), default=0)
    if size < end:
        raise CheckpointError(f"checkpoint file {path} is truncated ({size} bytes, its header describes {end}): "
                              "download it again")
    return {name: (8 + n + h["data_offsets"][0], _ST_DTYPES.get(h["dtype"]), h["shape"]) for name, h in tensors.items()}


class CheckpointError(ValueError):
    """A checkpoint file graphgen cannot read (truncated, corrupt, or holding more than tensors)."""


@contextmanager
def unreadable(path: Path):
    """Errors of the file-format libraries -> one CheckpointError naming the file and what to do."""
    import pickle

    try:
        yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {path} holds Python objects besides tensors, which graphgen does "
                              f"not run (torch.load(weights_only=True) refused it: {first}); use a checkpoint with "
                              "*.safetensors files, or convert this one where you trust its source") from None
    except Exception as e:  # noqa: BLE001 (safetensors, zip and JSON errors: all mean an unreadable file)
        if isinstance(e, OSError):  # missing file, no permission: its own message names the file
            raise
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}): it may be "
                              "truncated or corrupt; download it again") from None


def find_checkpoint(path: Optional[str], hf_id: Optional[str]) -> Optional[Path]:
    """A local directory with config.json: model.path, else the HF hub cache (offline)."""
    if path:
        p = Path(path).expanduser()
        if str(p).lower().endswith(".gguf"):
            return p if p.is_file() else None
        return p if (p / "config.json").exists() else None
    if not hf_id:
        return None
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(hf_id, local_files_only=True)
    except Exception:  # not in the cache, or hub library unavailable: no checkpoint
        return None
    p = Path(snap)
    return p if (p / "config.json").exists() else None


def describe_missing(hf_id: str, path: Optional[str]) -> str:
    where = f"model.path={path}" if path else f"the Hugging Face cache ({hf_id})"
    return (f"no checkpoint found in {where}. To use real weights, download them "
            f"(`hf download {hf_id} --local-dir DIR`, then model.path=DIR) or set model.path to a "
            "directory with config.json or to a .gguf file; "
            f"to benchmark with random weights, set model.weights=dummy.")

