"""Turn generated token ids into a finished completion: eos, stop strings, logprobs.

The engine generates a fixed number of new tokens per row (eos, then pad);
stop strings are applied afterwards, on decoded text, so a stop string may
span several tokens ("\\n\\nQ:" is often three). The completion is cut at the
earliest stop string (the stop string itself is not part of it), and the
token count is what an engine that stopped there would have generated:
the shortest prefix of tokens whose text contains a stop string.

finish_reason: "eos" (model emitted end-of-sequence), "stop" (a stop string
matched first), "length" (max_new_tokens reached).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

TokenIds = Sequence[int]
EosIds = Union[int, Sequence[int], None]


@dataclass
class Completion:
    text: str
    token_ids: List[int]  # tokens generated up to and including the stopping one
    finish_reason: str  # "eos" | "stop" | "length"
    logprobs: Optional[List[float]] = None  # one per token_ids entry
    stop: Optional[str] = None  # the stop string that matched
    tokens: List[str] = field(default_factory=list)  # token texts, when logprobs were asked for


def normalize_stops(stop: Union[str, Sequence[str], None]) -> Tuple[str, ...]:
    """None | "x" | ["x", "y", "x"] -> ("x", "y"): no duplicates, no empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    out: List[str] = []
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop strings must be strings, got {s!r}")
        if s and s not in out:
            out.append(s)
    return tuple(out)


def find_stop(text: str, stops: Sequence[str]) -> Optional[Tuple[int, str]]:
    """Earliest stop string in text -> (char index, stop string); None if none occurs."""
    best: Optional[Tuple[int, str]] = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) < len(best[1]))):
            best = (i, s)
    return best


def cut_at_eos(new_ids: TokenIds, eos: EosIds) -> Tuple[List[int], bool]:
    """Generated ids (eos, then padding) -> (ids up to and including the first eos, hit eos?)."""
    ids = [int(t) for t in new_ids]
    eos_set = _as_set(eos)
    for n, t in enumerate(ids):
        if t in eos_set:
            return ids[: n + 1], True
    return ids, False


class CompletionDecoder:
    """Decodes completion tokens in the context of their prompt.

    Decoding prompt+completion and dropping the prompt's text keeps a leading
    space that SentencePiece tokenizers drop when a completion is decoded alone.
    """

    def __init__(self, tokenizer: Any, prompt_ids: TokenIds):
        self.tok = tokenizer
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.head = self._decode(self.prompt_ids)

    def _decode(self, ids: List[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def __call__(self, new_ids: Sequence[int]) -> str:
        new_ids = [int(t) for t in new_ids]
        if not new_ids:
            return ""
        full = self._decode(self.prompt_ids + new_ids)
        if full.startswith(self.head):
            return full[len(self.head):]
        return self._decode(new_ids)


def finish(tokenizer: Any, prompt_ids: TokenIds, new_ids: TokenIds, *, eos_token_id: EosIds = None,
           stop: Union[str, Sequence[str], None] = None,
           logprobs: Optional[Sequence[float]] = None) -> Completion:
    """Prompt ids + generated ids [max_new_tokens] -> the finished Completion."""
    ids, hit_eos = cut_at_eos(new_ids, eos_token_id)
    decode = CompletionDecoder(tokenizer, prompt_ids)
    text = decode(ids)
    stops = normalize_stops(stop)
    found = find_stop(text, stops)
    if found is not None:
        n = _shortest_prefix_with_stop(decode, ids, stops)
        ids, text, reason = ids[:n], text[: found[0]], "stop"
    else:
        reason = "eos" if hit_eos else "length"
    lp = None if logprobs is None else [float(x) for x in list(logprobs)[: len(ids)]]
    pieces = [tokenizer.decode([t]) for t in ids] if logprobs is not None else []
    return Completion(text, ids, reason, lp, found[1] if found else None, pieces)


def _shortest_prefix_with_stop(decode: CompletionDecoder, ids: List[int], stops: Sequence[str]) -> int:
    """Smallest n such that the text of ids[:n] contains a stop string (binary search).

    Decoded text grows with the prefix, so "contains a stop" is monotone in n.
    """
    lo, hi = 1, len(ids)  # the answer is in [lo, hi]; ids[:hi] contains a stop
    while lo < hi:
        mid = (lo + hi) // 2
        if find_stop(decode(ids[:mid]), stops) is not None:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _as_set(eos: EosIds) -> set:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}
