"""Next-token selection from logits: greedy, temperature, top-k, top-p (HF semantics).

process_logits is transformers' sampling warper chain, in its order and with its
arithmetic (TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper,
min_tokens_to_keep=1), so the same logits give the same filtered logits and,
with the same random stream, the same sampled tokens. Greedy decoding applies
no warper at all, as HF's generate does when do_sample=False.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FILTERED = float("-inf")  # HF's filter_value


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: Optional[int] = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 when sampling; "
                             "for greedy decoding set do_sample=false")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be an integer >= 0 (0 turns top-k off)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in [0, 1] (1.0 turns top-p off)")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """TemperatureLogitsWarper: logits / temperature (skipped at 1.0, as HF does)."""
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """TopKLogitsWarper: drop logits below the k-th largest (ties with it are kept)."""
    if not top_k:
        return logits
    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, FILTERED)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """TopPLogitsWarper: keep the smallest set whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False  # min_tokens_to_keep=1: the most likely token stays
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), FILTERED)


def process_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [B, V] float32 -> filtered logits, as HF's Temperature/TopK/TopP warpers."""
    logits = apply_temperature(logits, s.temperature)
    logits = apply_top_k(logits, s.top_k)
    return apply_top_p(logits, s.top_p)


def select_tokens(logits: torch.Tensor, s: Sampling, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if not s.do_sample:  # max's indices: the first maximal one, as argmax's, and 5x faster on bf16 CPU logits
        return logits.max(-1).indices
    probs = process_logits(logits.float(), s).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [B, V], chosen tokens [B] -> log-probability of each token [B] (float32).

    Taken from the distribution the token was drawn from: the processed logits
    when sampling (HF's output_scores), the raw logits when greedy.
    """
    logits = logits.float()
    if s.do_sample:
        logits = process_logits(logits, s)
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.long()[:, None]).squeeze(-1)


def step_generator(seed: Optional[int], block: int, batch: int, step: int) -> Optional[torch.Generator]:
    """A generator per (block, batch, step): sampling does not depend on the schedule's order."""
    if seed is None:
        return None
    # hash of a tuple of ints is fixed across runs (PYTHONHASHSEED only salts str/bytes)
    return torch.Generator().manual_seed(hash((seed, block, batch, step)) & 0x7FFF_FFFF_FFFF)
