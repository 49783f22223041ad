"""generate()'s token inputs, checked at the API boundary: errors name the argument and what fits.

Right-padded (or both-sides padded) prompts are moved to the left: the executors attend over
left-padded rows, and a right-padded row would otherwise generate after its padding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def check_generate_args(input_ids, attention_mask, max_new_tokens, vocab_size: int,
                        max_positions: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids, attention_mask) as left-padded int64 CPU tensors [B, S]."""
    check_max_new_tokens(max_new_tokens)
    ids = _token_ids(input_ids)
    B, S = ids.shape
    if max_positions and S + max_new_tokens > max_positions:
        raise ValueError(f"prompt length {S} + max_new_tokens {max_new_tokens} = {S + max_new_tokens} exceeds "
                         f"the model's context of {max_positions} positions: shorten the prompts or lower "
                         "max_new_tokens")
    check_vocab(ids, vocab_size, "input_ids")
    mask = torch.ones_like(ids) if attention_mask is None else _mask(attention_mask, ids.shape)
    return left_align(ids, mask)


def check_max_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_new_tokens={n!r} must be an integer >= 1")


def check_vocab(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{what} holds token id {int(ids[tuple(where)])} at {where}, outside the model's "
                         f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1}): were the ids made by another "
                         "model's tokenizer?")


def _token_ids(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"input_ids must be a [batch, seq] tensor of token ids (or a list of strings), "
                         f"got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(x.shape)}"
                         + (": for one prompt use input_ids[None]" if x.dim() == 1 else ""))
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("input_ids holds no prompts (a batch of 0): pass at least one")
    if x.shape[1] == 0:
        raise ValueError("input_ids has prompts of length 0: each prompt needs at least one token")
    return x.detach().long().cpu()


def _mask(m, shape) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(shape)}, got {type(m).__name__}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(m.shape)} but input_ids {tuple(shape)}: "
                         "give one mask value per token")
    if m.is_complex():
        raise ValueError(f"attention_mask must hold 0 (padding) and 1 (token), got dtype {m.dtype}")
    m = m.detach().cpu()
    odd = (m != 0) & (m != 1)
    if odd.any():
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), found {m[odd][0].item()}")
    m = m.long()
    n = m.sum(1)
    if (n == 0).any():
        raise ValueError(f"attention_mask row {int((n == 0).nonzero()[0])} is all 0: every prompt needs a token")
    first = m.argmax(1)
    pos = torch.arange(m.shape[1])
    run = (pos >= first[:, None]) & (pos < (first + n)[:, None])
    gaps = (m.bool() != run).any(1)
    if gaps.any():
        raise ValueError(f"attention_mask row {int(gaps.nonzero()[0])} has padding between tokens "
                         f"({m[int(gaps.nonzero()[0])].tolist()}): pad on the left or on the right only")
    return m


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows whose tokens do not end at the last column (right padding) are rotated to end there."""
    S = ids.shape[1]
    end = mask.argmax(1) + mask.sum(1)  # one past each row's last token
    if bool((end == S).all()):
        return ids, mask
    idx = (torch.arange(S)[None, :] - (S - end)[:, None]) % S  # row r rotated right by S - end[r]
    return ids.gather(1, idx), mask.gather(1, idx)
