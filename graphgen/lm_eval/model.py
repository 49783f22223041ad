"""graphgen as an lm-evaluation-harness model (lm_eval.api.model.TemplateLM), registered as `graphgen`.

Requests are tokenised exactly as lm-eval's `hf` backend does (TemplateLM's pair split, the
tokenizer's own special tokens, left truncation), then run through graphgen's blocks:
loglikelihood and loglikelihood_rolling as prefill-only scoring blocks (graphgen.scoring),
generate_until as batched generation cut at its `until` strings.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from graphgen import scoring
from graphgen.api import LLM

DEFAULT_MAX_GEN_TOKS = 256  # the hf backend's default


def overrides_of(args: Dict[str, Any]) -> List[str]:
    """lm-eval model_args (already parsed: key -> value) -> graphgen config override strings."""
    out = []
    for k, v in args.items():
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, (list, tuple)):
            v = "[" + ",".join(str(x) for x in v) + "]"
        out.append(f"{k}={v}")
    return out


@register_model("graphgen")
class GraphgenLM(TemplateLM):
    """pretrained: a checkpoint dir or a conf/model name; every other model_arg is a graphgen
    override (policy.percent=..., model.dtype=float32, ...). batch_size (an int) sets
    policy.gpu_batch_size unless the overrides set it; max_length caps the context."""

    def __init__(self, pretrained: Optional[str] = None, batch_size: Any = None, max_length: Optional[int] = None,
                 max_batch_size: Any = None, device: Any = None, llm: Optional[LLM] = None, **overrides: Any):
        super().__init__()
        ov = overrides_of(overrides)
        if isinstance(batch_size, int) or (isinstance(batch_size, str) and batch_size.isdigit()):
            if not any(o.startswith("policy.gpu_batch_size=") for o in ov):
                ov.append(f"policy.gpu_batch_size={int(batch_size)}")
        self.llm = llm if llm is not None else LLM(pretrained, ov)
        if self.llm.tokenizer is None:
            raise ValueError(f"pretrained={pretrained}: lm-eval needs the checkpoint's tokenizer, and there is "
                             "none (dummy weights?); point pretrained at a checkpoint directory")
        self.tokenizer = self.llm.tokenizer
        self._max_length = min(int(max_length), self.llm.spec.max_positions) if max_length else \
            self.llm.spec.max_positions

    # --- what TemplateLM needs -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return scoring.prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        if add_special_tokens is not None:
            return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return scoring.encode(self.tokenizer, string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- requests ----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """[((context, continuation), context ids, continuation ids)] -> [(log p, is greedy)]."""
        res = self.llm.score_tokens([(ctx, cont) for _, ctx, cont in requests], self.max_length)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        texts = [req.args[0] for req in requests]
        windows = [scoring.rolling_windows(self.tok_encode(t), self.prefix_token_id, self.max_length)
                   for t in texts]
        flat = self.llm.score_tokens([w for ws in windows for w in ws], self.max_length)
        out, at = [], 0
        for t, ws in zip(texts, windows):
            out.append(sum(lp for lp, _ in flat[at:at + len(ws)]))
            at += len(ws)
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Requests grouped by their gen_kwargs, longest first, in blocks of the policy's block size."""
        groups: Dict[str, List[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out: List[Optional[str]] = [None] * len(requests)
        p = self.llm.cfg.policy
        block = p.gpu_batch_size * p.num_gpu_batches
        for idx in groups.values():
            contexts = {n: requests[n].args[0] for n in idx}
            idx = sorted(idx, key=lambda n: (-len(self.tok_encode(contexts[n])), contexts[n]))
            for b in range(0, len(idx), block):
                part = idx[b:b + block]
                texts = self._generate([contexts[n] for n in part], requests[part[0]].args[1])
                for n, s in zip(part, texts):
                    out[n] = s
                    self.cache_hook.add_partial("generate_until", requests[n].args, s)
        return out  # type: ignore[return-value]

    def _generate(self, contexts: Sequence[str], gen_kwargs: Dict[str, Any]) -> List[str]:
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), self.tok_decode(self.eot_token_id, False))
        max_gen = int(kwargs.pop("max_gen_toks"))
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in the model's "
                             f"{self.max_length} positions")
        ids, mask = self._encode_batch(contexts, self.max_length - max_gen)
        do_sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        new = self.llm.generate(ids, attention_mask=mask, max_new_tokens=max_gen, do_sample=do_sample,
                                temperature=float(kwargs.get("temperature", 1.0)) if do_sample else 1.0,
                                top_p=float(kwargs.get("top_p", 1.0)), top_k=int(kwargs.get("top_k", 0) or 0),
                                )[:, ids.shape[1]:]
        return [postprocess_generated_text(self.tok_decode(row.tolist()), until, None) for row in new]

    def _encode_batch(self, strings: Sequence[str], left_truncate_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """As the hf backend: left-padded, special tokens unless the first string starts with bos, left-truncated."""
        bos = getattr(self.tokenizer, "bos_token", None)
        special = {"add_special_tokens": False} if bos and strings[0].startswith(bos) else {}
        enc = self.tokenizer(list(strings), padding="longest", return_tensors="pt", **special)
        return enc["input_ids"][:, -left_truncate_len:], enc["attention_mask"][:, -left_truncate_len:]
